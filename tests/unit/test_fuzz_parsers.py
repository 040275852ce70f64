"""Property-based fuzzing (Hypothesis) of the parsers: layouts, synset mapping, manifest, config.

The rule under test: any input either parses into a well-formed result or fails with a one-line
`UserError` naming the source (`ConfigError` for configs: the CLI prints it as one line, exit code 2);
never another exception type, never a wrong result. Well-formed generated inputs round-trip exactly.
Runs derandomized with no example database, so CI sees the same examples every time and nothing is
written to the repository. The fixed examples (`@example`, the regression tests) are the defects found.
"""

from __future__ import annotations

import io
import json
import posixpath
import struct
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import scipy.io
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from imagenet_ray.config import ExperimentConfig, load_config, parse_override
from imagenet_ray.data.classes import WNID_RE, ClassList, parse_synset_mapping
from imagenet_ray.data.format import MANIFEST_FORMAT, MANIFEST_NAME, open_prepared, read_manifest
from imagenet_ray.data.layouts import (
    _member_name,
    _tar_members,
    parse_devkit_meta,
    parse_ground_truth,
    parse_val_solution,
    val_index_of,
)
from imagenet_ray.errors import ConfigError, UserError
from layout_fixtures import meta_mat, mini_imagenet

# Reproducible in CI (derandomize) and no example database (database=None). Hypothesis still caches
# constants and Unicode tables under <cwd>/.hypothesis/: those go to the temp folder, not the repository.
# Function-scoped fixtures (tmp_path) are shared by a test's examples on purpose: each overwrites its one file.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "imagenet-ray-hypothesis")
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def assert_one_line(exc: UserError, *names: str) -> str:
    """The error is one line (by every line break Python knows) and names each of `names`."""
    msg = str(exc)
    assert msg and len(msg.splitlines()) == 1 and "\r" not in msg, f"not one line: {msg!r}"
    for name in names:
        assert name in msg, f"{name!r} not named in {msg!r}"
    return msg


def tokens(*words: str, max_size: int = 40) -> st.SearchStrategy[str]:
    """Text made of `words`: reaches a parser's branches far more often than arbitrary characters."""
    return st.lists(st.sampled_from(words), max_size=max_size).map("".join)


wnids = st.integers(0, 10**8 - 1).map(lambda i: f"n{i:08d}")
val_ids = st.integers(1, 10**8 - 1).map(lambda i: f"ILSVRC2012_val_{i:08d}")
eols = st.sampled_from(["\n", "\r\n"])


# --- LOC_val_solution.csv ----------------------------------------------------------------------------------------

SOLUTION = "SRC_solution.csv"
HEADER = "ImageId,PredictionString"
csv_text = tokens(
    ",", '"', "\n", "\r", "\r\n", " ", "\t", "\x00", "n01440764", "ILSVRC2012_val_00000001", "1 2 3 4", "x", "é"
)


@settings(FUZZ, max_examples=200)
@given(
    st.one_of(
        st.text(), csv_text, st.builds(lambda eol, body: HEADER + eol + body, eols, st.one_of(st.text(), csv_text))
    )
)
@example("ImageId,PredictionString\rILSVRC2012_val_00000001,n01440764 1 2 3 4")  # was _csv.Error (a lone \r)
@example('ImageId,PredictionString\n"a\nb",n01440764\n"a\nb",n01440764')  # was a two-line "listed twice"
def test_val_solution_parses_any_text_or_fails_in_one_line(text):
    try:
        mapping = parse_val_solution(text, SOLUTION)
    except UserError as exc:
        assert_one_line(exc, SOLUTION)
        return
    assert all(isinstance(k, str) and k == k.strip() for k in mapping)
    assert all(isinstance(v, str) and v.split() == [v] for v in mapping.values())  # one token: the label


