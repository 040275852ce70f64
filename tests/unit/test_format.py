"""The prepared-dataset format: names, manifest read/write, the reader's sizing and the source protocol (no Ray)."""

from __future__ import annotations

import json

import pytest

from imagenet_ray import storage
from imagenet_ray.data.classes import imagenet_classes
from imagenet_ray.data.format import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    RECEIPTS_DIR,
    SHARD_SCHEMA,
    DatasetSource,
    PreparedDataset,
    open_prepared,
    read_blocks,
    read_manifest,
    receipt_name,
    shard_name,
    write_manifest,
)
from imagenet_ray.data.layouts import ImageRecord, LayoutListing
from imagenet_ray.data.pipeline import RawLayoutDataset
from imagenet_ray.errors import UserError


def _manifest() -> dict:
    shards = [{"path": shard_name("train", i, 2), "rows": 3, "bytes": 10, "sha256": "a" * 64} for i in range(2)]
    return {
        "format": MANIFEST_FORMAT,
        "classes": ["n01440764", "n01443537"],
        "splits": {
            "train": {"num_images": 6, "per_class": {}, "shards": shards},
            "val": {"num_images": 0, "per_class": {}, "shards": []},
        },
    }


def test_shard_name_sorts_in_index_order():
    assert shard_name("train", 3, 120) == "train/shard-00003-of-00120.parquet"
    names = [shard_name("val", i, 12) for i in range(12)]
    assert sorted(names) == names


def test_receipt_name_mirrors_the_shard_under_the_receipts_folder():
    assert receipt_name("train/shard-00003-of-00120.parquet") == f"{RECEIPTS_DIR}/train/shard-00003-of-00120.json"


def test_shard_schema_columns():
    assert SHARD_SCHEMA.names == ["image", "label", "wnid", "key", "height", "width"]
    assert str(SHARD_SCHEMA.field("label").type) == "int16"


def test_read_blocks_asks_for_one_block_per_shard_only_when_shards_can_fill_the_cpus():
    assert read_blocks(1100, 64) == 1100  # the full dataset: one fused read+decode task per shard
    assert read_blocks(66, 2) == 66
    assert read_blocks(8, 4) == 8
    assert read_blocks(7, 4) is None  # too few shards: let Ray split the read for parallelism
    assert read_blocks(1, 0) is None
    mib = 2**20
    assert read_blocks(1100, 64, 1100 * 128 * mib) == 1100  # ImageNet's 128 MB shards: one task each
    assert read_blocks(1024, 2, 1024 * 600_000) == 37  # 0.6 MB shards: ~16 MiB a task (1,024 tasks cost 4x)
    assert read_blocks(1024, 64, 1024 * 600_000) == 128  # but never fewer than 2 per CPU
    assert read_blocks(10, 2, 10 * mib) == 4


def test_manifest_round_trip_and_the_prepared_dataset_view(tmp_path):
    write_manifest(storage.resolve(str(tmp_path)), _manifest())
    assert json.loads((tmp_path / MANIFEST_NAME).read_text()) == _manifest()
    assert read_manifest(str(tmp_path)) == _manifest()
    data = open_prepared(str(tmp_path))
    assert data.num_classes == 2 and data.class_wnids == ["n01440764", "n01443537"]
    assert data.num_images("train") == 6 and data.num_images("val") == 0
    _, paths = data.shard_paths("train")
    assert [p.rsplit("/", 2)[-2:] for p in paths] == [
        ["train", "shard-00000-of-00002.parquet"],
        ["train", "shard-00001-of-00002.parquet"],
    ]


def test_a_dataset_without_a_manifest_or_with_another_format_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"no _manifest\.json"):
        read_manifest(str(tmp_path))
    write_manifest(storage.resolve(str(tmp_path)), {**_manifest(), "format": "something-else"})
    with pytest.raises(UserError, match="unknown format 'something-else'"):
        read_manifest(str(tmp_path))


def test_prepared_and_raw_sources_satisfy_the_dataset_source_protocol():
    classes = imagenet_classes().subset(["n01440764"])
    record = ImageRecord("train/n01440764/a.JPEG", "n01440764", 0, 10)
    raw = RawLayoutDataset("file:///src", LayoutListing("folders", "file:///src", classes, (record,), ()))
    assert isinstance(raw, DatasetSource) and raw.num_images("train") == 1 and raw.num_classes == 1
    assert isinstance(PreparedDataset("file:///p", _manifest()), DatasetSource)
