"""Shard integrity without Ray: the pre-flight size check against the manifest, page checksums written by
prepare and verified on read, the reader's corrupt-shard message, verify's page diagnosis."""

from __future__ import annotations

import hashlib
import io
import json
import logging

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from imagenet_ray import storage
from imagenet_ray.data.format import (
    MANIFEST_FORMAT,
    PAGE_CHECKSUMS_KEY,
    SHARD_SCHEMA,
    check_shard_sizes,
    open_prepared,
    shard_name,
    write_manifest,
)
from imagenet_ray.data.pipeline import open_source
from imagenet_ray.data.prepare import encode_shard
from imagenet_ray.data.verify import verify
from imagenet_ray.errors import UserError


def _rows(jpeg_bytes, n: int = 6) -> list[dict]:
    return [
        {"image": jpeg_bytes(40 + i, 30), "label": i % 3, "wnid": f"n{i % 3:08d}", "key": f"k{i}", "height": 30}
        | {"width": 40 + i}
        for i in range(n)
    ]


def _flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


def _inside_an_image(shard: bytes, image: bytes) -> int:
    """An offset in the middle of `image`'s bytes in the shard: inside a data page (no compression)."""
    start = shard.find(image)
    assert start > 0 and shard.find(image, start + 1) == -1
    return start + len(image) // 2


def _dataset(tmp_path, jpeg_bytes, *, sizes: bool = True, splits=("train", "val")) -> dict:
    """A prepared dataset on disk: one shard per split, written by prepare's encoder; its manifest."""
    manifest: dict = {"format": MANIFEST_FORMAT, "classes": ["n00000000", "n00000001", "n00000002"], "splits": {}}
    manifest[PAGE_CHECKSUMS_KEY] = True
    for split in splits:
        payload = encode_shard(_rows(jpeg_bytes), rows_per_group=4)
        path = shard_name(split, 0, 1)
        (tmp_path / split).mkdir()
        (tmp_path / path).write_bytes(payload)
        entry = {"path": path, "rows": 6, "sha256": hashlib.sha256(payload).hexdigest()}
        if sizes:
            entry["bytes"] = len(payload)
        manifest["splits"][split] = {"num_images": 6, "per_class": {}, "shards": [entry]}
    write_manifest(storage.resolve(str(tmp_path)), manifest)
    return manifest


def test_prepare_writes_page_checksums_and_a_flipped_page_byte_fails_a_verified_read(jpeg_bytes):
    rows = _rows(jpeg_bytes)
    shard = encode_shard(rows, rows_per_group=4)
    bad = _flip(shard, _inside_an_image(shard, rows[2]["image"]))
    # Without verification the flip goes unnoticed: the read succeeds with another image.
    silent = pq.read_table(io.BytesIO(bad)).column("image").to_pylist()
    assert silent[2] != rows[2]["image"] and silent[:2] == [r["image"] for r in rows[:2]]
    with pytest.raises(OSError, match="CRC checksum verification failed"):
        pq.read_table(io.BytesIO(bad), page_checksum_verification=True)
    # The intact shard reads with verification.
    assert pq.read_table(io.BytesIO(shard), page_checksum_verification=True).num_rows == len(rows)


def test_a_shard_without_page_checksums_still_reads_with_verification(jpeg_bytes):
    """Older preparations wrote no checksums: verification skips pages that carry none."""
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(_rows(jpeg_bytes), schema=SHARD_SCHEMA), sink, compression="none")
    assert pq.read_table(io.BytesIO(sink.getvalue()), page_checksum_verification=True).num_rows == 6


def test_intact_dataset_passes_the_size_check(tmp_path, jpeg_bytes):
    _dataset(tmp_path, jpeg_bytes)
    check_shard_sizes(open_prepared(str(tmp_path)))
    assert open_source(str(tmp_path), "prepared").num_images("train") == 6