@settings(FUZZ, max_examples=150)
@given(
    st.dictionaries(val_ids, st.lists(wnids, min_size=1, max_size=3), max_size=40),
    st.lists(st.booleans(), min_size=40, max_size=40),
    eols,
    st.booleans(),
)
def test_val_solution_round_trips_every_row(rows, quirks, eol, trailing_eol):
    lines = [HEADER]
    for (image_id, boxes), quirk in zip(rows.items(), quirks, strict=False):
        prediction = " ".join(f"{w} {i} {2 * i} {i + 99} {2 * i + 99}" for i, w in enumerate(boxes))
        lines.append(f'"{image_id}","{prediction}"' if quirk else f"{image_id},{prediction}")
        if quirk:
            lines.append("")  # blank lines are skipped
    text = eol.join(lines) + (eol if trailing_eol else "")
    assert parse_val_solution(text, SOLUTION) == {image_id: boxes[0] for image_id, boxes in rows.items()}


# --- the devkit's ground truth -----------------------------------------------------------------------------------

TRUTH = "SRC_ground_truth.txt"


@settings(FUZZ, max_examples=300)
@given(st.one_of(st.text(), tokens("1", "0", "9", "42", "\n", "\r\n", " ", "+", "-", "_", "١", "\x0c", "\u2028")))
def test_ground_truth_parses_any_text_or_fails_in_one_line(text):
    try:
        ids = parse_ground_truth(text, TRUTH)
    except UserError as exc:
        assert_one_line(exc, TRUTH)
        return
    assert ids and all(isinstance(i, int) and i >= 0 for i in ids)
    assert len(ids) == len(text.rstrip().split("\n"))  # one ID per line, trailing blank lines only dropped


@pytest.mark.parametrize("text", ["1_000\n", "+7\n", "١\n", "1\x0c2\n", "3\x1c4\n", "5\u20286\n", "-5\n"])
def test_ground_truth_reads_plain_digits_one_per_line(text):
    # int() read "1_000" as 1000, "١" as 1; splitlines() read "1\x0c2" as two lines: every later label shifted.
    with pytest.raises(UserError, match=rf"^{TRUTH}:1: expected an ILSVRC2012_ID, found "):
        parse_ground_truth(text, TRUTH)


@settings(FUZZ, max_examples=100)
@given(
    st.lists(st.integers(1, 10**6), min_size=1, max_size=60), eols, st.sampled_from(["", " ", "\t"]), st.integers(0, 3)
)
def test_ground_truth_round_trips(ids, eol, pad, trailing_blank_lines):
    text = eol.join(f"{pad}{i}{pad}" for i in ids) + eol * trailing_blank_lines
    assert parse_ground_truth(text, TRUTH) == ids


# --- the devkit's meta.mat ---------------------------------------------------------------------------------------

META = "SRC_meta.mat"
FIELDS = ("ILSVRC2012_ID", "WNID", "words", "num_children")


def _mat(rows: list[tuple[Any, ...]], fields: tuple[str, ...] = FIELDS, compress: bool = False) -> bytes:
    synsets = np.empty((len(rows), 1), dtype=[(f, object) for f in fields])
    for k, row in enumerate(rows):
        synsets[k, 0] = row
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets}, do_compression=compress)
    return buf.getvalue()


VALID_META = meta_mat(mini_imagenet())  # the devkit's layout: 8 fields, one non-leaf synset
VALID_META_COMPRESSED = _mat(
    [(1.0, "n01440764", "tench, Tinca tinca", 0.0), (2.0, "n01443537", "goldfish", 0.0), (3.0, "n00001740", "x", 2.0)],
    compress=True,
)


def _check_meta(data: bytes) -> dict[int, tuple[str, str]] | None:
    try:
        leaves = parse_devkit_meta(data, META)
    except UserError as exc:
        assert_one_line(exc, META)
        return None
    assert leaves and all(isinstance(i, int) for i in leaves)
    assert all(WNID_RE.match(w) and isinstance(words, str) for w, words in leaves.values())
    assert len({w for w, _ in leaves.values()}) == len(leaves)
    return leaves


@settings(FUZZ, max_examples=200)
@given(st.one_of(st.binary(max_size=600), st.binary(max_size=600).map(lambda b: VALID_META[:128] + b)))
def test_meta_mat_parses_any_bytes_or_fails_in_one_line(data):
    _check_meta(data)


