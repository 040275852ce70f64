"""The node-local shard cache (data/shard_cache.py) over a LocalFileSystem subtree standing in for S3: the first
read copies a shard, later reads take nothing from the base; a wrong-size copy is replaced, leftovers of
killed copies are never read, a full cache reads through, and the filesystem pickles. No Ray."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections import Counter

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from imagenet_ray.config import load_config
from imagenet_ray.data import shard_cache
from imagenet_ray.data.format import MANIFEST_FORMAT, MANIFEST_NAME, cached_url_filesystem, open_prepared
from imagenet_ray.data.shard_cache import ShardCache, manifest_key
from imagenet_ray.errors import ConfigError
from imagenet_ray.storage import TMP_MARKER

SHARDS = {"train/shard-00000-of-00002.parquet": 3000, "train/shard-00001-of-00002.parquet": 2000}
SHARDS_LIST = list(SHARDS)


class CountingHandler(pafs.FileSystemHandler):
    """A LocalFileSystem that counts the bytes read from each path (whole files: what an open hands out)."""

    def __init__(self) -> None:
        self.local = pafs.LocalFileSystem()
        self.bytes_read: Counter[str] = Counter()

    def _read(self, path: str) -> pa.BufferReader:
        with self.local.open_input_stream(path) as f:
            data = f.read()
        self.bytes_read[path] += len(data)
        return pa.BufferReader(data)

    def open_input_file(self, path):
        return self._read(path)

    def open_input_stream(self, path):
        return self._read(path)

    def get_type_name(self):
        return "counting"

    def normalize_path(self, path):
        return self.local.normalize_path(path)

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise NotImplementedError

    def delete_file(self, path):
        self.local.delete_file(path)

    def move(self, src, dest):
        self.local.move(src, dest)

    def copy_file(self, src, dest):
        self.local.copy_file(src, dest)

    def open_output_stream(self, path, metadata):
        return self.local.open_output_stream(path)

    def open_append_stream(self, path, metadata):
        raise NotImplementedError


def _write_dataset(root, seed: int = 0) -> dict:
    """Shards of random bytes (the cache never parses them) and a manifest recording their sizes and digests."""
    shards = []
    for i, (path, size) in enumerate(SHARDS.items()):
        data = hashlib.sha256(f"{seed}-{i}".encode()).digest() * (size // 32 + 1)
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data[:size])
        shards.append({"path": path, "rows": 1, "bytes": size, "sha256": hashlib.sha256(data[:size]).hexdigest()})
    manifest = {
        "format": MANIFEST_FORMAT,
        "created_unix": seed,
        "classes": ["n01"],
        "splits": {"train": {"num_images": len(shards), "shards": shards}},
    }
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return manifest


@pytest.fixture(autouse=True)
def _fresh_process(monkeypatch):
    """Each test as a new process: no table or log line remembered from another."""
    monkeypatch.setattr(shard_cache, "_TABLES", {})
    monkeypatch.setattr(shard_cache, "_UNCOPIED", {})
    monkeypatch.setattr(shard_cache, "_SAID", set())


@pytest.fixture
def remote(tmp_path):
    root = tmp_path / "remote"
    root.mkdir()
    return root, _write_dataset(root)


def _cached(root, manifest, cache_dir, **kw) -> tuple[pafs.FileSystem, CountingHandler]:
    counting = CountingHandler()
    fs = ShardCache(str(cache_dir), **{"min_free_bytes": 0, **kw}).wrap(
        pafs.PyFileSystem(counting), str(root), str(root / MANIFEST_NAME), manifest
    )
    return fs, counting


def _files(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_the_first_open_copies_the_shard_and_the_second_reads_nothing_from_the_base(remote, tmp_path):
    root, manifest = remote
    fs, counting = _cached(root, manifest, tmp_path / "cache")
    path = str(root / "train/shard-00000-of-00002.parquet")
    with fs.open_input_file(path) as f:
        first = f.read()
    assert first == (root / "train/shard-00000-of-00002.parquet").read_bytes()
    assert counting.bytes_read[path] == 3000
    key = manifest_key(manifest)
    assert _files(tmp_path / "cache") == [f"{key}/_manifest.json", f"{key}/train/shard-00000-of-00002.parquet"]
    for opener in (fs.open_input_file, fs.open_input_stream):
        with opener(path) as f:
            assert f.read() == first
    assert counting.bytes_read[path] == 3000  # both later opens came from the local copy
    assert sum(counting.bytes_read.values()) == 3000 + (root / MANIFEST_NAME).stat().st_size  # + one manifest read


def test_what_is_not_a_shard_of_the_manifest_is_read_from_the_base_uncached(remote, tmp_path):
    root, manifest = remote
    fs, counting = _cached(root, manifest, tmp_path / "cache")
    (root / "train/extra.parquet").write_bytes(b"x" * 10)
    for path in (str(root / MANIFEST_NAME), str(root / "train/extra.parquet")):
        for _ in range(2):
            with fs.open_input_stream(path) as f:
                f.read()
    assert counting.bytes_read[str(root / "train/extra.parquet")] == 20
    assert not any(p.endswith(".parquet") for p in _files(tmp_path / "cache"))
    assert fs.get_file_info(str(root / "train/extra.parquet")).size == 10  # the rest: the base's


@pytest.mark.parametrize("damage", ["truncated", "longer"])
def test_a_copy_of_another_size_than_the_manifest_records_is_copied_again(remote, tmp_path, damage):
    root, manifest = remote
    fs, counting = _cached(root, manifest, tmp_path / "cache")
    path = str(root / "train/shard-00001-of-00002.parquet")
    with fs.open_input_file(path) as f:
        good = f.read()
    local = tmp_path / "cache" / manifest_key(manifest) / "train/shard-00001-of-00002.parquet"
    local.write_bytes(good[:100] if damage == "truncated" else good + b"stale")  # a partial or stale copy
    with fs.open_input_file(path) as f:
        assert f.read() == good
    assert counting.bytes_read[path] == 2 * 2000 and local.read_bytes() == good


def test_a_leftover_temporary_file_is_never_read_and_is_removed_once_stale(remote, tmp_path):
    root, manifest = remote
    fs, counting = _cached(root, manifest, tmp_path / "cache")
    folder = tmp_path / "cache" / manifest_key(manifest) / "train"
    folder.mkdir(parents=True)
    leftover = folder / f"shard-00000-of-00002.parquet{TMP_MARKER}4242-deadbeef"  # a killed task's copy
    leftover.write_bytes(b"partial")
    path = str(root / "train/shard-00000-of-00002.parquet")
    with fs.open_input_file(path) as f:
        assert f.read() == (root / "train/shard-00000-of-00002.parquet").read_bytes()
    assert counting.bytes_read[path] == 3000
    assert leftover.exists()  # young: it could be another task's copy in progress
    old = leftover.stat().st_mtime - shard_cache.STALE_TMP_S - 60
    os.utime(leftover, (old, old))
    with fs.open_input_file(str(root / "train/shard-00001-of-00002.parquet")):  # the next copy's scan
        pass
    assert not leftover.exists()
    assert not any(TMP_MARKER in p for p in _files(tmp_path / "cache"))


@pytest.mark.parametrize("limit", [{"max_gb": 1e-9}, {"min_free_bytes": 1 << 62}], ids=["size limit", "disk full"])
def test_a_full_cache_reads_through_without_error_and_writes_nothing(remote, tmp_path, limit, caplog):
    root, manifest = remote
    fs, counting = _cached(root, manifest, tmp_path / "cache", **limit)
    path = str(root / "train/shard-00000-of-00002.parquet")
    with caplog.at_level(logging.WARNING, logger=shard_cache.__name__):
        for _ in range(2):
            with fs.open_input_file(path) as f:
                assert f.read() == (root / "train/shard-00000-of-00002.parquet").read_bytes()
    assert counting.bytes_read[path] == 2 * 3000
    assert _files(tmp_path / "cache") == []
    assert len([r for r in caplog.records if "reading shards through" in r.getMessage()]) == 1  # once, not per read


def test_the_cache_disk_failing_during_a_copy_reads_through_and_leaves_nothing(remote, tmp_path, monkeypatch):
    root, manifest = remote
    fs, counting = _cached(root, manifest, tmp_path / "cache")

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shard_cache.os, "fsync", no_space)
    path = str(root / "train/shard-00000-of-00002.parquet")
    with fs.open_input_file(path) as f:
        assert f.read() == (root / "train/shard-00000-of-00002.parquet").read_bytes()
    assert counting.bytes_read[path] == 2 * 3000  # the failed copy, then the direct read
    assert [p for p in _files(tmp_path / "cache") if p.endswith(".parquet") or TMP_MARKER in p] == []


def test_an_error_of_the_base_is_raised_as_a_direct_read_would(remote, tmp_path):
    root, manifest = remote
    fs, _ = _cached(root, manifest, tmp_path / "cache")
    (root / "train/shard-00000-of-00002.parquet").unlink()
    with pytest.raises(FileNotFoundError):
        fs.open_input_file(str(root / "train/shard-00000-of-00002.parquet"))
    assert [p for p in _files(tmp_path / "cache") if p.endswith(".parquet") or TMP_MARKER in p] == []


def test_bytes_that_differ_from_the_manifest_are_never_cached(remote, tmp_path):
    root, manifest = remote
    fs, counting = _cached(root, manifest, tmp_path / "cache")
    shard = root / "train/shard-00000-of-00002.parquet"
    flipped = bytearray(shard.read_bytes())
    flipped[1500] ^= 0x01  # same size: only the SHA-256 tells
    shard.write_bytes(bytes(flipped))
    with fs.open_input_file(str(shard)) as f:
        assert f.read() == bytes(flipped)  # the base's bytes, for the reader's page checksums to judge
    assert counting.bytes_read[str(shard)] == 2 * 3000  # the copy checked and dropped, then the direct read
    assert not any(p.endswith(".parquet") for p in _files(tmp_path / "cache"))


def test_the_filesystem_pickles_and_a_new_process_reads_nothing_from_the_base(remote, tmp_path, monkeypatch):
    root, manifest = remote
    fs, _ = _cached(root, manifest, tmp_path / "cache")
    path = str(root / "train/shard-00000-of-00002.parquet")
    with fs.open_input_file(path) as f:
        expected = f.read()
    monkeypatch.setattr(shard_cache, "_TABLES", {})  # a Ray worker: no table in memory, the node's files on disk
    copy = pickle.loads(pickle.dumps(fs))
    with copy.open_input_file(path) as f:
        assert f.read() == expected
    assert sum(copy.handler.base.handler.bytes_read.values()) == sum(fs.handler.base.handler.bytes_read.values())
    # and one whose node has no copy yet fetches the manifest and the shard itself
    other = ShardCache(str(tmp_path / "other"), min_free_bytes=0)
    plain = other.wrap(pafs.LocalFileSystem(), str(root), str(root / MANIFEST_NAME), manifest)
    fresh = pickle.loads(pickle.dumps(plain))
    assert fresh == plain
    with fresh.open_input_file(path) as f:
        assert f.read() == expected
    assert (tmp_path / "other" / manifest_key(manifest) / "train/shard-00000-of-00002.parquet").exists()


def test_the_key_changes_when_the_dataset_is_prepared_again(remote, tmp_path):
    root, manifest = remote
    assert manifest_key(json.loads(json.dumps(manifest, sort_keys=True))) == manifest_key(manifest)  # not the order
    assert manifest_key({**manifest, "created_unix": 1}) != manifest_key(manifest)
    fs, _ = _cached(root, manifest, tmp_path / "cache")
    path = str(root / "train/shard-00000-of-00002.parquet")
    with fs.open_input_file(path) as f:
        old = f.read()
    again = _write_dataset(root, seed=1)  # same paths and sizes, other bytes
    assert manifest_key(again) != manifest_key(manifest)
    fs2, counting = _cached(root, again, tmp_path / "cache")
    with fs2.open_input_file(path) as f:
        new = f.read()
    assert new != old and new == (root / "train/shard-00000-of-00002.parquet").read_bytes()
    assert counting.bytes_read[path] == 3000  # copied again, into its own directory
    assert {p.split("/")[0] for p in _files(tmp_path / "cache")} == {manifest_key(manifest), manifest_key(again)}


def test_a_job_whose_dataset_was_prepared_again_meanwhile_reads_through(remote, tmp_path):
    root, manifest = remote
    _write_dataset(root, seed=1)  # after the driver read `manifest`, before any read task ran
    fs, counting = _cached(root, manifest, tmp_path / "cache")
    path = str(root / "train/shard-00000-of-00002.parquet")
    with fs.open_input_file(path) as f:
        assert f.read() == (root / "train/shard-00000-of-00002.parquet").read_bytes()
    assert counting.bytes_read[path] == 3000 and _files(tmp_path / "cache") == []  # no copy attempted


def test_open_prepared_caches_only_a_remote_dataset_and_says_so(remote, caplog):
    root, _ = remote
    with caplog.at_level(logging.INFO):
        data = open_prepared(str(root), ShardCache("/mnt/shard-cache"))
    assert data.shard_cache is None
    assert "is local: its shards are read directly, not cached" in caplog.text
    assert open_prepared(str(root)).shard_cache is None


def test_the_benchmark_hook_gives_a_cached_filesystem_for_a_url(remote, tmp_path):
    root, manifest = remote
    fs = cached_url_filesystem(str(root), str(tmp_path / "cache"), max_gb=1)
    _, paths = open_prepared(str(root)).shard_paths("train")
    with fs.open_input_file(paths[0]) as f:
        assert f.read() == (root / SHARDS_LIST[0]).read_bytes()
    assert (tmp_path / "cache" / manifest_key(manifest) / SHARDS_LIST[0]).exists()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.shard_cache_dir=s3://bucket/cache", "data.shard_cache_dir: must be a local directory on each node"),
        ("data.shard_cache_dir=cache", "data.shard_cache_dir: must be an absolute local path"),
        ("data.shard_cache_max_gb=0", "data.shard_cache_max_gb: Input should be greater than 0"),
        ("data.shard_cache_max_gb=true", "data.shard_cache_max_gb: must be a number"),
    ],
)
def test_a_bad_cache_setting_is_one_line_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_the_cache_is_off_by_default_and_takes_a_local_directory():
    assert load_config(None).data.shard_cache_dir is None
    cfg = load_config(None, ["data.shard_cache_dir=/mnt/shard-cache", "data.shard_cache_max_gb=2.5"])
    assert (cfg.data.shard_cache_dir, cfg.data.shard_cache_max_gb) == ("/mnt/shard-cache", 2.5)
