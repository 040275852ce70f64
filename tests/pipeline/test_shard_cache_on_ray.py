"""The train dataset read through the node-local shard cache on a local Ray: every row once per epoch, and the
second epoch reads nothing from the base filesystem (its shards are moved away after the first)."""

import dataclasses
import hashlib
import shutil
from collections import Counter

import pyarrow.parquet as pq
import pytest

from imagenet_ray.data.format import open_prepared
from imagenet_ray.data.pipeline import build_train_dataset
from imagenet_ray.data.shard_cache import ShardCache, manifest_key

pytestmark = pytest.mark.ray


def _epoch(ds) -> Counter:
    return Counter(
        hashlib.sha1(image).hexdigest()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy")
        for image in batch["image"]
    )


def test_the_second_epoch_reads_every_row_from_the_cache_and_nothing_from_the_base(local_ray, prepared, tmp_path):
    root, manifest = prepared
    remote = tmp_path / "remote"  # a copy: its shards are moved away below
    shutil.copytree(root, remote)
    shards = [remote / s["path"] for s in manifest["splits"]["train"]["shards"]]
    assert len(shards) >= 2
    expected = Counter(
        hashlib.sha1(image.as_py()).hexdigest() for s in shards for image in pq.read_table(s, columns=["image"])[0]
    )
    assert sum(expected.values()) == manifest["splits"]["train"]["num_images"]
    # A local dataset is not cached by open_prepared (it says so); set on the dataset, the cache layer runs
    # over the LocalFileSystem as it would over S3.
    cache = tmp_path / "cache"
    data = dataclasses.replace(open_prepared(str(remote)), shard_cache=ShardCache(str(cache), min_free_bytes=0))
    ds = build_train_dataset(data, crop=16, seed=1, decode_on="gpu")  # JPEG bytes: rows comparable by digest

    assert _epoch(ds) == expected
    copies = sorted((cache / manifest_key(data.manifest)).rglob("*.parquet"))
    assert [c.relative_to(cache / manifest_key(data.manifest)) for c in copies] == [
        s.relative_to(remote) for s in sorted(shards)
    ]
    stats = [(c.stat().st_ino, c.stat().st_mtime_ns) for c in copies]
    for s in shards:
        s.rename(s.with_suffix(".moved"))  # any read of the base's shards now fails

    assert _epoch(ds) == expected
    assert [(c.stat().st_ino, c.stat().st_mtime_ns) for c in copies] == stats  # not copied again