@settings(FUZZ, max_examples=300)
@given(st.booleans(), st.lists(st.tuples(st.integers(0, 10**5), st.integers(0, 255)), min_size=1, max_size=4))
@example(False, [(384, 200)])  # the type code of a numeric element: scipy 1.17 died of SIGSEGV
@example(False, [(1884, 12)])  # a name's length: scipy then read the next variable's tag as a number, SIGSEGV
def test_meta_mat_with_flipped_bytes_never_crashes_the_reader(compress, flips):
    data = bytearray(VALID_META_COMPRESSED if compress else VALID_META)
    for pos, value in flips:
        data[pos % len(data)] = value
    _check_meta(bytes(data))


def test_a_char_array_without_dimensions_is_refused_before_scipy_reads_it():
    # scipy's chars_to_strings takes dims[-1] of a 0-d array: SIGSEGV. Zeroing the dims element's byte count:
    data = bytearray(_mat([(1.0, "n01440764", "tench", 0.0)]))
    tag = data.index(struct.pack("<II", 5, 8), data.index(b"n01440764") - 64)  # the WNID's dims element
    data[tag + 4 : tag + 8] = struct.pack("<I", 1)  # one byte: no whole dimension
    with pytest.raises(UserError, match="char array without dimensions"):
        parse_devkit_meta(bytes(data), META)


field_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**31), 2**31 - 1),
    st.text(alphabet=st.characters(codec="latin-1"), max_size=12),
    wnids,
    st.lists(st.floats(-5, 5), max_size=3).map(np.array),
    st.just(np.zeros((1, 0))),
)


@settings(FUZZ, max_examples=150)
@given(
    st.lists(st.tuples(field_values, field_values, field_values, field_values), min_size=1, max_size=5), st.booleans()
)
def test_meta_mat_with_any_field_values_parses_or_fails_in_one_line(rows, compress):
    # int() of a string or an array was a ValueError/TypeError traceback; 1.5 was read as ID 1.
    leaves = _check_meta(_mat(rows, compress=compress)) or {}
    for ilsvrc_id, (wnid, _) in leaves.items():  # each leaf is a row, its ID a whole number read as itself
        assert any(isinstance(r[1], str) and r[1].strip() == wnid and _number(r[0]) == ilsvrc_id for r in rows)


def _number(value: Any) -> float | None:
    a = np.asarray(value)
    return float(a.item()) if a.size == 1 and a.dtype.kind in "iuf" else None


@pytest.mark.parametrize(
    "row, problem",
    [
        ((1.5, "n01440764", "tench", 0.0), r"synsets\(1\)\.ILSVRC2012_ID is 1\.5, not a whole number"),
        (("7", "n01440764", "tench", 0.0), r"ILSVRC2012_ID is '7', not a whole number"),
        ((1.0, "n01440764", "tench", "x"), r"num_children is 'x', not a whole number"),
        ((1.0, "n01440764", np.arange(2.0), 0.0), r"words is array\(\[0\., 1\.\]\), not text"),
        ((1.0, "n٠١٤٤٠٧٦٤", "tench", 0.0), r"has WNID 'n٠١٤٤٠٧٦٤', not a wnid"),
    ],
)
def test_meta_mat_fields_of_the_wrong_kind_are_named(row, problem):
    with pytest.raises(UserError, match=rf"^{META}: .*{problem}"):
        parse_devkit_meta(_mat([row]), META)


def test_an_empty_words_field_is_an_empty_name_not_brackets():
    # scipy loads '' as an empty array, whose str() is "[]": the class was named "[]".
    assert parse_devkit_meta(_mat([(1.0, "n01440764", "", 0.0)]), META) == {1: ("n01440764", "")}


