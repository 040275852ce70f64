"""The fast kernel (libjpeg-turbo decode, DCT downscale, torch uint8 resize): same geometry and
distribution as torchvision, every colour mode → 3 channels, decode failures replaced and counted."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from imagenet_ray.data import transforms
from imagenet_ray.data.decode import DecodeError, decode_rgb, decode_rgb_array, image_size, jpeg_header
from imagenet_ray.data.transforms import (
    dct_factor,
    eval_batch,
    eval_geometry,
    eval_image,
    sample_rrc_box,
    snap_box,
    train_batch,
    train_image,
)


def _pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


# --- decode ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_fast_decode_is_bit_exact_with_pillow(mode, jpeg_bytes):
    data = jpeg_bytes(203, 151, mode)
    assert jpeg_header(data) == (203, 151)
    arr = decode_rgb_array(data)
    assert arr.shape == (151, 203, 3) and arr.dtype == np.uint8 and arr.flags.writeable
    assert np.array_equal(arr, np.asarray(decode_rgb(data)))


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_dct_downscale_sizes(factor, jpeg_bytes):
    data = jpeg_bytes(203, 151)
    arr = decode_rgb_array(data, factor)
    assert arr.shape == (-(-151 // factor), -(-203 // factor), 3)
    with pytest.raises(ValueError):
        decode_rgb_array(data, 3)


@pytest.mark.parametrize("kind", ["jpeg-cmyk", "png-rgb", "png-gray", "png-rgba", "png-palette", "png-la"])
def test_other_inputs_go_through_pillow(kind, smooth_image, encode_image):
    fmt, mode = kind.split("-")
    mode = {"rgb": "RGB", "gray": "L", "cmyk": "CMYK", "rgba": "RGBA", "palette": "P", "la": "LA"}[mode]
    data = encode_image(Image.fromarray(smooth_image(64, 48)).convert(mode), fmt.upper())
    assert jpeg_header(data) is None  # CMYK is Pillow's (Adobe's inverted CMYK), PNG is not a JPEG
    arr = decode_rgb_array(data, 2)  # reduce is ignored off the fast path
    assert arr.shape == (48, 64, 3)
    assert np.array_equal(arr, np.asarray(decode_rgb(data)))
    assert image_size(data) == (64, 48)


def test_jpeg_that_strict_libjpeg_rejects_but_pillow_reads_still_decodes(jpeg_bytes):
    # Junk before the EOI marker: libjpeg warns ("extraneous bytes"), simplejpeg's strict mode refuses,
    # Pillow decodes. Acceptance must stay Pillow's: this is not a decode error.
    good = jpeg_bytes(80, 60)
    data = good[:-2] + b"\x00\x01\x02" + good[-2:]
    assert np.array_equal(decode_rgb_array(data), np.asarray(decode_rgb(data)))


@pytest.mark.parametrize("data", [b"", b"junk", b"\xff\xd8\xff\xe0" + b"\0" * 20])
def test_garbage_is_a_decode_error(data):
    with pytest.raises(DecodeError):
        decode_rgb_array(data)


def test_truncated_jpeg_is_a_decode_error(jpeg_bytes):
    data = jpeg_bytes(200, 150)
    assert jpeg_header(data[: len(data) // 2]) == (200, 150)  # the header survives truncation ...
    with pytest.raises(DecodeError):
        decode_rgb_array(data[: len(data) // 2])  # ... the pixels do not


# --- colour modes through the presets --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["jpeg-RGB", "jpeg-L", "jpeg-CMYK", "png-RGB", "png-L", "png-RGBA", "png-P", "png-I;16"]
)
def test_presets_give_three_channels(kind, smooth_image, encode_image):
    fmt, mode = kind.split("-")
    img = Image.fromarray(smooth_image(120, 90))
    img = img.convert("L").convert("I;16") if mode == "I;16" else img.convert(mode)
    data = encode_image(img, fmt.upper())
    batch = {"image": np.array([data, data], dtype=object), "label": np.array([1, 2])}
    for arr in (train_batch(batch, 32, np.random.default_rng(0))["image"], eval_batch(batch, 40, 32)["image"]):
        assert arr.shape == (2, 32, 32, 3) and arr.dtype == np.uint8 and arr.flags["C_CONTIGUOUS"]
        if mode in ("L", "I;16"):
            assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])


# --- eval geometry vs torchvision ------------------------------------------------------------------------------

# (size, resize, crop): ImageNet-like, the 256/224 default, FixRes 232/224 and 176 train, FFCV's low res;
# the large ones take the DCT-downscale path (shorter side ≥ 2 x resize).
EVAL_JPEG_CASES = [
    ((500, 375), 256, 224),
    ((375, 500), 256, 224),
    ((500, 333), 232, 224),
    ((640, 480), 176, 160),
    ((333, 500), 192, 160),
    ((1200, 900), 256, 224),
    ((2000, 1500), 232, 224),
    ((300, 1000), 64, 56),
]


@pytest.mark.parametrize("size, resize, crop", EVAL_JPEG_CASES)
def test_eval_jpeg_matches_torchvision_resize_center_crop(size, resize, crop, smooth_image, encode_image):
    data = encode_image(Image.fromarray(smooth_image(*size)), "JPEG", quality=92)
    ref = np.asarray(T.CenterCrop(crop)(T.Resize(resize)(_pil(data)))).astype(np.int16)
    ours = eval_image(data, resize, crop).astype(np.int16)
    diff = np.abs(ours - ref)
    print(
        f"eval {size} {resize}/{crop} (DCT 1/{dct_factor(min(size), resize)}): max {diff.max()}, mean {diff.mean():.3f}"
    )
    if dct_factor(min(size), resize) == 1:
        assert diff.max() <= 2  # same decoder, same filter (torch's uint8 AA bilinear = Pillow's, ±1)
    else:
        assert diff.mean() < 1.0 and diff.max() <= 8  # DCT-domain downscale then the AA resize


def test_eval_geometry_is_torchvisions():
    # Resize(73) of 500x375 → 97x73; CenterCrop(64) → left=round(16.5)=16, top=round(4.5)=4 (half to even)
    assert eval_geometry(500, 375, 73, 64) == (97, 73, 16, 4)
    assert eval_geometry(375, 500, 256, 224) == (256, 341, 16, 58)
    with pytest.raises(ValueError):
        eval_geometry(500, 375, 200, 224)


def test_resize_keeps_channels_last_for_arrays_and_views():
    # Regression: permute-then-unsqueeze hid the channels_last layout → slow kernel and NCHW output.
    a = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    for src in (a, a[5:80, 7:100]):
        y = transforms._resize(src, 50, 60)
        assert y.shape == (50, 60, 3) and y.is_contiguous()


# --- train crop vs torchvision ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, out", [((500, 375), 224), ((375, 500), 176), ((160, 120), 192), ((1600, 1200), 128), ((2000, 1500), 64)]
)
def test_train_crop_matches_torchvision_resized_crop(size, out, smooth_image, encode_image):
    """Same seed → same box and flip as the sampler; pixels = torchvision's resized_crop of that box
    (snapped to the DCT grid when the kernel decoded at 1/2, 1/4 or 1/8)."""
    w, h = size
    data = encode_image(Image.fromarray(smooth_image(w, h)), "JPEG", quality=92)
    pil = _pil(data)
    worst, means = 0, []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        left, top, bw, bh = sample_rrc_box(w, h, rng)
        flip = rng.random() < 0.5
        k = dct_factor(min(bw, bh), out)
        left, top, bw, bh = (c * k for c in snap_box(left, top, bw, bh, k, -(-w // k), -(-h // k)))
        ref = np.asarray(TF.resized_crop(pil, top, left, bh, bw, [out, out], T.InterpolationMode.BILINEAR))
        ref = ref[:, ::-1] if flip else ref
        diff = np.abs(train_image(data, out, np.random.default_rng(seed)).astype(np.int16) - ref.astype(np.int16))
        worst, means = max(worst, int(diff.max())), [*means, diff.mean()]
        if k == 1:
            assert diff.max() <= 2, (seed, diff.max())
    assert np.mean(means) < 1.0 and worst <= 8


def test_snap_box_stays_within_half_a_downscaled_pixel():
    rng = np.random.default_rng(0)
    for _ in range(500):
        w, h = int(rng.integers(64, 3000)), int(rng.integers(64, 3000))
        left, top, bw, bh = sample_rrc_box(w, h, rng)
        for k in (2, 4, 8):
            x, y, sw, sh = snap_box(left, top, bw, bh, k, -(-w // k), -(-h // k))
            assert x >= 0 and y >= 0 and x + sw <= -(-w // k) and y + sh <= -(-h // k) and sw >= 1 and sh >= 1
            assert abs(x * k - left) <= k / 2 and abs(y * k - top) <= k / 2
            assert abs((x + sw) * k - (left + bw)) <= k and abs((y + sh) * k - (top + bh)) <= k


def test_dct_factor_never_upsamples_after_the_downscale():
    for shorter in range(16, 5000, 7):
        for target in (32, 64, 160, 224, 256):
            k = dct_factor(shorter, target)
            assert k in (1, 2, 4, 8)
            assert k == 1 or shorter / k >= target
            assert k == 8 or shorter < 2 * k * target  # the largest such factor


def test_dct_downscale_can_be_switched_off(smooth_image, encode_image):
    data = encode_image(Image.fromarray(smooth_image(1600, 1200)), "JPEG", quality=92)
    options = transforms.KernelOptions(dct_downscale=False)
    ref = np.asarray(T.CenterCrop(224)(T.Resize(256)(_pil(data)))).astype(np.int16)
    assert np.abs(eval_image(data, 256, 224, options).astype(np.int16) - ref).max() <= 2


# --- RandomResizedCrop distribution ----------------------------------------------------------------------------


@pytest.mark.parametrize("width, height", [(500, 375), (375, 500), (1000, 300), (120, 90)])
def test_rrc_box_distribution_matches_torchvision_get_params(width, height):
    """Quantiles of area fraction, log aspect and centre position over many boxes, fixed seeds."""
    n = 6000
    rng = np.random.default_rng(2024)
    torch.manual_seed(2024)
    ours = np.array([sample_rrc_box(width, height, rng) for _ in range(n)], dtype=np.float64)
    img = torch.empty(1, height, width)
    tv = np.array(
        [
            (j, i, w, h)
            for i, j, h, w in (T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n))
        ],
        dtype=np.float64,
    )

    def features(boxes):
        left, top, w, h = boxes.T
        return {
            "area": w * h / (width * height),
            "log_aspect": np.log(w / h),
            "cx": (left + w / 2) / width,
            "cy": (top + h / 2) / height,
        }

    a, b = features(ours), features(tv)
    qs = [0.05, 0.25, 0.5, 0.75, 0.95]
    for key in a:
        qa, qb = np.quantile(a[key], qs), np.quantile(b[key], qs)
        spread = np.quantile(b[key], 0.95) - np.quantile(b[key], 0.05)
        assert np.all(np.abs(qa - qb) <= 0.04 * spread + 1e-9), (key, qa, qb)


# --- decode failures in train batches --------------------------------------------------------------------------


def _jpeg(rgb, size=(80, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_failed_rows_are_replaced_counted_and_batch_size_kept():
    good = [_jpeg((220, 10, 10)), _jpeg((10, 220, 10)), _jpeg((10, 10, 220))]
    images = [good[0], b"junk", good[1], good[2][:100], good[2], b""]
    batch = {"image": np.array(images, dtype=object), "label": np.array([0, 7, 1, 7, 2, 7], dtype=np.int16)}
    out = train_batch(batch, 16, np.random.default_rng(3))
    assert out["image"].shape == (6, 16, 16, 3) and out["label"].shape == (6,) and out["decode_errors"].shape == (6,)
    assert out["decode_errors"].dtype == np.int32 and out["decode_errors"].tolist() == [0, 1, 0, 1, 0, 1]
    assert out["decode_errors"].sum() == 3
    assert 7 not in out["label"].tolist()  # every stand-in carries its donor's label
    assert out["label"][[0, 2, 4]].tolist() == [0, 1, 2]
    for img, label in zip(out["image"], out["label"], strict=True):
        assert img[..., int(label)].mean() > 150  # label i is the image whose channel i is bright


def test_clean_batch_has_no_errors_and_keeps_order():
    good = [_jpeg((220, 10, 10)), _jpeg((10, 10, 220))]
    out = train_batch({"image": np.array(good, dtype=object), "label": np.array([0, 2])}, 16, np.random.default_rng(0))
    assert out["decode_errors"].tolist() == [0, 0] and out["label"].tolist() == [0, 2]


def test_all_rows_failing_raises_naming_keys():
    batch = {
        "image": np.array([b"x", b"y"], dtype=object),
        "label": np.array([1, 2]),
        "key": np.array(["train/a.JPEG", "train/b.JPEG"], dtype=object),
    }
    with pytest.raises(DecodeError, match=r"train/a\.JPEG"):
        train_batch(batch, 16, np.random.default_rng(0))


def test_empty_batch():
    out = train_batch(
        {"image": np.array([], dtype=object), "label": np.array([], dtype=np.int64)}, 16, np.random.default_rng(0)
    )
    assert out["image"].shape == (0, 16, 16, 3) and out["label"].shape == (0,) and out["decode_errors"].shape == (0,)
    empty_eval = eval_batch({"image": np.array([], dtype=object), "label": np.array([])}, 40, 32)
    assert empty_eval["image"].shape == (0, 32, 32, 3)


def test_eval_batch_still_raises_on_a_bad_row():
    batch = {
        "image": np.array([_jpeg((1, 2, 3)), b"bad"], dtype=object),
        "label": np.array([0, 1]),
        "key": np.array(["val/x.JPEG", "val/ILSVRC2012_val_00000007.JPEG"], dtype=object),
    }
    with pytest.raises(DecodeError, match="ILSVRC2012_val_00000007"):
        eval_batch(batch, 40, 32)


def test_kernel_options_are_frozen_and_default_to_every_speed_up():
    assert transforms.KernelOptions(dct_downscale=True, crop_decode=True) == transforms.DEFAULT_KERNEL
    with pytest.raises(AttributeError):
        transforms.DEFAULT_KERNEL.crop_decode = False  # type: ignore[misc]
