"""prepare on a local Ray: every image exactly once, labels keyed by sorted wnid, manifest last."""

import hashlib
import json

import pyarrow.parquet as pq
import pytest

from imagenet_ray.data.classes import imagenet_classes
from imagenet_ray.data.decode import decode_rgb

pytestmark = pytest.mark.ray


def _rows(root, manifest, split):
    tables = [pq.read_table(root / s["path"]) for s in manifest["splits"][split]["shards"]]
    return [row for t in tables for row in t.to_pylist()]


def test_every_image_exactly_once_with_its_label(prepared, synth_raw):
    root, manifest = prepared
    raw, summary = synth_raw
    wnids = imagenet_classes().wnids[:3]
    assert manifest["classes"] == list(wnids)
    for split, expected in (("train", summary.train_images), ("val", summary.val_images)):
        rows = _rows(root, manifest, split)
        keys = [r["key"] for r in rows]
        assert len(keys) == len(set(keys)) == expected == manifest["splits"][split]["num_images"]
        for r in rows:
            assert wnids[r["label"]] == r["wnid"]
            # original bytes, byte-exact
            assert (raw / r["key"]).read_bytes() == r["image"]
            assert decode_rgb(r["image"]).size == (r["width"], r["height"])
    # train labels also follow the folder they came from
    for r in _rows(root, manifest, "train"):
        assert r["key"].split("/")[-2] == r["wnid"]


def test_manifest_checksums_and_mixed_shards(prepared):
    root, manifest = prepared
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 1
    for s in shards:
        data = (root / s["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
    mixed = [len({r["wnid"] for r in pq.read_table(root / s["path"]).to_pylist()}) for s in shards]
    assert max(mixed) >= 2, mixed
    assert json.loads((root / "_manifest.json").read_text())["splits"]["val"]["per_class"] == {
        w: 7 for w in manifest["classes"]
    }


def test_val_split_is_exact_across_workers(local_ray, prepared):
    """Two workers' val shards together hold every val image exactly once (no equalising drop)."""
    from concurrent.futures import ThreadPoolExecutor

    from imagenet_ray.data.pipeline import build_val_dataset, exact_val_data_config, open_prepared

    root, manifest = prepared
    ds = build_val_dataset(open_prepared(str(root)), resize=40, crop=32)
    splits = exact_val_data_config().configure({"val": ds}, world_size=2, worker_handles=None, worker_node_ids=None)

    def consume(i):
        return [b["label"] for b in splits[i]["val"].iter_batches(batch_size=4, batch_format="numpy")]

    with ThreadPoolExecutor(2) as pool:
        per_worker = list(pool.map(consume, range(2)))
    counts = [sum(len(x) for x in labels) for labels in per_worker]
    assert sum(counts) == manifest["splits"]["val"]["num_images"] == 21
    # Every image's eval output has the requested shape
    batch = next(iter(ds.iter_batches(batch_size=5, batch_format="numpy")))
    assert batch["image"].shape == (5, 32, 32, 3) and batch["image"].dtype.name == "uint8"
