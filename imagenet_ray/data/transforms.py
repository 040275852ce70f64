"""Train and eval presets as pure functions: encoded bytes → uint8 (N, H, W, 3) batches, testable without Ray.

Geometry follows torchvision (RandomResizedCrop.get_params; Resize + CenterCrop). The kernel samples the box
from the JPEG header, decodes only the crop (DCT-downscaled when it stays ≥ the output), resizes it once with
torch's antialiased uint8 bilinear, flips before the resize; KernelOptions switches the speed-ups off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from imagenet_ray.data.decode import DecodeError, decode_rgb_array, decode_rgb_crop, jpeg_header

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class KernelOptions:
    """The kernel's speed-ups; the benchmark switches each off to measure it (pixels stay torchvision's)."""

    dct_downscale: bool = True  # decode large JPEGs at 1/2, 1/4, 1/8 size when the crop stays ≥ the output
    crop_decode: bool = True  # decode only the crop's rows and columns (bit-identical to a whole decode)


DEFAULT_KERNEL = KernelOptions()

# torchvision's RandomResizedCrop defaults (area fraction, aspect ratio): data.rrc_scale / data.rrc_ratio.
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def sample_rrc_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = RRC_SCALE,
    ratio: tuple[float, float] = RRC_RATIO,
) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a RandomResizedCrop box; torchvision's algorithm with a numpy RNG."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    # Fallback to a central crop, clamped to the allowed aspect range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def eval_geometry(width: int, height: int, resize: int, crop: int) -> tuple[int, int, int, int]:
    """(new_w, new_h, left, top): torchvision's Resize(resize) output size and CenterCrop(crop) offsets."""
    if crop > resize:
        raise ValueError(f"eval crop {crop} is larger than the resize {resize}")
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    # torchvision's CenterCrop: offsets rounded (half to even) from the resized image.
    return new_w, new_h, round((new_w - crop) / 2.0), round((new_h - crop) / 2.0)


def eval_box(width: int, height: int, resize: int, crop: int) -> tuple[float, float, float, float]:
    """Source box (l, t, r, b) equivalent to Resize(resize) then CenterCrop(crop), as torchvision does."""
    new_w, new_h, left, top = eval_geometry(width, height, resize, crop)
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + crop) * sx, (top + crop) * sy


def dct_factor(shorter_side: int, target: int) -> int:
    """Largest of 1, 2, 4, 8 that keeps `shorter_side / factor` ≥ `target` (no upsampling after it)."""
    k = 1
    while k < 8 and shorter_side >= 2 * k * target:
        k *= 2
    return k


def _resize(arr: np.ndarray, out_h: int, out_w: int, flip: bool = False) -> torch.Tensor:
    """Antialiased bilinear resize of an (h, w, 3) uint8 array (a view is fine) → (out_h, out_w, 3) tensor,
    mirrored left-right if `flip`."""
    # NHWC memory seen as NCHW = channels_last, the layout of torch's fast (AVX2) uint8 kernel. The
    # batch dim must be added before the permute: permute-then-unsqueeze gives a stride that torch does
    # not recognise as channels_last, and the slow path then also returns NCHW memory.
    x = torch.from_numpy(arr).unsqueeze(0).permute(0, 3, 1, 2)
    # Both copy a cropped (strided) view into channels_last memory. The resize's sampling grid is
    # mirror-symmetric, so flipping its input gives bit-identical pixels to flipping its output
    # (tested), and the crop is cheaper to flip than the result (docs/benchmarks.md).
    x = x.flip(3) if flip else x.contiguous(memory_format=torch.channels_last)
    if x.shape[2] != out_h or x.shape[3] != out_w:
        x = F.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)
    return x[0].permute(1, 2, 0)  # channels_last NCHW is contiguous HWC


def snap_box(left: int, top: int, w: int, h: int, factor: int, arr_w: int, arr_h: int) -> tuple[int, int, int, int]:
    """The box in a 1/`factor` DCT-downscaled image (pixel i covers source pixels [i*f, (i+1)*f)):
    rounded to whole pixels there, so the crop is the source box moved/resized by under factor/2 pixels."""
    if factor == 1:
        return left, top, w, h
    x0, y0 = min(round(left / factor), arr_w - 1), min(round(top / factor), arr_h - 1)
    x1, y1 = min(round((left + w) / factor), arr_w), min(round((top + h) / factor), arr_h)
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)