@settings(FUZZ, max_examples=60)
@given(
    st.dictionaries(
        wnids,
        st.tuples(st.text(alphabet=st.characters(codec="latin-1"), max_size=20), st.integers(0, 3)),
        min_size=1,
        max_size=12,
    ),
    st.randoms(use_true_random=False),
    st.booleans(),
)
def test_meta_mat_round_trips_the_leaf_classes(classes, rng, compress):
    ids = rng.sample(range(1, 5000), len(classes))
    rows = [
        (float(i), w, words, float(children)) for i, (w, (words, children)) in zip(ids, classes.items(), strict=True)
    ]
    expected = {int(i): (w, " ".join(words.split())) for i, w, words, children in rows if children == 0}
    if not expected:
        with pytest.raises(UserError, match="no leaf synsets"):
            parse_devkit_meta(_mat(rows, compress=compress), META)
    else:
        assert parse_devkit_meta(_mat(rows, compress=compress), META) == expected


# --- keys: val_index_of, _member_name ----------------------------------------------------------------------------


@settings(FUZZ, max_examples=200)
@given(st.one_of(st.text(), tokens("ILSVRC2012_val_", "0", "1", "9", "١", "/", ".JPEG", "x")))
@example("val/ILSVRC2012_val_٠٠٠٠٠٠٠١.JPEG")  # \d matched any script's digits: this key was val image 1
def test_val_index_of_any_key_is_minus_one_or_the_number_it_contains(key):
    index = val_index_of(key)
    assert index >= -1
    if index >= 0:
        assert f"ILSVRC2012_val_{index + 1:08d}" in key


@settings(FUZZ, max_examples=150)
@given(st.text(alphabet="abc/ .-", max_size=20), st.integers(1, 10**8 - 1), st.text(alphabet="abc/ .-", max_size=20))
def test_val_index_of_reads_the_number_exactly(prefix, number, suffix):
    assert val_index_of(f"{prefix}ILSVRC2012_val_{number:08d}{suffix}") == number - 1


@settings(FUZZ, max_examples=300)
@given(st.one_of(st.text(), tokens("/", ".", "..", "a", "b.JPEG", " ")))
def test_member_name_is_normal_relative_and_stable(name):
    out = _member_name(name)
    assert not out.startswith("/") and out != "."
    assert out == "" or (posixpath.normpath(out) == out and _member_name(out) == out)


segments = st.text(alphabet="abcXYZ019_-.", min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))


@settings(FUZZ, max_examples=150)
@given(
    st.lists(segments, min_size=1, max_size=4),
    st.lists(st.sampled_from(["", ".", "/"]), min_size=5, max_size=5),
    st.booleans(),
)
def test_member_name_drops_only_noise(parts, noise, leading_slash):
    noisy = "/".join(p for part, n in zip(parts, noise, strict=False) for p in (n, part) if p)
    assert _member_name(("/" if leading_slash else "") + noisy) == "/".join(parts)


# --- tar indexing ------------------------------------------------------------------------------------------------

TAR = "SRC.tar"


def _tar(files: dict[str, bytes], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        d = tarfile.TarInfo("a-directory")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("a-link")
        link.type, link.linkname = tarfile.SYMTYPE, "a-directory"
        tf.addfile(link)
    return buf.getvalue()


def _check_tar(data: bytes, start: int, length: int) -> list[tuple[str, int, int]] | None:
    try:
        members = _tar_members(pa.BufferReader(data), start, length, TAR)
    except UserError as exc:
        assert_one_line(exc, TAR)
        return None
    for name, offset, size in members:
        assert size >= 0 and start <= offset and offset + size <= start + length, (name, offset, size)
        name.encode()  # a key: UTF-8
    offsets = [offset for _, offset, _ in members]
    assert offsets == sorted(set(offsets))  # in file order, each once
    return members


tar_files = st.dictionaries(
    st.lists(segments, min_size=1, max_size=4).map("/".join).map(lambda n: n + ".JPEG"),
    st.binary(max_size=1500),
    max_size=6,
)
tar_formats = st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])


@settings(FUZZ, max_examples=100)
@given(tar_files, tar_formats, st.binary(max_size=700), st.binary(max_size=700))
def test_tar_members_round_trip_at_any_offset(files, fmt, before, after):
    data = _tar(files, fmt)
    blob = before + data + after  # a class tar inside the train tar: a byte range of a bigger object
    members = _check_tar(blob, len(before), len(data))
    assert members is not None
    assert [name for name, _, _ in members] == [_member_name(n) for n in files]
    assert [blob[offset : offset + size] for _, offset, size in members] == list(files.values())