def test_a_shard_of_another_size_is_refused_in_one_line_naming_it(tmp_path, jpeg_bytes):
    manifest = _dataset(tmp_path, jpeg_bytes)
    path = manifest["splits"]["val"]["shards"][0]["path"]
    expected = manifest["splits"]["val"]["shards"][0]["bytes"]
    (tmp_path / path).write_bytes((tmp_path / path).read_bytes()[:-10])  # truncated
    with pytest.raises(UserError) as err:
        open_source(str(tmp_path), "prepared")  # what train calls, before Ray starts
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / path}: expected {expected:,} bytes (manifest), found {expected - 10:,}")
    assert "imagenet-ray prepare" in message and f"imagenet-ray verify {tmp_path}" in message
    # Only the splits asked for are checked (evaluate reads val only).
    check_shard_sizes(open_prepared(str(tmp_path)), splits=["train"])


def test_a_missing_shard_is_refused_naming_it(tmp_path, jpeg_bytes):
    manifest = _dataset(tmp_path, jpeg_bytes)
    path = manifest["splits"]["train"]["shards"][0]["path"]
    (tmp_path / path).unlink()
    with pytest.raises(UserError, match=r"shard-00000-of-00001\.parquet: missing \(listed in the manifest\)"):
        check_shard_sizes(open_prepared(str(tmp_path)))
    (tmp_path / "train").rmdir()  # a whole split folder gone: the same error, from the same one listing
    with pytest.raises(UserError, match=rf"^{tmp_path / path}: missing"):
        check_shard_sizes(open_prepared(str(tmp_path)))


def test_several_bad_shards_are_counted_after_the_first(tmp_path, jpeg_bytes):
    manifest = _dataset(tmp_path, jpeg_bytes)
    for split in ("train", "val"):
        (tmp_path / manifest["splits"][split]["shards"][0]["path"]).unlink()
    with pytest.raises(UserError, match=r"missing \(listed in the manifest\); 1 more shard\(s\) missing or of the"):
        check_shard_sizes(open_prepared(str(tmp_path)))


def test_an_older_manifest_without_sizes_is_checked_for_presence_only(tmp_path, jpeg_bytes, caplog):
    manifest = _dataset(tmp_path, jpeg_bytes, sizes=False)
    del manifest[PAGE_CHECKSUMS_KEY]
    write_manifest(storage.resolve(str(tmp_path)), manifest)
    path = manifest["splits"]["train"]["shards"][0]["path"]
    (tmp_path / path).write_bytes((tmp_path / path).read_bytes() + b"x")  # no size to compare with
    with caplog.at_level(logging.INFO, logger="imagenet_ray.data.format"):
        check_shard_sizes(open_prepared(str(tmp_path)))
    assert "records no shard sizes" in caplog.text and "no Parquet page checksums" in caplog.text
    (tmp_path / path).unlink()
    with pytest.raises(UserError, match="missing"):
        check_shard_sizes(open_prepared(str(tmp_path)))


def test_the_check_lists_each_shard_folder_once(tmp_path, jpeg_bytes, monkeypatch):
    """One listing per folder, never one request per shard (about 1,000 shards per split on S3)."""
    manifest = _dataset(tmp_path, jpeg_bytes)
    extra = manifest["splits"]["train"]["shards"][0]
    manifest["splits"]["train"]["shards"] = [extra] * 50  # 50 entries, one folder
    write_manifest(storage.resolve(str(tmp_path)), manifest)
    data = open_prepared(str(tmp_path))
    real = storage.resolve(str(tmp_path))
    calls: list[object] = []

    class CountingFs:
        def get_file_info(self, what):
            calls.append(what)
            return real.fs.get_file_info(what)

    monkeypatch.setattr(storage, "resolve", lambda url: storage.Location(real.url, CountingFs(), real.path))
    check_shard_sizes(data)
    assert len(calls) == 2 and all(isinstance(c, pafs.FileSelector) for c in calls), calls  # train/ and val/