def _train_into(
    out: torch.Tensor,
    data: bytes,
    size: int,
    rng: np.random.Generator,
    options: KernelOptions = DEFAULT_KERNEL,
    scale: tuple[float, float] = RRC_SCALE,
    ratio: tuple[float, float] = RRC_RATIO,
) -> None:
    """RandomResizedCrop(size, scale, ratio) + flip of one encoded image, written into `out` (size, size, 3)."""
    header = jpeg_header(data)
    if header is None:  # not a fast-path JPEG: decode first (Pillow), then sample on the real size
        arr = decode_rgb_array(data)
        width, height = arr.shape[1], arr.shape[0]
        left, top, w, h = sample_rrc_box(width, height, rng, scale, ratio)
        crop = arr[top : top + h, left : left + w]
    else:
        width, height = header
        left, top, w, h = sample_rrc_box(width, height, rng, scale, ratio)
        factor = dct_factor(min(w, h), size) if options.dct_downscale else 1
        # libjpeg's 1/factor output is ceil(width / factor) x ceil(height / factor)
        box = snap_box(left, top, w, h, factor, -(-width // factor), -(-height // factor))
        region = decode_rgb_crop(data, factor, *box) if options.crop_decode else None
        if region is None:  # no crop decoder, or it refused the data: whole image, whose fallback decides
            arr = decode_rgb_array(data, factor, header)
            if arr.shape[1] != width or arr.shape[0] != height:  # downscaled (not the Pillow fallback)
                left, top, w, h = box
            region = arr[top : top + h, left : left + w]
        crop = region
    flip = rng.random() < 0.5  # drawn after the box, as before: the same RNG stream gives the same crops
    out.copy_(_resize(crop, size, size, flip))


def _eval_into(out: torch.Tensor, data: bytes, resize: int, crop: int, options: KernelOptions = DEFAULT_KERNEL) -> None:
    header = jpeg_header(data)
    if header is None:
        arr = decode_rgb_array(data)
        width, height = arr.shape[1], arr.shape[0]
    else:
        width, height = header
        arr = decode_rgb_array(data, dct_factor(min(width, height), resize) if options.dct_downscale else 1, header)
    new_w, new_h, left, top = eval_geometry(width, height, resize, crop)
    out.copy_(_resize(arr, new_h, new_w)[top : top + crop, left : left + crop])


def train_image(
    data: bytes,
    size: int,
    rng: np.random.Generator,
    options: KernelOptions = DEFAULT_KERNEL,
    scale: tuple[float, float] = RRC_SCALE,
    ratio: tuple[float, float] = RRC_RATIO,
) -> np.ndarray:
    """RandomResizedCrop(size, scale, ratio) + horizontal flip (p=0.5) → (size, size, 3) uint8; DecodeError if
    undecodable."""
    out = np.empty((size, size, 3), np.uint8)
    _train_into(torch.from_numpy(out), data, size, rng, options, scale, ratio)
    return out


def eval_image(data: bytes, resize: int, crop: int, options: KernelOptions = DEFAULT_KERNEL) -> np.ndarray:
    """Resize shorter side to `resize`, center crop `crop` → (crop, crop, 3) uint8."""
    out = np.empty((crop, crop, 3), np.uint8)
    _eval_into(torch.from_numpy(out), data, resize, crop, options)
    return out


def train_batch(
    batch: dict[str, np.ndarray],
    size: int,
    rng: np.random.Generator,
    options: KernelOptions = DEFAULT_KERNEL,
    scale: tuple[float, float] = RRC_SCALE,
    ratio: tuple[float, float] = RRC_RATIO,
) -> dict[str, np.ndarray]:
    """Decode + augment a batch {'image': bytes[], 'label': int[], optional 'key': str[]}: RandomResizedCrop
    (size, scale, ratio) and a flip per image.

    Returns {'image': uint8 (N, size, size, 3), 'label': int64 (N,), 'decode_errors': int32 (N,)} with
    N = the input row count. A row whose bytes do not decode is replaced by a copy of another row of
    the same batch (its image and label, chosen at random) and flagged with decode_errors = 1, so
    `decode_errors.sum()` over any re-batching counts the failures while batch sizes (and DDP step
    counts) stay equal. Prepared datasets are decode-checked, so a failure here means corruption
    after preparation; training goes on rather than crashing a multi-day run. A batch in which every
    row fails raises DecodeError.
    """
    images = batch["image"]
    n = len(images)
    out = np.empty((n, size, size, 3), np.uint8)
    out_t = torch.from_numpy(out)
    labels = np.asarray(batch["label"], dtype=np.int64).copy()
    errors = np.zeros(n, np.int32)
    failed: list[int] = []
    rows = out_t.unbind(0)  # one call for all row views (indexing out_t[i] costs a dispatch per row)
    for i, data in enumerate(images):
        try:
            _train_into(rows[i], data, size, rng, options, scale, ratio)
        except DecodeError:
            failed.append(i)
    if failed:
        ok = np.setdiff1d(np.arange(n), failed)
        if len(ok) == 0:
            keys = batch.get("key")
            where = f" (keys {', '.join(map(str, keys[:3]))}{', ...' if n > 3 else ''})" if keys is not None else ""
            raise DecodeError(f"all {n} images of a train batch failed to decode{where}")
        donors = ok[rng.integers(0, len(ok), size=len(failed))]
        out[failed] = out[donors]
        labels[failed] = labels[donors]
        errors[failed] = 1
    return {"image": out, "label": labels, "decode_errors": errors}


def eval_batch(
    batch: dict[str, np.ndarray], resize: int, crop: int, options: KernelOptions = DEFAULT_KERNEL
) -> dict[str, np.ndarray]:
    """Eval preset on a batch → {'image': uint8 (N, crop, crop, 3), 'label': int64 (N,)}.

    A decode failure raises DecodeError naming the row's key: validation never silently shrinks.
    """
    images = batch["image"]
    out = np.empty((len(images), crop, crop, 3), np.uint8)
    out_t = torch.from_numpy(out)
    keys = batch.get("key")
    for i, data in enumerate(images):
        try:
            _eval_into(out_t[i], data, resize, crop, options)
        except DecodeError as exc:
            raise DecodeError(f"val image {keys[i] if keys is not None else f'row {i}'}: {exc}") from None
    return {"image": out, "label": np.asarray(batch["label"], dtype=np.int64)}