@settings(FUZZ, max_examples=200)
@given(
    st.one_of(
        st.binary(max_size=3000),
        st.binary(max_size=600).map(lambda b: _tar({"a.JPEG": b"x" * 600}, tarfile.GNU_FORMAT)[:512] + b),
    )
)
def test_tar_members_of_any_bytes_are_in_bounds_or_fail_in_one_line(data):
    _check_tar(data, 0, len(data))


def _set_field(header: bytearray, start: int, field: bytes) -> None:
    """Write a header field and fix the checksum, so tarfile parses what was written."""
    header[start : start + len(field)] = field
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % sum(header)


@settings(FUZZ, max_examples=200)
@given(
    st.integers(-(2**40), 2**40), st.integers(0, 4), st.binary(min_size=1, max_size=99), st.sampled_from(b"0257xgLK")
)
@example(-512, 2, b"b.JPEG", ord("0"))  # tarfile reread this header forever: prepare hung
@example(-1024, 2, b"b.JPEG", ord("0"))  # a member of size -1024 was listed
@example(3, 2, b"caf\xe9.JPEG", ord("0"))  # a Latin-1 name became a key with a lone surrogate (UnicodeEncodeError)
@pytest.mark.timeout(120)
def test_tar_header_fields_with_valid_checksums_never_hang_or_mislist(size, member, name, typeflag):
    data = bytearray(_tar({"a.JPEG": b"a" * 700, "b.JPEG": b"b" * 3, "c.JPEG": b""}, tarfile.GNU_FORMAT))
    # the headers: a-directory, a.JPEG, b.JPEG, c.JPEG, a-link
    headers = [512 * k for k in range(len(data) // 512) if data[512 * k + 257 : 512 * k + 262] == b"ustar"]
    header = bytearray(data[headers[member] : headers[member] + 512])
    _set_field(header, 0, name.ljust(100, b"\x00"))
    _set_field(header, 124, tarfile.itn(size, 12, tarfile.GNU_FORMAT))
    _set_field(header, 156, bytes([typeflag]))
    data[headers[member] : headers[member] + 512] = header
    _check_tar(bytes(data), 0, len(data))


# --- LOC_synset_mapping.txt --------------------------------------------------------------------------------------

MAPPING = "SRC_synsets.txt"


@settings(FUZZ, max_examples=300)
@given(
    st.one_of(st.text(), tokens("n01440764", "n0144076", "n٠١٤٤٠٧٦٤", " ", "\t", "\n", "\r\n", "\x85", "tench", ","))
)
def test_synset_mapping_parses_any_text_or_fails_in_one_line(text):
    try:
        classes = parse_synset_mapping(text, MAPPING)
    except UserError as exc:
        assert_one_line(exc, MAPPING)
        return
    assert isinstance(classes, ClassList) and len(classes) > 0
    assert list(classes.wnids) == sorted(set(classes.wnids)) and all(WNID_RE.match(w) for w in classes.wnids)
    assert len(classes.names) == len(classes.wnids)


@settings(FUZZ, max_examples=150)
@given(st.dictionaries(wnids, st.text().map(lambda t: t.replace("\n", " ")), min_size=1, max_size=30), eols)
@example({"n01440764": "tench\x85n01443537 goldfish"}, "\n")  # splitlines() made two classes of this line
def test_synset_mapping_round_trips_sorted_by_wnid(mapping, eol):
    text = eol.join(f"{w} {name}" for w, name in mapping.items())
    classes = parse_synset_mapping(text, MAPPING)
    assert classes.wnids == tuple(sorted(mapping))
    assert classes.index[min(mapping)] == 0
    assert classes.names == tuple(mapping[w].strip() for w in sorted(mapping))


def test_wnids_are_ascii_digits_and_end_at_the_end():
    assert not WNID_RE.match("n٠١٤٤٠٧٦٤") and not WNID_RE.match("n01440764\n") and WNID_RE.match("n01440764")


# --- _manifest.json ----------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _maybe(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A manifest field: mostly well-formed, sometimes any JSON (what a damaged or hand-edited file holds)."""
    return st.one_of(good, good, json_values)


shard_entries = st.fixed_dictionaries(
    {"path": _maybe(st.text(alphabet="abc/-.", min_size=1, max_size=12))},
    optional={
        "rows": _maybe(st.integers(0, 99)),
        "bytes": _maybe(st.integers(0, 999)),
        "sha256": _maybe(st.text(max_size=4)),
    },
)
split_entries = st.fixed_dictionaries(
    {"num_images": _maybe(st.integers(0, 99)), "shards": _maybe(st.lists(_maybe(shard_entries), max_size=3))}
)
manifests = st.fixed_dictionaries(
    {"format": st.one_of(st.just(MANIFEST_FORMAT), json_values)},
    optional={
        "classes": _maybe(st.lists(wnids, max_size=4)),
        "class_names": _maybe(st.lists(st.text(max_size=6), max_size=4)),
        "options": _maybe(st.fixed_dictionaries({}, optional={"max_side": st.integers(16, 512)})),
        "splits": _maybe(st.dictionaries(st.sampled_from(["train", "val", "x\ny"]), _maybe(split_entries), max_size=2)),
    },
)


def _open_and_read_everything(root: Path) -> None:
    """open_prepared, then every accessor the readers use: values, or one-line UserErrors naming the file."""
    try:
        data = open_prepared(str(root))
    except UserError as exc:
        assert_one_line(exc, MANIFEST_NAME)
        return
    assert data.num_classes == len(data.class_wnids) and all(isinstance(w, str) for w in data.class_wnids)
    for split in ("train", "val", *data.manifest["splits"]):
        try:
            count, (_, paths) = data.num_images(split), data.shard_paths(split)
        except UserError as exc:
            assert_one_line(exc, str(root), split)
            continue
        assert count >= 0 and all(isinstance(p, str) for p in paths)


@settings(FUZZ, max_examples=200)
@given(st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()), st.just(b"[" * 5000)))
@example(b"\xff\xfe")  # was a JSONDecodeError traceback
@example(b"[1]")  # was AttributeError: 'list' object has no attribute 'get'
def test_read_manifest_of_any_bytes_is_a_dict_or_one_line(tmp_path, data):
    (tmp_path / MANIFEST_NAME).write_bytes(data)
    try:
        manifest = read_manifest(str(tmp_path))
    except UserError as exc:
        assert_one_line(exc, MANIFEST_NAME)
        return
    assert isinstance(manifest, dict) and manifest["format"] == MANIFEST_FORMAT