def test_a_manifest_records_page_checksums_only_when_every_shard_has_them():
    from imagenet_ray.data.classes import imagenet_classes
    from imagenet_ray.data.layouts import LayoutListing
    from imagenet_ray.data.prepare import PrepareOptions, build_manifest

    classes = imagenet_classes().subset(list(imagenet_classes().wnids[:1]))
    listing = LayoutListing("folders", "file:///src", classes, (), ())
    receipt = {
        "split": "train",
        "path": shard_name("train", 0, 2),
        "rows": 0,
        "bytes": 1,
        "sha256": "a",
        "per_class": {},
    }
    new = {**receipt, "path": shard_name("train", 1, 2), PAGE_CHECKSUMS_KEY: True}
    assert build_manifest(listing, [new], PrepareOptions())[PAGE_CHECKSUMS_KEY] is True
    # A resume that kept a shard written before checksums existed.
    assert build_manifest(listing, [receipt, new], PrepareOptions())[PAGE_CHECKSUMS_KEY] is False


def test_the_reader_turns_a_checksum_error_into_one_naming_the_corrupt_shard(tmp_path, jpeg_bytes):
    from imagenet_ray.data.shard_reader import _read_naming_shard

    rows = _rows(jpeg_bytes)
    good = encode_shard(rows, rows_per_group=4)
    (tmp_path / "a.parquet").write_bytes(good)
    (tmp_path / "b.parquet").write_bytes(_flip(good, _inside_an_image(good, rows[4]["image"])))
    fs = storage.resolve(str(tmp_path)).fs
    shards = [(str(tmp_path / n), f"s3://bucket/ds/train/{n}") for n in ("a.parquet", "b.parquet")]

    def failing_read():
        yield pa.table({"x": [1]})
        raise OSError("could not verify page integrity, CRC checksum verification failed for page_ordinal 0")

    # A read task with two shards: the corrupt one is found by reading each again with verification.
    with pytest.raises(UserError) as err:
        list(_read_naming_shard(failing_read, fs, shards, "s3://bucket/ds"))
    message = str(err.value)
    assert message.startswith("s3://bucket/ds/train/b.parquet: corrupt shard (could not verify page integrity, CRC")
    assert "imagenet-ray verify s3://bucket/ds" in message and "\n" not in message
    assert isinstance(err.value.__cause__, OSError)

    def unreachable():
        raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation")
        yield

    with pytest.raises(OSError, match="NETWORK_CONNECTION"):  # not a corruption: passed through as it is
        list(_read_naming_shard(unreachable, fs, shards[:1], "s3://bucket/ds"))


def test_verify_says_which_page_fails_for_a_sha256_mismatch(tmp_path, jpeg_bytes):
    manifest = _dataset(tmp_path, jpeg_bytes)
    path = tmp_path / manifest["splits"]["train"]["shards"][0]["path"]
    data = path.read_bytes()
    image = pq.read_table(io.BytesIO(data)).column("image")[1].as_py()
    path.write_bytes(_flip(data, _inside_an_image(data, image)))
    checked, bad = verify(str(tmp_path))
    assert checked == 2 and len(bad) == 1
    assert bad[0].problem is not None and bad[0].problem.startswith("sha256 mismatch (could not verify page integrity")
    assert json.loads((tmp_path / "_manifest.json").read_text())[PAGE_CHECKSUMS_KEY] is True


def test_a_corrupt_shard_error_stays_one_line_when_ray_appends_its_retry_guidance():
    import pickle

    from imagenet_ray.data.shard_reader import CorruptShardError

    err = CorruptShardError("s3://b/ds/train/x.parquet: corrupt shard (CRC checksum verification failed)")
    err.args = (f"{err.args[0]}\nFailed to apply UDF transform after 1/1 attempts (total backoff 0.0s).",)  # Ray's way
    again = pickle.loads(pickle.dumps(err))  # how it travels from a Ray worker
    for e in (err, again):
        assert str(e) == "s3://b/ds/train/x.parquet: corrupt shard (CRC checksum verification failed)"
        assert isinstance(e, UserError)
