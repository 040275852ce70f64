"""Train/eval presets: shapes, colour handling, torchvision-equivalent geometry, corrupt input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from imagenet_ray.data.decode import DecodeError, decode_rgb, image_size
from imagenet_ray.data.transforms import (
    RRC_RATIO,
    RRC_SCALE,
    KernelOptions,
    _resize,
    eval_batch,
    eval_box,
    eval_image,
    sample_rrc_box,
    train_batch,
    train_image,
)


class ScriptedRng:
    """Stands in for np.random.Generator: uniform() returns low + t*(high-low) for scripted t values,
    integers() returns its low bound, random() returns a fixed value."""

    def __init__(self, fractions, rnd: float = 0.9):
        self.fractions = list(fractions)
        self.rnd = rnd

    def uniform(self, low, high):
        t = self.fractions.pop(0) if self.fractions else 1.0
        return low + t * (high - low)

    def integers(self, low, high):
        assert high > low
        return low

    def random(self):
        return self.rnd


# --- decode ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, mode",
    [
        ("JPEG", "RGB"),
        ("JPEG", "L"),
        ("JPEG", "CMYK"),
        ("PNG", "RGB"),
        ("PNG", "L"),
        ("PNG", "RGBA"),
        ("PNG", "P"),
        ("PNG", "LA"),
    ],
)
def test_decode_rgb_any_mode_gives_rgb(fmt, mode, smooth_image, encode_image):
    encode = encode_image
    img = Image.fromarray(smooth_image(50, 40)).convert(mode)
    out = decode_rgb(encode(img, fmt))
    assert out.mode == "RGB" and out.size == (50, 40)
    assert image_size(encode(img, fmt)) == (50, 40)


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\xff\xd8\xff\xe0" + b"\0" * 20])
def test_decode_rejects_garbage(data):
    with pytest.raises(DecodeError):
        decode_rgb(data)


def test_decode_rejects_truncated_jpeg(jpeg_bytes):
    data = jpeg_bytes(200, 150)
    with pytest.raises(DecodeError):
        decode_rgb(data[: len(data) // 2])


# --- presets: shapes and colour --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["jpeg-rgb", "jpeg-gray", "jpeg-cmyk", "png-rgb", "png-gray", "png-rgba"])
def test_presets_output_uint8_rgb(kind, jpeg_bytes, png_bytes):
    fmt, mode = kind.split("-")
    mode = {"rgb": "RGB", "gray": "L", "cmyk": "CMYK", "rgba": "RGBA"}[mode]
    data = (jpeg_bytes if fmt == "jpeg" else png_bytes)(160, 120, mode)
    rng = np.random.default_rng(0)
    for arr, size in ((train_image(data, 32, rng), 32), (eval_image(data, 40, 32), 32), (eval_image(data, 73, 64), 64)):
        assert arr.shape == (size, size, 3)
        assert arr.dtype == np.uint8
        assert arr.flags["C_CONTIGUOUS"]
        assert arr.min() >= 0 and arr.max() <= 255
        assert arr.std() > 1.0, "image content must survive the preset"
        if mode == "L":
            assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])


def test_train_image_flip_mirrors_the_same_crop(jpeg_bytes):
    data = jpeg_bytes(160, 120)
    kept = train_image(data, 48, ScriptedRng([0.5, 0.5], rnd=0.9))
    flipped = train_image(data, 48, ScriptedRng([0.5, 0.5], rnd=0.1))
    assert np.array_equal(flipped, kept[:, ::-1])
    assert not np.array_equal(flipped, kept)


@pytest.mark.parametrize("out", [224, 64, 17])
def test_mirroring_before_the_resize_equals_mirroring_after(out):
    """The kernel flips the crop, not the result: bit-identical over up- and down-sampling, odd sizes."""
    from imagenet_ray.data.transforms import _resize

    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (300, 257, 3), dtype=np.uint8)
    for _ in range(40):
        h, w = int(rng.integers(3, 300)), int(rng.integers(3, 257))
        top, left = int(rng.integers(0, 300 - h + 1)), int(rng.integers(0, 257 - w + 1))
        crop = image[top : top + h, left : left + w]  # a strided view, as in the kernel
        assert torch.equal(_resize(crop, out, out, flip=True), _resize(crop, out, out).flip(1)), (h, w, out)


def test_train_image_is_deterministic_for_a_seed(jpeg_bytes):
    data = jpeg_bytes(160, 120)
    a = train_image(data, 32, np.random.default_rng(7))
    b = train_image(data, 32, np.random.default_rng(7))
    c = [train_image(data, 32, np.random.default_rng(s)) for s in range(8, 12)]
    assert np.array_equal(a, b)
    assert any(not np.array_equal(a, x) for x in c)


# --- eval geometry vs torchvision ------------------------------------------------------------------------------

EVAL_CASES = [
    ((500, 375), 73, 64),
    ((375, 500), 73, 64),
    ((333, 500), 256, 224),
    ((640, 480), 160, 128),
    ((1000, 300), 73, 64),
    ((257, 256), 64, 64),
    ((100, 73), 256, 224),
    ((60, 45), 73, 64),
]


@pytest.mark.parametrize("size, resize, crop", EVAL_CASES)
def test_eval_geometry_matches_torchvision(size, resize, crop, smooth_image, encode_image):
    pil = Image.fromarray(smooth_image(*size))
    ours = eval_image(encode_image(pil, "PNG"), resize, crop).astype(np.int16)
    ref = np.asarray(T.CenterCrop(crop)(T.Resize(resize)(pil))).astype(np.int16)
    assert ours.shape == ref.shape == (crop, crop, 3)
    diff = int(np.abs(ours - ref).max())
    print(f"eval geometry {size} Resize({resize})+CenterCrop({crop}): max |diff| = {diff}")
    assert diff <= 2


def test_eval_box_matches_torchvision_offsets():
    # Resize(73) of 500x375 → 97x73; CenterCrop(64) → top=round(4.5)=4 (banker's), left=round(16.5)=16.
    left, top, right, bottom = eval_box(500, 375, 73, 64)
    sx, sy = 500 / 97, 375 / 73
    assert (left, top, right, bottom) == pytest.approx((16 * sx, 4 * sy, 80 * sx, 68 * sy))
    assert right - left == pytest.approx(64 * sx) and bottom - top == pytest.approx(64 * sy)


# --- RandomResizedCrop box -------------------------------------------------------------------------------------


@pytest.mark.parametrize("width, height", [(500, 375), (375, 500), (64, 64), (1000, 300)])
def test_rrc_boxes_valid(width, height):
    rng = np.random.default_rng(0)
    for _ in range(2000):
        left, top, w, h = sample_rrc_box(width, height, rng)
        assert left >= 0 and top >= 0 and w > 0 and h > 0
        assert left + w <= width and top + h <= height
        frac = w * h / (width * height)
        # rounding of w and h moves the area / aspect a little beyond the sampled ranges
        assert 0.08 * 0.9 <= frac <= 1.0
        slack = 1.0 / min(w, h) * 2
        assert 3 / 4 - slack <= w / h <= 4 / 3 + slack


def test_rrc_distribution_matches_torchvision():
    width, height, n = 500, 375, 3000
    rng = np.random.default_rng(123)
    torch.manual_seed(123)
    ours = np.array([sample_rrc_box(width, height, rng) for _ in range(n)], dtype=np.float64)
    tv = []
    img = torch.empty(3, height, width)
    for _ in range(n):
        i, j, h, w = T.RandomResizedCrop.get_params(img, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
        tv.append((j, i, w, h))
    tv = np.array(tv, dtype=np.float64)

    def stats(boxes):
        left, top, w, h = boxes.T
        return {
            "area": (w * h / (width * height)).mean(),
            "log_aspect": np.log(w / h).mean(),
            "cx": ((left + w / 2) / width).mean(),
            "cy": ((top + h / 2) / height).mean(),
            "full": ((w == width) & (h == height)).mean(),
        }

    a, b = stats(ours), stats(tv)
    for key, tol in (("area", 0.03), ("log_aspect", 0.03), ("cx", 0.02), ("cy", 0.02), ("full", 0.02)):
        assert abs(a[key] - b[key]) < tol, (key, a[key], b[key])


def test_rrc_hand_computed_case():
    # scale t=0.5 → area 0.54 of 500x375 = 101250; aspect exp(0)=1 → w = h = round(318.2) = 318
    rng = ScriptedRng([(0.54 - 0.08) / 0.92, 0.5])
    assert sample_rrc_box(500, 375, rng) == (0, 0, 318, 318)


@pytest.mark.parametrize("width, height", [(1000, 10), (10, 1000), (2000, 30), (30, 2000)])
def test_rrc_fallback_matches_torchvision(width, height):
    # No box with area ≥ 8 % fits inside: torchvision falls back to a central crop clamped to the ratio range.
    rng = np.random.default_rng(0)
    ours = sample_rrc_box(width, height, rng)
    i, j, h, w = T.RandomResizedCrop.get_params(torch.empty(3, height, width), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    assert ours == (j, i, w, h)
    left, top, bw, bh = ours
    assert 3 / 4 - 0.05 <= bw / bh <= 4 / 3 + 0.05
    assert left == (width - bw) // 2 and top == (height - bh) // 2


def test_rrc_fallback_hand_computed():
    rng = np.random.default_rng(0)
    assert sample_rrc_box(1000, 10, rng) == (493, 0, 13, 10)  # w = round(10 * 4/3) = 13
    assert sample_rrc_box(10, 1000, rng) == (0, 493, 10, 13)  # h = round(10 / (3/4)) = 13


def test_rrc_fallback_whole_image_when_ratio_in_range():
    # Every attempt asks for the full area at aspect 4/3: too wide for a square image → fallback → whole image.
    rng = ScriptedRng([1.0] * 20)
    assert sample_rrc_box(100, 100, rng) == (0, 0, 100, 100)
    assert rng.fractions == []  # all ten attempts were consumed


# --- RandomResizedCrop scale and ratio (data.rrc_scale, data.rrc_ratio) -----------------------------------------


@pytest.mark.parametrize(
    "scale, ratio", [((0.35, 1.0), (3 / 4, 4 / 3)), ((0.05, 0.2), (0.5, 2.0)), ((0.9, 1.0), (1.2, 4 / 3))]
)
def test_rrc_scale_and_ratio_bound_the_boxes(scale, ratio):
    width, height = 500, 375
    rng = np.random.default_rng(1)
    fracs, aspects = [], []
    for _ in range(2000):
        left, top, w, h = sample_rrc_box(width, height, rng, scale, ratio)
        assert left >= 0 and top >= 0 and left + w <= width and top + h <= height
        slack = 2.0 / min(w, h)  # rounding w and h to whole pixels
        fracs.append(w * h / (width * height))
        aspects.append(w / h)
        assert scale[0] * (1 - slack) <= fracs[-1] <= scale[1] * (1 + slack)
        assert ratio[0] - slack * 2 <= aspects[-1] <= ratio[1] + slack * 2
    # the whole range is used, not only a corner of it
    assert min(fracs) < scale[0] + 0.1 * (scale[1] - scale[0]) and max(fracs) > scale[1] - 0.1 * (scale[1] - scale[0])


def test_rrc_with_custom_bounds_matches_torchvision():
    width, height, n, scale, ratio = 500, 375, 3000, (0.35, 1.0), (0.5, 2.0)
    rng = np.random.default_rng(7)
    torch.manual_seed(7)
    ours = np.array([sample_rrc_box(width, height, rng, scale, ratio) for _ in range(n)], dtype=np.float64)
    img = torch.empty(3, height, width)
    tv = [T.RandomResizedCrop.get_params(img, scale=scale, ratio=ratio) for _ in range(n)]
    tv_boxes = np.array([(j, i, w, h) for i, j, h, w in tv], dtype=np.float64)
    for boxes in (ours, tv_boxes):
        assert (boxes[:, 2] * boxes[:, 3] / (width * height)).min() >= 0.34  # ≥ 0.35 up to rounding
    area = [(b[:, 2] * b[:, 3] / (width * height)).mean() for b in (ours, tv_boxes)]
    log_aspect = [np.log(b[:, 2] / b[:, 3]).mean() for b in (ours, tv_boxes)]
    assert abs(area[0] - area[1]) < 0.02 and abs(log_aspect[0] - log_aspect[1]) < 0.05
    default = np.array([sample_rrc_box(width, height, rng) for _ in range(n)], dtype=np.float64)
    assert area[0] > (default[:, 2] * default[:, 3] / (width * height)).mean() + 0.1  # the bound matters


def test_train_kernel_default_crops_are_unchanged_and_rrc_scale_changes_them(jpeg_bytes):
    batch = {"image": np.array([jpeg_bytes(160, 120), jpeg_bytes(90, 140)] * 4, dtype=object), "label": np.arange(8)}
    default = train_batch(batch, 32, np.random.default_rng(3))["image"]
    explicit = train_batch(batch, 32, np.random.default_rng(3), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))["image"]
    assert (RRC_SCALE, RRC_RATIO) == ((0.08, 1.0), (3 / 4, 4 / 3))  # torchvision's RandomResizedCrop defaults
    assert np.array_equal(default, explicit)  # the config's defaults give the same crops, bit for bit
    larger = train_batch(batch, 32, np.random.default_rng(3), scale=(0.9, 1.0))["image"]
    assert larger.shape == default.shape
    assert sum(not np.array_equal(a, b) for a, b in zip(default, larger, strict=True)) >= 6


def test_train_kernel_with_the_whole_area_at_the_image_aspect_resizes_the_whole_image(jpeg_bytes):
    from imagenet_ray.data.decode import decode_rgb_array

    data, options = jpeg_bytes(160, 120), KernelOptions(dct_downscale=False)
    whole = _resize(decode_rgb_array(data), 32, 32).numpy()
    rng = np.random.default_rng(0)
    outs = [train_image(data, 32, rng, options, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3)) for _ in range(12)]
    assert all(np.array_equal(o, whole) or np.array_equal(o, whole[:, ::-1]) for o in outs)
    assert any(np.array_equal(o, whole) for o in outs) and any(np.array_equal(o, whole[:, ::-1]) for o in outs)
    default = [train_image(data, 32, rng, options) for _ in range(12)]
    assert sum(np.array_equal(o, whole) or np.array_equal(o, whole[:, ::-1]) for o in default) <= 2


def test_device_decode_path_takes_the_same_bounds(jpeg_bytes, monkeypatch):
    from imagenet_ray.data import device_decode

    encoded = [jpeg_bytes(160, 120)] * 8
    out = device_decode.train_batch_on_device(
        encoded, 32, torch.device("cpu"), np.random.default_rng(0), (1.0, 1.0), (4 / 3, 4 / 3)
    )
    # every crop is the whole image, mirrored or not: two distinct pictures
    assert len({out[i].numpy().tobytes() for i in range(8)}) == 2
    seen = []
    real = device_decode.sample_rrc_box
    monkeypatch.setattr(
        device_decode, "sample_rrc_box", lambda w, h, rng, s, r: seen.append((s, r)) or real(w, h, rng, s, r)
    )
    device_decode.train_batch_on_device(encoded[:2], 32, torch.device("cpu"), np.random.default_rng(0))
    device_decode.train_batch_on_device(
        encoded[:1], 32, torch.device("cpu"), np.random.default_rng(0), (0.5, 0.9), (1.0, 2.0)
    )
    assert seen == [(RRC_SCALE, RRC_RATIO)] * 2 + [((0.5, 0.9), (1.0, 2.0))]


# --- batches ---------------------------------------------------------------------------------------------------


def _solid_jpeg(rgb) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), rgb).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_eval_batch_raises_naming_the_key():
    good = _solid_jpeg((200, 10, 10))
    batch = {
        "image": np.array([good, b"garbage bytes"], dtype=object),
        "label": np.array([3, 4]),
        "key": np.array(["val/ok.JPEG", "val/ILSVRC2012_val_00000042.JPEG"], dtype=object),
    }
    with pytest.raises(DecodeError) as info:
        eval_batch(batch, 40, 32)
    assert "val/ILSVRC2012_val_00000042.JPEG" in str(info.value)


def test_eval_batch_shapes_and_labels():
    batch = {
        "image": np.array([_solid_jpeg((200, 10, 10)), _solid_jpeg((10, 10, 200))], dtype=object),
        "label": np.array([3, 4], dtype=np.int16),
    }
    out = eval_batch(batch, 40, 32)
    assert out["image"].shape == (2, 32, 32, 3) and out["image"].dtype == np.uint8
    assert out["label"].dtype == np.int64 and out["label"].tolist() == [3, 4]
    assert out["image"][0, ..., 0].mean() > 150 and out["image"][1, ..., 2].mean() > 150


def test_train_batch_replaces_corrupt_rows_and_keeps_labels_aligned():
    # A row that fails to decode becomes a copy of a good row of the same batch (image AND label),
    # flagged in decode_errors: the batch keeps its size, labels stay aligned with their images.
    red, blue = _solid_jpeg((220, 10, 10)), _solid_jpeg((10, 10, 220))
    truncated = blue[: len(blue) // 3]
    batch = {"image": np.array([red, b"junk", blue, truncated, b""], dtype=object), "label": np.array([0, 1, 2, 3, 4])}
    out = train_batch(batch, 24, np.random.default_rng(0))
    assert out["image"].shape == (5, 24, 24, 3) and out["image"].dtype == np.uint8
    assert out["label"].dtype == np.int64 and out["decode_errors"].tolist() == [0, 1, 0, 1, 1]
    assert out["label"][0] == 0 and out["label"][2] == 2
    assert set(out["label"].tolist()) <= {0, 2}
    for img, label in zip(out["image"], out["label"], strict=True):
        channel = 0 if label == 0 else 2  # label 0 is the red image, label 2 the blue one
        assert img[..., channel].mean() > 150


def test_train_batch_all_corrupt_raises():
    with pytest.raises(DecodeError, match="all 2 images"):
        train_batch(
            {"image": np.array([b"x", b"y"], dtype=object), "label": np.array([1, 2])}, 16, np.random.default_rng(0)
        )