@settings(FUZZ, max_examples=200)
@given(manifests)
@example({"format": MANIFEST_FORMAT})  # was KeyError: 'classes' in num_classes
@example({"format": MANIFEST_FORMAT, "classes": 3, "splits": []})  # was TypeError: no len() of int
@example({"format": MANIFEST_FORMAT, "classes": [], "splits": {"val": {"num_images": 0, "shards": []}}})  # no train
def test_open_prepared_on_any_manifest_is_usable_or_one_line(tmp_path, manifest):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    _open_and_read_everything(tmp_path)


@settings(FUZZ, max_examples=60)
@given(st.lists(wnids, min_size=1, max_size=5, unique=True), st.integers(0, 4), st.integers(0, 4))
def test_a_valid_manifest_round_trips(tmp_path, classes, train_shards, val_shards):
    shards = {
        split: [{"path": f"{split}/{i}.parquet", "rows": 2, "bytes": 10, "sha256": "ab"} for i in range(n)]
        for split, n in (("train", train_shards), ("val", val_shards))
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "classes": sorted(classes),
        "class_names": ["x"] * len(classes),
        "splits": {split: {"num_images": 2 * len(s), "per_class": {}, "shards": s} for split, s in shards.items()},
    }
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    data = open_prepared(str(tmp_path))
    assert data.manifest == manifest and data.class_wnids == sorted(classes)
    for split, s in shards.items():
        assert data.num_images(split) == 2 * len(s)
        assert [p.rsplit("/", 2)[-2:] for p in data.shard_paths(split)[1]] == [e["path"].split("/") for e in s]


