"""Pure parts of `prepare`: the seeded shard plan, shard names, the manifest (no Ray)."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from imagenet_ray.data.classes import imagenet_classes
from imagenet_ray.data.format import MANIFEST_FORMAT, shard_name
from imagenet_ray.data.layouts import ImageRecord, LayoutListing
from imagenet_ray.data.prepare import PrepareOptions, build_manifest, build_report, build_shard_table, plan_shards

CLASSES = imagenet_classes().subset(list(imagenet_classes().wnids[:10]))


def _records(per_class: int = 20, size=lambda c, n: 1000 + 37 * c + 11 * n, split: str = "train"):
    return tuple(
        ImageRecord(f"{split}/{w}/{w}_{n}.JPEG", w, c, size(c, n))
        for c, w in enumerate(CLASSES.wnids)
        for n in range(per_class)
    )


def test_plan_covers_every_record_exactly_once():
    records = _records()
    shards = plan_shards(records, target_bytes=10_000, seed=0)
    flat = [r for shard in shards for r in shard]
    assert len(flat) == len(records) == 200
    assert Counter(flat) == Counter(records)
    assert all(shard for shard in shards)


def test_plan_is_deterministic_per_seed():
    records = _records()
    a = plan_shards(records, 10_000, seed=1)
    b = plan_shards(records, 10_000, seed=1)
    c = plan_shards(records, 10_000, seed=2)
    assert a == b
    assert [r.key for s in a for r in s] != [r.key for s in c for r in s]


def test_plan_respects_target_bytes():
    records = _records()
    target = 7_000
    shards = plan_shards(records, target, seed=0)
    for shard in shards:
        assert sum(r.size for r in shard) <= target
    # greedy packing: adding the next shard's first record would have overflowed
    for shard, nxt in itertools.pairwise(shards):
        assert sum(r.size for r in shard) + nxt[0].size > target
    assert len(shards) >= sum(r.size for r in records) / target


def test_oversized_record_gets_its_own_shard():
    records = (*_records(per_class=3), ImageRecord("train/huge.JPEG", CLASSES.wnids[0], 0, 50_000))
    shards = plan_shards(records, 5_000, seed=3)
    huge = [s for s in shards if any(r.key == "train/huge.JPEG" for r in s)]
    assert len(huge) == 1 and len(huge[0]) == 1
    for shard in shards:
        assert sum(r.size for r in shard) <= 5_000 or len(shard) == 1


def test_shards_mix_classes():
    records = _records()
    shards = plan_shards(records, target_bytes=6_000, seed=0)  # ~5 records per shard
    assert len(shards) >= 30
    mixed = [len({r.wnid for r in shard}) >= 3 for shard in shards]
    assert sum(mixed) / len(mixed) >= 0.7, [len({r.wnid for r in s}) for s in shards]
    # not the class-sorted order of the listing
    assert [r.key for s in shards for r in s] != [r.key for r in records]


def test_plan_of_nothing():
    assert plan_shards((), 1000, seed=0) == []


def _listing():
    train = _records(per_class=2)
    val = _records(per_class=1, split="val")
    return LayoutListing("kaggle", "file:///src", CLASSES, train, val)


def _receipt(split, index, count, per_class, sha, quarantined=(), nbytes=100):
    rows = sum(per_class.values())
    return {
        "split": split,
        "path": shard_name(split, index, count),
        "rows": rows,
        "bytes": nbytes,
        "sha256": sha * 64,
        "bytes_in": nbytes + 10,
        "quarantined": [{"key": k, "reason": "corrupt"} for k in quarantined],
        "notes": {},
        "per_class": per_class,
    }


def _receipts():
    w = CLASSES.wnids
    return [
        _receipt("train", 1, 2, {x: 1 for x in w}, "b", nbytes=500),
        _receipt("val", 0, 1, {x: 1 for x in w}, "c", nbytes=300),
        _receipt("train", 0, 2, {x: 1 for x in w}, "a", nbytes=400),
    ]


def test_build_manifest():
    listing = _listing()
    opts = PrepareOptions(shard_mb=1.5, rows_per_group=64, seed=9)
    m = build_manifest(listing, _receipts(), opts)
    assert m["format"] == MANIFEST_FORMAT
    assert m["source"] == {"url": "file:///src", "layout": "kaggle"}
    assert {k: m["options"][k] for k in ("shard_mb", "rows_per_group", "seed")} == {
        "shard_mb": 1.5,
        "rows_per_group": 64,
        "seed": 9,
    }
    assert m["classes"] == list(CLASSES.wnids) and m["class_names"] == list(CLASSES.names)
    assert m["splits"]["train"]["num_images"] == 20 and m["splits"]["val"]["num_images"] == 10
    # shards listed in name order whatever order the tasks finished in
    assert [s["path"] for s in m["splits"]["train"]["shards"]] == [shard_name("train", 0, 2), shard_name("train", 1, 2)]
    assert m["splits"]["train"]["shards"][0] == {
        "path": shard_name("train", 0, 2),
        "rows": 10,
        "bytes": 400,
        "sha256": "a" * 64,
    }
    assert m["splits"]["train"]["per_class"] == {w: 2 for w in CLASSES.wnids}
    assert m["splits"]["val"]["per_class"] == {w: 1 for w in CLASSES.wnids}
    assert sum(m["splits"]["train"]["per_class"].values()) == m["splits"]["train"]["num_images"]


def test_build_manifest_per_class_lists_every_class_even_if_empty():
    listing = _listing()
    w = CLASSES.wnids
    receipts = [_receipt("train", 0, 1, {w[0]: 3}, "a"), _receipt("val", 0, 1, {}, "b")]
    m = build_manifest(listing, receipts, PrepareOptions())
    assert list(m["splits"]["train"]["per_class"]) == list(w)
    assert m["splits"]["train"]["per_class"][w[0]] == 3 and m["splits"]["train"]["per_class"][w[1]] == 0
    assert m["splits"]["val"]["num_images"] == 0


def test_build_report_conservation_and_quarantine():
    listing = _listing()
    w = CLASSES.wnids
    ok = build_report(listing, _receipts(), PrepareOptions(), 3.0, "file:///out")
    assert ok["splits"]["train"]["conserved"] and ok["splits"]["val"]["conserved"]
    assert ok["splits"]["train"]["listed"] == 20 and ok["splits"]["train"]["written"] == 20
    assert ok["quarantined_fraction"] == 0.0
    assert ok["splits"]["train"]["bytes_out"] == 900 and ok["splits"]["train"]["shards"] == 2

    # one val image quarantined: still conserved (written + quarantined == listed), fraction 1/30
    per_class = {x: 1 for x in w[1:]}
    receipts = _receipts()[:1] + _receipts()[2:] + [_receipt("val", 0, 1, per_class, "c", quarantined=["val/k"])]
    q = build_report(listing, receipts, PrepareOptions(), 3.0, "file:///out")
    assert q["splits"]["val"]["quarantined"] == 1 and q["splits"]["val"]["written"] == 9
    assert q["splits"]["val"]["conserved"]
    assert q["splits"]["val"]["min_per_class"] == 0 and q["splits"]["val"]["max_per_class"] == 1
    assert q["quarantined_fraction"] == pytest.approx(1 / 30)

    # an image neither written nor quarantined breaks conservation
    lost = _receipts()[:1] + _receipts()[2:] + [_receipt("val", 0, 1, per_class, "c")]
    assert not build_report(listing, lost, PrepareOptions(), 3.0, "file:///out")["splits"]["val"]["conserved"]


def test_build_shard_table_schema():
    table = build_shard_table(
        [{"image": b"\xff\xd8", "label": 3, "wnid": "n01440764", "key": "k", "height": 2, "width": 3}]
    )
    assert table.num_rows == 1
    assert table.schema.names == ["image", "label", "wnid", "key", "height", "width"]
    assert str(table.schema.field("label").type) == "int16"
    assert table.column("image")[0].as_py() == b"\xff\xd8"
