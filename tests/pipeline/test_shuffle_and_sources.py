"""Pipeline behaviour on a local Ray: near-i.i.d. batches, new order per epoch, raw-layout source."""

import numpy as np
import pytest

from imagenet_ray.data import format as format_
from imagenet_ray.data.format import open_prepared
from imagenet_ray.data.layouts import detect_and_list, val_index_of
from imagenet_ray.data.pipeline import RawLayoutDataset, build_train_dataset, build_val_dataset

pytestmark = pytest.mark.ray


def _epoch_labels(ds, batch_size, buffer):
    return [
        b["label"]
        for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy", local_shuffle_buffer_size=buffer)
    ]


def test_batches_are_close_to_iid_and_reshuffled_each_epoch(local_ray, prepared):
    root, manifest = prepared
    ds = build_train_dataset(open_prepared(str(root)), crop=16, seed=5)
    batch = 6
    epochs = [_epoch_labels(ds, batch, buffer=24) for _ in range(2)]
    flat = [np.concatenate(e) for e in epochs]
    assert all(len(f) == manifest["splits"]["train"]["num_images"] for f in flat)
    assert not np.array_equal(flat[0], flat[1]), "same order two epochs running"
    # Classes per batch vs i.i.d. sampling from 3 balanced classes: E[distinct] = 3 * (1 - (2/3)**6) ≈ 2.74.
    # Class-sorted input would give ≈ 1.
    distinct = [len(set(b.tolist())) for e in epochs for b in e if len(b) == batch]
    expected = 3 * (1 - (2 / 3) ** batch)
    assert np.mean(distinct) >= 0.85 * expected, (np.mean(distinct), expected)


def test_raw_layout_source_reads_every_image_once(local_ray, synth_raw):
    raw, summary = synth_raw
    data = RawLayoutDataset(str(raw), detect_and_list(str(raw)))
    val = build_val_dataset(data, resize=40, crop=32)
    rows = val.take_all()
    assert len(rows) == summary.val_images
    assert rows[0]["image"].shape == (32, 32, 3)
    train = build_train_dataset(data, crop=16, seed=1)
    labels = np.concatenate(_epoch_labels(train, 8, buffer=0))
    assert sorted(labels.tolist()) == sorted(r.label for r in data.listing.train)


def test_read_and_decode_run_as_one_task_per_shard(local_ray, prepared, monkeypatch):
    # With enough shards for the cluster's CPUs, each shard is read and decoded by one fused task
    # (no object-store hop for the JPEG bytes): pretend this Ray has 1 CPU so the 3-shard fixture counts.
    root, manifest = prepared
    shards = len(manifest["splits"]["train"]["shards"])
    assert shards >= 2
    monkeypatch.setattr(format_, "_cluster_cpus", lambda: 1.0)
    ds = build_train_dataset(open_prepared(str(root)), crop=16, seed=2).materialize()
    stats = ds.stats()
    assert "ReadParquet->MapBatches(_train_map)" in stats, stats
    assert ds.count() == manifest["splits"]["train"]["num_images"]
    classes = manifest["classes"]
    expected = [classes.index(w) for w, n in manifest["splits"]["train"]["per_class"].items() for _ in range(n)]
    assert sorted(ds.to_pandas()["label"].tolist()) == sorted(expected)


def test_val_dataset_with_val_index_replaces_the_key_on_both_decode_paths(local_ray, prepared):
    root, manifest = prepared
    data = open_prepared(str(root))
    keys = [str(r["key"]) for r in data.read("val", ["key"]).take_all()]
    expected = sorted(val_index_of(k) for k in keys)
    assert all(i >= 0 for i in expected)  # the synthetic val images carry ILSVRC2012 val names
    for decode_on in ("cpu", "gpu"):
        ds = build_val_dataset(data, resize=40, crop=32, decode_on=decode_on, with_val_index=True)
        rows = ds.take_all()
        assert len(rows) == manifest["splits"]["val"]["num_images"]
        assert set(rows[0]) == {"image", "label", "val_index"}, decode_on
        assert sorted(int(r["val_index"]) for r in rows) == expected