# --- config: dotted overrides and YAML files ---------------------------------------------------------------------

KNOWN_KEYS = [
    "train.epochs",
    "optim.lr",
    "data.batch_size",
    "model.channels_last",
    "name",
    "seed",
    "train.use_gpu",
    "data.progressive.start_size",
    "train.num_workers",
    "mlflow.register_model_name",
    "data.node_labels",
]
# YAML's awkward corners: anchors, tags, timestamps, flow collections, YAML 1.1 numbers and booleans.
_YAML_WORDS = "1 0 - . e 5 x true null ~ [ ] { } : , ' \" &a *a !!int !!timestamp !!float !!binary 2001-13-45 .inf 0x _"
yaml_scalars = tokens(" ", *_YAML_WORDS.split())
_YAML_FILE_WORDS = "data:|\n|  |train:| epochs: |- |1|x|&a |*a|{|}|[|]|: |!!int |2001-13-45|\x00|\ufeff"


def _load(overrides: list[str]) -> ExperimentConfig | None:
    try:
        return load_config(None, overrides)
    except ConfigError as exc:  # a UserError with exit code 2: the CLI prints "imagenet-ray: error: <msg>"
        assert_one_line(exc)
        assert exc.exit_code == 2
        return None


@settings(FUZZ, max_examples=200)
@given(
    st.one_of(
        st.text(),
        st.builds("{}={}".format, st.sampled_from(KNOWN_KEYS) | st.text(max_size=12), yaml_scalars | st.text()),
    )
)
@example("seed=2001-13-45")  # was ValueError: month must be in 1..12 (PyYAML's timestamp)
@example("seed=" + "[" * 2000)  # was RecursionError
@example("a\nb=1")  # was a two-line "unknown config key"
def test_any_override_gives_a_config_or_a_one_line_config_error(override):
    cfg = _load([override])
    assert cfg is None or isinstance(cfg, ExperimentConfig)


@settings(FUZZ, max_examples=200)
@given(st.text())
def test_parse_override_splits_the_key_or_refuses(text):
    try:
        path, _ = parse_override(text)
    except ConfigError as exc:
        assert_one_line(exc, repr(text))
        return
    assert path == text.partition("=")[0].strip().split(".") and path != [""]


typed_overrides = st.one_of(
    st.builds(lambda v: ("train.epochs", str(v), v), st.integers(1, 10**6)),
    st.builds(lambda v: ("data.batch_size", str(v), v), st.integers(1, 10**6)),
    st.builds(lambda v: ("seed", str(v), v), st.integers(-(10**12), 10**12)),
    st.builds(lambda v: ("optim.lr", repr(v), v), st.floats(min_value=1e-12, max_value=1e6, exclude_min=True)),
    st.sampled_from(
        [
            ("model.channels_last", "true", True),
            ("model.channels_last", "False", False),
            ("optim.nesterov", "TRUE", True),
        ]
    ),
    st.builds(lambda v: ("name", v, v), st.text(alphabet="ab01._-eExnul", min_size=1, max_size=12)),
)


@settings(FUZZ, max_examples=250)
@given(typed_overrides)
@example(("name", "2024-01-01", "2024-01-01"))  # was "name: Input should be a valid string (got datetime.date(...))"
@example(("name", "-", "-"))  # YAML reads "-" as [None]
@example(("name", "null", "null"))
def test_typed_overrides_round_trip(case):
    key, text, expected = case
    cfg = load_config(None, [f"{key}={text}"])
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "override, problem",
    [
        ("train.epochs=true", "train.epochs: must be a number, not true/false"),  # was 1 epoch
        ("seed=yes", "seed: must be a number, not true/false"),
        ("train.num_workers=on", "train.num_workers: must be a number, not true/false"),
        ("optim.lr=.inf", "optim.lr: Input should be a finite number"),  # was accepted
        ("optim.lr=1e400", "optim.lr: Input should be a finite number"),
    ],
)
def test_numbers_refuse_booleans_and_infinity(override, problem):
    with pytest.raises(ConfigError, match=problem):
        load_config(None, [override])


