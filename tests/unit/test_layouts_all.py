"""Every supported ILSVRC layout (kaggle, folders, devkit, tars): detection, labels, tar byte ranges, errors.

One tiny dataset (layout_fixtures.py) is written in each layout; all must give the same labels, which
are indices into the sorted wnids whatever order the mapping files use.
"""

from __future__ import annotations

import io
import tarfile
import threading
from collections import Counter
from pathlib import Path

import pytest

from imagenet_ray import storage
from imagenet_ray.data import layouts
from imagenet_ray.data.layouts import (
    LAYOUT_HELP,
    LAYOUTS,
    ImageRecord,
    detect_and_list,
    parse_devkit_meta,
    parse_ground_truth,
    read_record,
    read_records,
)
from imagenet_ray.errors import UserError
from layout_fixtures import (
    DEVKIT_IDS,
    LONG_NAME,
    NON_LEAF,
    SORTED_WNIDS,
    WNIDS,
    WRITERS,
    class_tar,
    ground_truth,
    jpeg,
    meta_mat,
    mini_imagenet,
    put,
    val_name,
    write_devkit,
    write_folders,
    write_kaggle,
    write_tars,
    write_train,
)

DS = mini_imagenet()
KIT_FOX, CRANE_BIRD, CRANE_MACHINE = "n02119789", "n02012849", "n03126707"

# (name, layout, writer) for every form a dataset may take.
VARIANTS = {
    "kaggle": ("kaggle", lambda r: write_kaggle(r, DS)),
    "folders": ("folders", lambda r: write_folders(r, DS)),
    "folders+mapping": ("folders", lambda r: write_folders(r, DS, mapping=True)),
    "folders+train_tar": ("folders", lambda r: _folders_with_train(r, "tar")),
    "devkit": ("devkit", lambda r: write_devkit(r, DS)),
    "devkit+dir": ("devkit", lambda r: write_devkit(r, DS, devkit="dir")),
    "devkit+root_files+root_val": ("devkit", lambda r: write_devkit(r, DS, devkit="root", val_at_root=True)),
    "devkit+train_tar": ("devkit", lambda r: write_devkit(r, DS, train="tar")),
    "devkit+class_tars": ("devkit", lambda r: write_devkit(r, DS, train="class_tars")),
    "tars": ("tars", lambda r: write_tars(r, DS)),
    "tars+dir": ("tars", lambda r: write_tars(r, DS, devkit="dir")),
}


