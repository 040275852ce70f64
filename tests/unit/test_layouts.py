"""Kaggle CLS-LOC layout listing, on a layout written by hand, and the synthetic writer."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagenet_ray.data.classes import imagenet_classes
from imagenet_ray.data.layouts import (
    KAGGLE_SYNSETS,
    KAGGLE_TRAIN_DIR,
    KAGGLE_VAL_DIR,
    KAGGLE_VAL_SOLUTION,
    detect_and_list,
    parse_val_solution,
    val_index_of,
)
from imagenet_ray.data.synth import write_synthetic_imagenet
from imagenet_ray.errors import UserError

# Deliberately not sorted: labels must follow sorted wnids, not file order.
MAPPING = [
    ("n01484850", "great white shark"),
    ("n01440764", "tench, Tinca tinca"),
    ("n01443537", "goldfish, Carassius auratus"),
]
SORTED = sorted(w for w, _ in MAPPING)  # n01440764, n01443537, n01484850
VAL = {  # image id -> wnid
    "ILSVRC2012_val_00000001": "n01484850",
    "ILSVRC2012_val_00000002": "n01440764",
    "ILSVRC2012_val_00000003": "n01443537",
    "ILSVRC2012_val_00000004": "n01484850",
}


def _jpeg(seed: int, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _put(root: Path, rel: str, data: bytes | str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)


def _make_kaggle(
    root: Path, *, train_per_class: int = 2, val: dict[str, str] = VAL, csv_extra: dict[str, str] | None = None
) -> dict[str, int]:
    """Write a tiny Kaggle layout; return {relative key: size} of every image written."""
    sizes: dict[str, int] = {}
    _put(root, KAGGLE_SYNSETS, "".join(f"{w} {n}\n" for w, n in MAPPING))
    for ci, (wnid, _) in enumerate(MAPPING):
        for n in range(1, train_per_class + 1):
            rel = f"{KAGGLE_TRAIN_DIR}/{wnid}/{wnid}_{n}.JPEG"
            data = _jpeg(ci * 100 + n)
            _put(root, rel, data)
            sizes[rel] = len(data)
    rows = ["ImageId,PredictionString"]
    for i, (image_id, wnid) in enumerate(val.items()):
        rel = f"{KAGGLE_VAL_DIR}/{image_id}.JPEG"
        data = _jpeg(1000 + i)
        _put(root, rel, data)
        sizes[rel] = len(data)
        # Real rows carry several boxes; the first token is the label.
        rows.append(f"{image_id},{wnid} 1 2 30 20 {SORTED[0]} 3 4 10 10 ")
    for image_id, wnid in (csv_extra or {}).items():
        rows.append(f"{image_id},{wnid} 0 0 5 5 ")
    # Rows in non-sorted order too.
    rows = rows[:1] + rows[:0:-1]
    _put(root, KAGGLE_VAL_SOLUTION, "\n".join(rows) + "\n")
    return sizes


def test_kaggle_layout_listing(tmp_path):
    sizes = _make_kaggle(tmp_path)
    # An unrelated non-image file in the train tree is ignored.
    _put(tmp_path, f"{KAGGLE_TRAIN_DIR}/n01440764/README.txt", "not an image")
    listing = detect_and_list(str(tmp_path))
    assert listing.layout == "kaggle"
    assert listing.classes.wnids == tuple(SORTED)
    assert listing.classes.names[0].startswith("tench")
    assert len(listing.train) == 6 and len(listing.val) == 4

    for rec in listing.train:
        assert not rec.key.startswith("/") and rec.key.startswith(KAGGLE_TRAIN_DIR + "/")
        assert rec.key.split("/")[-2] == rec.wnid
        assert rec.label == SORTED.index(rec.wnid)
        assert rec.size == sizes[rec.key]
        assert (tmp_path / rec.key).is_file()
    for rec in listing.val:
        image_id = rec.key.rsplit("/", 1)[-1].removesuffix(".JPEG")
        assert rec.key == f"{KAGGLE_VAL_DIR}/{image_id}.JPEG"
        assert rec.wnid == VAL[image_id]  # first token of PredictionString
        assert rec.label == SORTED.index(VAL[image_id])
        assert rec.size == sizes[rec.key]
    assert [r.key for r in listing.train] == sorted(r.key for r in listing.train)
    assert [r.key for r in listing.val] == sorted(r.key for r in listing.val)
    assert {r.label for r in listing.train} == {0, 1, 2}
    assert listing.split("val") == listing.val


def test_listing_keys_are_independent_of_root_spelling(tmp_path):
    _make_kaggle(tmp_path)
    plain = detect_and_list(str(tmp_path))
    slash = detect_and_list(str(tmp_path) + "/")
    url = detect_and_list(tmp_path.as_uri())
    assert plain.train == slash.train == url.train
    assert plain.val == url.val
    assert url.root_url == tmp_path.as_uri()


def test_empty_directory_nothing_found(tmp_path):
    with pytest.raises(UserError, match="nothing found"):
        detect_and_list(str(tmp_path))


def test_missing_directory_nothing_found(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(UserError) as info:
        detect_and_list(str(missing))
    assert "nothing found" in str(info.value) and str(missing) in str(info.value)


def test_unrelated_files_no_known_layout(tmp_path):
    _put(tmp_path, "photos/cat.jpg", _jpeg(1))
    _put(tmp_path, "notes.txt", "hello")
    with pytest.raises(UserError) as info:
        detect_and_list(str(tmp_path))
    msg = str(info.value)
    assert "no known ILSVRC layout" in msg
    assert "found 2 files" in msg
    assert "notes.txt" in msg and "photos" in msg
    assert KAGGLE_SYNSETS in msg  # says what was expected


def test_val_image_without_csv_row(tmp_path):
    _make_kaggle(tmp_path)
    _put(tmp_path, f"{KAGGLE_VAL_DIR}/ILSVRC2012_val_00000099.JPEG", _jpeg(99))
    with pytest.raises(UserError) as info:
        detect_and_list(str(tmp_path))
    assert "ILSVRC2012_val_00000099" in str(info.value) and "no label" in str(info.value)


def test_csv_row_without_file(tmp_path):
    _make_kaggle(tmp_path, csv_extra={"ILSVRC2012_val_00000050": "n01440764"})
    with pytest.raises(UserError) as info:
        detect_and_list(str(tmp_path))
    assert "ILSVRC2012_val_00000050" in str(info.value) and "not on storage" in str(info.value)


def test_train_class_not_in_mapping(tmp_path):
    _make_kaggle(tmp_path)
    _put(tmp_path, f"{KAGGLE_TRAIN_DIR}/n09999999/n09999999_1.JPEG", _jpeg(5))
    with pytest.raises(UserError) as info:
        detect_and_list(str(tmp_path))
    assert "n09999999" in str(info.value)


def test_val_label_not_in_mapping(tmp_path):
    _make_kaggle(tmp_path, val={**VAL, "ILSVRC2012_val_00000005": "n09999998"})
    with pytest.raises(UserError, match="n09999998"):
        detect_and_list(str(tmp_path))


def test_missing_val_solution(tmp_path):
    _make_kaggle(tmp_path)
    (tmp_path / KAGGLE_VAL_SOLUTION).unlink()
    with pytest.raises(UserError, match=KAGGLE_VAL_SOLUTION):
        detect_and_list(str(tmp_path))


def test_parse_val_solution_rules():
    text = "ImageId,PredictionString\nA,n01440764 1 2 3 4 n01443537 5 6 7 8\n\nB,n01443537 0 0 1 1\n"
    assert parse_val_solution(text) == {"A": "n01440764", "B": "n01443537"}
    with pytest.raises(UserError, match="header"):
        parse_val_solution("id,label\nA,n01440764\n")
    with pytest.raises(UserError, match="listed twice"):
        parse_val_solution("ImageId,PredictionString\nA,n01440764 1\nA,n01440764 2\n")
    with pytest.raises(UserError, match=":2: missing prediction string"):
        parse_val_solution("ImageId,PredictionString\nA,\n")


# --- the synthetic writer --------------------------------------------------------------------------------------


def test_write_synthetic_imagenet_kaggle_layout(tmp_path):
    root = tmp_path / "synth"
    summary = write_synthetic_imagenet(str(root), num_classes=3, train_per_class=4, val_per_class=2, seed=3)
    assert (summary.classes, summary.train_images, summary.val_images) == (3, 12, 6)

    wnids = list(imagenet_classes().wnids[:3])
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    expected_train = [f"{KAGGLE_TRAIN_DIR}/{w}/{w}_{n}.JPEG" for w in wnids for n in range(1, 5)]
    expected_val = [f"{KAGGLE_VAL_DIR}/ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 7)]
    assert files == sorted(expected_train + expected_val + [KAGGLE_SYNSETS, KAGGLE_VAL_SOLUTION])
    assert all(re.fullmatch(r".*/ILSVRC2012_val_\d{8}\.JPEG", v) for v in expected_val)

    mapping = (root / KAGGLE_SYNSETS).read_text().splitlines()
    assert [line.split(" ", 1)[0] for line in mapping] == wnids
    solution = parse_val_solution((root / KAGGLE_VAL_SOLUTION).read_text())
    assert sorted(solution) == [f"ILSVRC2012_val_{i:08d}" for i in range(1, 7)]
    assert sorted(solution.values()) == sorted(wnids * 2)  # val_per_class of each class

    sizes = set()
    for rel in expected_train + expected_val:
        with Image.open(root / rel) as img:
            assert img.format == "JPEG"
            img.load()
            assert img.mode in ("RGB", "L")
            assert 400 <= max(img.size) <= 500
            sizes.add(img.size)
    assert len(sizes) > 3, f"image sizes should vary, got {sizes}"

    listing = detect_and_list(str(root))
    assert listing.layout == "kaggle"
    assert listing.classes.wnids == tuple(wnids)
    assert len(listing.train) == 12 and len(listing.val) == 6
    assert [sum(r.label == c for r in listing.train) for c in range(3)] == [4, 4, 4]
    assert [sum(r.label == c for r in listing.val) for c in range(3)] == [2, 2, 2]
    for rec in listing.val:
        assert rec.wnid == solution[rec.key.rsplit("/", 1)[-1].removesuffix(".JPEG")]


def test_synthetic_is_deterministic_for_a_seed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_synthetic_imagenet(str(a), 2, 2, 1, seed=5)
    write_synthetic_imagenet(str(b), 2, 2, 1, seed=5)
    for p in a.rglob("*"):
        if p.is_file():
            assert p.read_bytes() == (b / p.relative_to(a)).read_bytes(), p


def test_synthetic_rejects_bad_counts(tmp_path):
    with pytest.raises(UserError):
        write_synthetic_imagenet(str(tmp_path / "x"), num_classes=0)
    with pytest.raises(UserError):
        write_synthetic_imagenet(str(tmp_path / "x"), num_classes=1001)


def test_val_index_of_reads_the_ilsvrc2012_val_number_anywhere_in_a_key():
    assert val_index_of("ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_00000001.JPEG") == 0
    assert val_index_of("ILSVRC2012_img_val.tar/ILSVRC2012_val_00050000.JPEG") == 49_999
    assert val_index_of("val/n01440764/ILSVRC2012_val_00000293.JPEG") == 292
    assert val_index_of("train/n01440764/n01440764_1.JPEG") == -1