def test_an_optional_section_takes_dotted_overrides():
    # was "unknown config key 'data.progressive.start_size'": the section is `ProgressiveResize | None`
    cfg = load_config(None, ["data.train_crop=192", "data.progressive.start_size=128", "data.progressive.end_epoch=4"])
    progressive = cfg.data.progressive
    assert progressive is not None and (progressive.start_size, progressive.end_epoch) == (128, 4)


def test_optional_text_fields_take_the_text_as_written():
    assert load_config(None, ["mlflow.register_model_name=2024"]).mlflow.register_model_name == "2024"
    assert load_config(None, ["mlflow.register_model_name=null"]).mlflow.register_model_name is None


SECTIONS = {
    "": ExperimentConfig,
    **{k: type(getattr(ExperimentConfig(), k)) for k in ("data", "model", "optim", "train", "eval", "mlflow")},
}


@settings(FUZZ, max_examples=200)
@given(
    st.sampled_from(sorted(SECTIONS)),
    st.text(min_size=1, max_size=10),
    st.lists(st.text(max_size=5), max_size=2),
    yaml_scalars,
)
def test_unknown_keys_always_fail(section, name, more, value):
    fields = SECTIONS[section].model_fields
    key = name.strip()
    if not key or "=" in name or "." in name or key in fields:
        key = "no_such_key"
    dotted = ".".join([*filter(None, [section]), key])
    override = f"{'.'.join([dotted, *more])}={value}"
    with pytest.raises(ConfigError, match="unknown config key") as info:
        load_config(None, [override])
    assert repr(dotted) in assert_one_line(info.value)


config_trees = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | st.dates(),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["data", "train", "optim", "epochs", "lr", "node_labels", "a\nb", "extends"])
            | st.text(max_size=4),
            inner,
            max_size=3,
        )
    ),
    max_leaves=10,
)


@settings(FUZZ, max_examples=300)
@given(
    st.one_of(
        st.text(),
        yaml_scalars.map(lambda t: "seed: " + t),
        tokens(*_YAML_FILE_WORDS.split("|")),
        config_trees.map(lambda t: yaml.safe_dump(t, allow_unicode=True)),
    )
)
@example("seed: 2001-13-45")  # was ValueError: month must be in 1..12
@example("seed: !!timestamp x")  # was AttributeError
@example("seed: !!int x")  # was ValueError
@example("&a {data: *a}")  # was RecursionError (a mapping that contains itself)
@example('extends: "a\\0b"')  # was ValueError: embedded null byte
@example('"a\\nb": 1')  # was a two-line "unknown config key"
def test_any_yaml_file_gives_a_config_or_a_one_line_config_error(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert_one_line(exc, str(path))
        return
    assert isinstance(cfg, ExperimentConfig)


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\n")  # was UnicodeDecodeError
    with pytest.raises(ConfigError, match="not readable as UTF-8 text") as info:
        load_config(path)
    assert_one_line(info.value, str(path))


@settings(FUZZ, max_examples=100)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "name": st.text(alphabet="abcXYZ019._-", min_size=1, max_size=10),
            "seed": st.integers(-(2**40), 2**40),
            "train": st.fixed_dictionaries(
                {}, optional={"epochs": st.integers(1, 1000), "num_workers": st.integers(1, 64)}
            ),
            "optim": st.fixed_dictionaries({}, optional={"lr": st.floats(1e-9, 10.0), "nesterov": st.booleans()}),
            "data": st.fixed_dictionaries(
                {},
                optional={
                    "batch_size": st.integers(1, 4096),
                    "node_labels": st.dictionaries(st.text(min_size=1, max_size=5), st.text(max_size=5), max_size=2),
                },
            ),
        },
    )
)
def test_a_valid_yaml_tree_round_trips(tmp_path, tree):
    path = tmp_path / "valid.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    cfg = load_config(path)
    for section, values in tree.items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert getattr(getattr(cfg, section), key) == value
        else:
            assert getattr(cfg, section) == values