def _folders_with_train(root: Path, train: str) -> Path:
    write_train(root, DS, train)
    for number, (wnid, data) in DS.val.items():
        put(root, f"val/{wnid}/{val_name(number)}", data)
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Each variant written once for the module (the listings never modify them)."""
    base = tmp_path_factory.mktemp("layouts")
    return {name: writer(base / name.replace("+", "_")) for name, (_, writer) in VARIANTS.items()}


def _multiset(records) -> Counter:
    return Counter((r.wnid, r.label) for r in records)


EXPECTED_TRAIN = Counter({(w, SORTED_WNIDS.index(w)): len(files) for w, files in DS.train.items()})
EXPECTED_VAL = Counter((w, SORTED_WNIDS.index(w)) for w, _ in DS.val.values())


# --- detection, labels ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_detected_and_forced_give_the_same_listing(built, variant):
    layout = VARIANTS[variant][0]
    auto = detect_and_list(str(built[variant]))
    assert auto.layout == layout
    forced = detect_and_list(str(built[variant]), layout=layout)
    assert forced == auto


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_layout_gives_the_same_labels(built, variant):
    listing = detect_and_list(str(built[variant]))
    assert listing.classes.wnids == SORTED_WNIDS
    assert _multiset(listing.train) == EXPECTED_TRAIN
    assert _multiset(listing.val) == EXPECTED_VAL
    for rec in listing.train + listing.val:
        assert rec.label == SORTED_WNIDS.index(rec.wnid)
    # The two "crane" classes stay apart.
    names = dict(zip(listing.classes.wnids, listing.classes.names, strict=True))
    assert names[CRANE_BIRD].startswith("crane") and names[CRANE_MACHINE].startswith("crane")
    labels = {r.wnid: r.label for r in listing.train}
    assert labels[CRANE_BIRD] != labels[CRANE_MACHINE]
    assert names[KIT_FOX].startswith("kit fox")
    # Records sorted by key, keys relative and unique.
    for split in (listing.train, listing.val):
        keys = [r.key for r in split]
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
        assert not any(k.startswith("/") for k in keys)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_record_reads_back_the_original_bytes(built, variant):
    listing = detect_and_list(str(built[variant]))
    root = storage.resolve(listing.root_url)
    records = listing.train + listing.val
    for rec in records:
        data = read_record(root, rec)
        assert data == DS.original(rec.key.rsplit("/", 1)[-1]), rec.key
        assert len(data) == rec.size
    assert list(read_records(root, records)) == [read_record(root, r) for r in records]


def test_val_labels_follow_the_image_numbers(built):
    """Each val image gets the class of its own ground-truth line, in every layout."""
    truth = {val_name(n): w for n, (w, _) in DS.val.items()}
    for variant in VARIANTS:
        listing = detect_and_list(str(built[variant]))
        assert {r.key.rsplit("/", 1)[-1]: r.wnid for r in listing.val} == truth, variant


# --- devkit -----------------------------------------------------------------------------------------------------


def test_meta_mat_ids_are_not_sorted_order_and_non_leaves_are_ignored():
    leaves = parse_devkit_meta(meta_mat(DS))
    assert {i: w for i, (w, _) in leaves.items()} == {i: w for w, i in DEVKIT_IDS.items()}
    assert NON_LEAF[0] not in leaves
    assert leaves[1][0] == KIT_FOX and leaves[1][1].startswith("kit fox")
    # The ID order differs from the sorted-wnid order: labels must come from sorting, not from IDs.
    assert [leaves[i][0] for i in sorted(leaves)] != list(SORTED_WNIDS)


def test_devkit_labels_are_sorted_indices_not_ids(tmp_path):
    write_devkit(tmp_path, DS)
    listing = detect_and_list(str(tmp_path))
    for rec in listing.val:
        number = int(rec.key.rsplit("_", 1)[-1].split(".")[0])
        wnid = DS.val[number][0]
        assert rec.wnid == wnid
        assert rec.label == SORTED_WNIDS.index(wnid)
    # No class keeps its ID order: a label taken from the ID would be wrong for every class.
    assert all(SORTED_WNIDS.index(w) != i - 1 for w, i in DEVKIT_IDS.items())
    fox = [r for r in listing.val if r.wnid == KIT_FOX]
    assert fox and all(r.label == 2 for r in fox)  # ID 1 in the devkit, index 2 when sorted


@pytest.mark.parametrize("devkit", ["targz", "dir", "root"])
def test_devkit_forms_give_identical_listings(tmp_path, devkit):
    reference = detect_and_list(str(write_devkit(tmp_path / "ref", DS)))
    listing = detect_and_list(str(write_devkit(tmp_path / devkit, DS, devkit=devkit)))
    assert listing.train == reference.train and listing.val == reference.val
    assert listing.classes == reference.classes


def test_parse_ground_truth_rules():
    assert parse_ground_truth("3\n1\n\n") == [3, 1]
    with pytest.raises(UserError, match=":2: expected an ILSVRC2012_ID"):
        parse_ground_truth("3\nn01440764\n")
    with pytest.raises(UserError, match="empty"):
        parse_ground_truth("\n")


def test_meta_mat_garbage_is_a_user_error():
    with pytest.raises(UserError, match=r"meta\.mat: not a readable MATLAB file"):
        parse_devkit_meta(b"not a mat file at all" * 10)


# --- tars -------------------------------------------------------------------------------------------------------


def test_tar_records_point_into_the_tarballs(built):
    listing = detect_and_list(str(built["tars"]))
    for rec in listing.train:
        assert rec.path == "ILSVRC2012_img_train.tar" and rec.offset > 0
        tar_name, inner, member = rec.key.split("/", 2)
        assert tar_name == rec.path and inner == f"{rec.wnid}.tar" and "/" not in member
    for rec in listing.val:
        assert rec.path == "ILSVRC2012_img_val.tar" and rec.offset > 0
        assert rec.key == f"ILSVRC2012_img_val.tar/{rec.key.rsplit('/', 1)[-1]}"
    long_keys = [r.key for r in listing.train if r.key.endswith(LONG_NAME)]
    assert long_keys == [f"ILSVRC2012_img_train.tar/{KIT_FOX}.tar/{LONG_NAME}"] and len(LONG_NAME) > 100
    # Nothing was unpacked next to the tarballs.
    assert sorted(p.name for p in built["tars"].iterdir()) == [
        "ILSVRC2012_devkit_t12.tar.gz",
        "ILSVRC2012_img_train.tar",
        "ILSVRC2012_img_val.tar",
    ]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_index_reads_headers_only(tmp_path, fmt):
    """Indexing seeks over member data: bytes read stay far below the tar size; long names work."""
    big = {f"n01530575_{n}.JPEG": jpeg(n, size=(400, 300)) + bytes(30_000) for n in range(20)}
    if fmt != tarfile.USTAR_FORMAT:
        big["n01530575_" + "x" * 120 + ".JPEG"] = jpeg(77)
    data = class_tar(big, fmt)
    path = put(tmp_path, "t.tar", data)
    read = []
    with storage.resolve(str(tmp_path)).fs.open_input_file(str(path)) as f:

        class Counting:
            def read_at(self, n, offset):
                read.append(n)
                return f.read_at(n, offset)

        members = layouts._tar_members(Counting(), 0, len(data), str(path))
    assert {m for m, _, _ in members} == set(big)
    for name, offset, size in members:
        assert data[offset : offset + size] == big[name]
    assert sum(read) < len(data) / 5
    assert len(read) <= len(big) + 2  # about one ranged read per member


def test_per_class_tars_in_train_folder(tmp_path):
    write_devkit(tmp_path, DS, train="class_tars")
    listing = detect_and_list(str(tmp_path))
    rec = next(r for r in listing.train if r.wnid == KIT_FOX)
    assert rec.path == f"train/{KIT_FOX}.tar" and rec.key.startswith(f"train/{KIT_FOX}.tar/")
    # Half-extracted: a class both as a folder and as a tar is refused.
    put(tmp_path, f"train/{KIT_FOX}/{KIT_FOX}_1.JPEG", jpeg(1))
    with pytest.raises(UserError, match=f"both train/{KIT_FOX}/ and train/{KIT_FOX}.tar"):
        detect_and_list(str(tmp_path))


def test_train_tar_with_unexpected_member(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in ((f"{KIT_FOX}.tar", class_tar(DS.train[KIT_FOX])), ("stray.JPEG", jpeg(3))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    write_tars(tmp_path, DS)
    put(tmp_path, "ILSVRC2012_img_train.tar", buf.getvalue())
    with pytest.raises(UserError, match=r"unexpected member stray\.JPEG"):
        detect_and_list(str(tmp_path))


def test_corrupt_tar_is_a_user_error(tmp_path):
    write_tars(tmp_path, DS)
    put(tmp_path, "ILSVRC2012_img_val.tar", b"\x01" * 3000)
    with pytest.raises(UserError, match=r"ILSVRC2012_img_val\.tar: not a readable tar"):
        detect_and_list(str(tmp_path))


# --- listing rules ----------------------------------------------------------------------------------------------


def test_broken_and_empty_images_are_listed_metadata_is_not(tmp_path):
    write_folders(tmp_path, DS)
    put(tmp_path, f"train/{KIT_FOX}/{KIT_FOX}_empty.JPEG", b"")
    put(tmp_path, f"train/{KIT_FOX}/{KIT_FOX}_broken.jpg", b"not a jpeg")
    put(tmp_path, f"train/{KIT_FOX}/{KIT_FOX}_upper.PNG", b"\x89PNG broken")
    put(tmp_path, f"train/{KIT_FOX}/notes.txt", "metadata")
    put(tmp_path, f"train/{KIT_FOX}/.DS_Store", b"\0\0")
    put(tmp_path, "README.md", "top-level files are ignored")
    listing = detect_and_list(str(tmp_path))
    keys = {r.key: r.size for r in listing.train}
    assert keys[f"train/{KIT_FOX}/{KIT_FOX}_empty.JPEG"] == 0
    assert f"train/{KIT_FOX}/{KIT_FOX}_broken.jpg" in keys and f"train/{KIT_FOX}/{KIT_FOX}_upper.PNG" in keys
    assert not any(k.endswith(("notes.txt", ".DS_Store")) for k in keys)
    assert len(listing.train) == sum(EXPECTED_TRAIN.values()) + 3


def test_folders_classes_from_train_folders_named_when_known(tmp_path):
    write_folders(tmp_path, DS)
    put(tmp_path, "train/n09999999/n09999999_1.JPEG", jpeg(1))  # not an ILSVRC2012 class: no name
    listing = detect_and_list(str(tmp_path))
    assert listing.classes.wnids == tuple(sorted((*SORTED_WNIDS, "n09999999")))
    assert listing.classes.names[-1] == ""
    assert listing.classes.names[0].startswith("brambling")


def test_class_folders_are_listed_one_request_each_in_parallel(tmp_path, monkeypatch):
    write_folders(tmp_path, DS)
    calls = []
    original = layouts._Source.list_dir

    def spy(self, rel, recursive=False):
        calls.append((rel, recursive, threading.current_thread().name))
        return original(self, rel, recursive)

    monkeypatch.setattr(layouts._Source, "list_dir", spy)
    detect_and_list(str(tmp_path))
    assert ("", False) in {(r, rec) for r, rec, _ in calls}
    assert not any(r == "" and rec for r, rec, _ in calls)  # never one recursive listing of the root
    per_class = {(r, t) for r, rec, t in calls if rec and r.count("/") == 1}
    assert {r for r, _ in per_class} == {f"{s}/{w}" for s in ("train", "val") for w in WNIDS}
    assert all(t.startswith("layout-list") for _, t in per_class)


def test_listing_is_independent_of_root_spelling(built):
    a = detect_and_list(str(built["tars"]))
    b = detect_and_list(built["tars"].as_uri())
    assert a.train == b.train and a.val == b.val


# --- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant,forced",
    [
        ("kaggle", "folders"),
        ("folders", "kaggle"),
        ("folders", "devkit"),
        ("devkit", "tars"),
        ("tars", "devkit"),
        ("tars", "folders"),
        ("devkit", "kaggle"),
    ],
)
def test_forced_layout_that_does_not_match(built, variant, forced):
    with pytest.raises(UserError) as info:
        detect_and_list(str(built[variant]), layout=forced)
    msg = str(info.value)
    assert f"not the {forced} layout" in msg and LAYOUT_HELP[forced] in msg
    assert "\n" not in msg


def test_unknown_layout_name(tmp_path):
    with pytest.raises(UserError, match=r"unknown layout 'imagenet'.*kaggle, folders, devkit, tars"):
        detect_and_list(str(tmp_path), layout="imagenet")
    assert LAYOUTS == ("kaggle", "folders", "devkit", "tars")


def test_empty_directory(tmp_path):
    with pytest.raises(UserError, match="nothing found"):
        detect_and_list(str(tmp_path))


def test_root_is_a_file(tmp_path):
    p = put(tmp_path, "ILSVRC2012_img_val.tar", b"x")
    with pytest.raises(UserError, match="is a file; pass the folder"):
        detect_and_list(str(p))


def test_unrelated_files_say_what_was_found_and_expected(tmp_path):
    put(tmp_path, "photos/2024/cat.jpg", jpeg(1))
    put(tmp_path, "photos/dog.jpg", jpeg(2))
    put(tmp_path, "notes.txt", "hello")
    put(tmp_path, "train/n01440764/n01440764_1.JPEG", jpeg(3))  # train alone is not enough
    with pytest.raises(UserError) as info:
        detect_and_list(str(tmp_path))
    msg = str(info.value)
    assert "no known ILSVRC layout" in msg and "found 4 files" in msg
    assert "photos/" in msg and "notes.txt" in msg and "train/" in msg
    for name, help_ in LAYOUT_HELP.items():
        assert f"{name} = {help_}" in msg
    assert "\n" not in msg


def test_val_image_without_ground_truth_line(tmp_path):
    write_devkit(tmp_path, DS)
    extra = len(DS.val) + 1
    put(tmp_path, f"val/{val_name(extra)}", jpeg(4))
    with pytest.raises(UserError) as info:
        detect_and_list(str(tmp_path))
    assert val_name(extra) in str(info.value) and "no ground-truth line" in str(info.value)


def test_ground_truth_with_more_lines_than_images(tmp_path):
    write_devkit(tmp_path, DS, devkit="root")
    put(tmp_path, "ILSVRC2012_validation_ground_truth.txt", ground_truth(DS, extra_lines=2))
    with pytest.raises(UserError) as info:
        detect_and_list(str(tmp_path))
    msg = str(info.value)
    assert f"has {len(DS.val) + 2} lines" in msg and f"{len(DS.val)} val images" in msg
    assert f"{val_name(len(DS.val) + 1).removesuffix('.JPEG')} is missing" in msg


def test_missing_val_image_in_the_middle(tmp_path):
    write_devkit(tmp_path, DS)
    (tmp_path / "val" / val_name(3)).unlink()
    with pytest.raises(UserError, match=f"{val_name(3).removesuffix('.JPEG')} is missing"):
        detect_and_list(str(tmp_path))


def test_ground_truth_id_not_a_leaf(tmp_path):
    write_devkit(tmp_path, DS, devkit="root")
    text = (tmp_path / "ILSVRC2012_validation_ground_truth.txt").read_text().replace("3\n", f"{NON_LEAF[0]}\n", 1)
    put(tmp_path, "ILSVRC2012_validation_ground_truth.txt", text)
    with pytest.raises(UserError, match=f"ILSVRC2012_ID {NON_LEAF[0]} is not a leaf class in .*meta.mat"):
        detect_and_list(str(tmp_path))


def test_devkit_missing(tmp_path):
    write_devkit(tmp_path, DS, devkit="root")
    (tmp_path / "meta.mat").unlink()
    with pytest.raises(UserError, match=r"not the devkit layout \(no meta\.mat"):
        detect_and_list(str(tmp_path))


def test_val_image_with_unusable_name(tmp_path):
    write_devkit(tmp_path, DS)
    put(tmp_path, "val/photo_1.JPEG", jpeg(5))
    with pytest.raises(UserError, match=r"val/photo_1\.JPEG is not named ILSVRC2012_val_"):
        detect_and_list(str(tmp_path))


def test_train_folder_not_in_synset_mapping(tmp_path):
    write_folders(tmp_path, DS, mapping=True)
    put(tmp_path, "train/n09999999/n09999999_1.JPEG", jpeg(6))
    with pytest.raises(UserError) as info:
        detect_and_list(str(tmp_path))
    assert "n09999999" in str(info.value) and "LOC_synset_mapping.txt" in str(info.value)


def test_train_folder_not_in_meta_mat(tmp_path):
    write_devkit(tmp_path, DS)
    put(tmp_path, "train/n09999999/n09999999_1.JPEG", jpeg(6))
    with pytest.raises(UserError) as info:
        detect_and_list(str(tmp_path))
    assert "n09999999" in str(info.value) and "meta.mat" in str(info.value)


def test_val_folder_without_train_class(tmp_path):
    write_folders(tmp_path, DS)
    put(tmp_path, "val/n09999998/ILSVRC2012_val_00000099.JPEG", jpeg(7))
    with pytest.raises(UserError) as info:
        detect_and_list(str(tmp_path))
    assert "n09999998" in str(info.value) and "train folders" in str(info.value)


def test_not_a_class_folder(tmp_path):
    write_folders(tmp_path, DS)
    put(tmp_path, "train/misc/a.JPEG", jpeg(8))
    with pytest.raises(UserError, match="train/misc: not a class folder"):
        detect_and_list(str(tmp_path))


def test_image_outside_class_folders(tmp_path):
    write_folders(tmp_path, DS)
    put(tmp_path, "val/loose.JPEG", jpeg(9))
    with pytest.raises(UserError, match=r"val/loose\.JPEG: a file outside a class folder"):
        detect_and_list(str(tmp_path))


def test_val_without_train(tmp_path):
    for number, (wnid, data) in DS.val.items():
        put(tmp_path, f"val/{wnid}/{val_name(number)}", data)
    with pytest.raises(UserError, match="not the folders layout \\(no train/<wnid>/ folders"):
        detect_and_list(str(tmp_path))


def test_read_record_whole_file_and_range(tmp_path):
    data = jpeg(10)
    put(tmp_path, "x/a.JPEG", data)
    put(tmp_path, "blob.bin", b"head" + data + b"tail")
    root = storage.resolve(str(tmp_path))
    assert read_record(root, ImageRecord("x/a.JPEG", KIT_FOX, 0, len(data))) == data
    assert read_record(root, ImageRecord("blob.bin/a.JPEG", KIT_FOX, 0, len(data), "blob.bin", 4)) == data


def test_all_writers_registered():
    assert set(WRITERS) == set(LAYOUTS)
