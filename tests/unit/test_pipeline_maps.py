"""The pipeline's map functions as pure functions (no Ray)."""

import io

import numpy as np
from PIL import Image

from imagenet_ray.data import pipeline
from imagenet_ray.data.pipeline import _eval_map, _train_map, row_chunks


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 50, 3), value, np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _block(n: int) -> dict[str, np.ndarray]:
    # Each image's grey level encodes its label, so rows can be traced through the maps.
    return {
        "image": np.array([_jpeg(4 * i) for i in range(n)], dtype=object),
        "label": np.arange(n, dtype=np.int64),
        "key": np.array([f"k{i}" for i in range(n)], dtype=object),
    }


def test_row_chunks_cover_every_row_in_order():
    block = {"a": np.arange(70), "b": np.arange(70) * 2}
    chunks = list(row_chunks(block, 32))
    assert [len(c["a"]) for c in chunks] == [32, 32, 6]
    assert np.array_equal(np.concatenate([c["a"] for c in chunks]), block["a"])
    assert np.array_equal(np.concatenate([c["b"] for c in chunks]), block["b"])
    assert list(row_chunks({"a": np.arange(0)}, 32)) == []


def test_train_map_decodes_every_row_once_in_a_new_order_each_call():
    n = pipeline.DECODE_BATCH_ROWS + 9  # more than one chunk
    block = _block(n)
    runs = []
    for _ in range(2):
        out = list(_train_map(block, size=16))
        assert [len(o["label"]) for o in out] == [pipeline.DECODE_BATCH_ROWS, 9]
        labels = np.concatenate([o["label"] for o in out])
        images = np.concatenate([o["image"] for o in out])
        assert sorted(labels.tolist()) == list(range(n))  # every row exactly once
        assert images.shape == (n, 16, 16, 3) and images.dtype == np.uint8
        # the pixels still belong to their label (uniform images survive crop and flip)
        assert np.all(np.abs(images.reshape(n, -1).mean(1) - 4 * labels) <= 2)
        assert sum(int(o["decode_errors"].sum()) for o in out) == 0
        runs.append(labels)
    assert not np.array_equal(runs[0], runs[1]), "rows visited in the same order twice"
    assert not np.array_equal(runs[0], np.arange(n)), "rows visited in stored order"


def test_eval_map_keeps_the_stored_order():
    n = pipeline.DECODE_BATCH_ROWS + 3
    out = list(_eval_map(_block(n), resize=20, crop=16))
    assert np.array_equal(np.concatenate([o["label"] for o in out]), np.arange(n))
    assert np.concatenate([o["image"] for o in out]).shape == (n, 16, 16, 3)


def test_eval_map_with_val_index_replaces_the_key_by_the_val_index():
    n = pipeline.DECODE_BATCH_ROWS + 3
    block = _block(n)
    block["key"] = np.array(
        [f"val/n01440764/ILSVRC2012_val_{i + 1:08d}.JPEG" if i % 2 else f"k{i}" for i in range(n)], dtype=object
    )
    out = list(_eval_map(block, resize=20, crop=16, with_val_index=True))
    assert all("key" not in o for o in out)  # strings cannot become tensors
    val_index = np.concatenate([o["val_index"] for o in out])
    assert val_index.dtype == np.int64
    assert val_index.tolist() == [i if i % 2 else -1 for i in range(n)]
    assert np.array_equal(np.concatenate([o["label"] for o in out]), np.arange(n))
    assert all("val_index" not in o for o in _eval_map(block, resize=20, crop=16))


def test_val_index_map_passes_the_bytes_through_with_the_val_index():
    block = _block(3)
    block["key"] = np.array(
        ["ILSVRC2012_img_val.tar/ILSVRC2012_val_00050000.JPEG", "x", "ILSVRC2012_val_00000001"], dtype=object
    )
    out = pipeline._val_index_map(block)
    assert set(out) == {"image", "label", "val_index"}
    assert out["val_index"].tolist() == [49_999, -1, 0]
    assert out["image"] is block["image"]


def test_train_map_crops_with_the_configured_scale_and_ratio():
    # Uniform images cannot show a crop: a left-dark / right-light one does. The whole area at the image's
    # aspect (50 / 40) keeps both halves; the default's crops often land inside one half.
    arr = np.zeros((40, 50, 3), np.uint8)
    arr[:, 25:] = 250
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    block = {"image": np.array([buf.getvalue()] * 120, dtype=object), "label": np.arange(120, dtype=np.int64)}

    def spread(out):
        images = np.concatenate([o["image"] for o in out]).astype(np.float64)
        return images.max(axis=(1, 2, 3)) - images.min(axis=(1, 2, 3))  # per image: both halves seen?

    whole = spread(_train_map(block, size=16, scale=(1.0, 1.0), ratio=(50 / 40, 50 / 40)))
    assert np.all(whole > 200)
    default = spread(_train_map(block, size=16))
    assert np.sum(default < 100) >= 1  # ~12 % of default crops see one half only (none of 120: p ≈ 2e-7)
