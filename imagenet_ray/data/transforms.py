"""Train and eval presets as pure functions: encoded bytes → uint8 arrays, testable without Ray.

Convention: one image is an (H, W, 3) uint8 array, a batch is (N, H, W, 3). On the training device
`batch.permute(0, 3, 1, 2)` gives NCHW with channels_last strides at no cost; float conversion and
normalisation happen there (see train/loop.py), never on the CPU workers.

Geometry follows torchvision: RandomResizedCrop samples its box exactly as
`torchvision.transforms.RandomResizedCrop.get_params` does (10 attempts, then the central-crop
fallback); the eval preset is Resize(shorter side) + CenterCrop. Both use one Pillow resize with a
source box, which is numerically the same as resizing the whole image and then cropping (the filter
scale and pixel centres are identical) while touching only the pixels that are kept.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from imagenet_ray.data.decode import DecodeError, decode_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RRC_SCALE = (0.08, 1.0)
_RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def sample_rrc_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = _RRC_SCALE,
    ratio: tuple[float, float] = _RRC_RATIO,
) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a RandomResizedCrop box; torchvision's algorithm with a numpy RNG."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    # Fallback to a central crop, clamped to the allowed aspect range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def eval_box(width: int, height: int, resize: int, crop: int) -> tuple[float, float, float, float]:
    """Source box (l, t, r, b) equivalent to Resize(resize) then CenterCrop(crop), as torchvision does."""
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    # torchvision's CenterCrop: offsets rounded from the resized image.
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + crop) * sx, (top + crop) * sy


def train_image(data: bytes, size: int, rng: np.random.Generator) -> np.ndarray:
    """RandomResizedCrop(size) + horizontal flip (p=0.5) → (size, size, 3) uint8."""
    img = decode_rgb(data)
    left, top, w, h = sample_rrc_box(img.width, img.height, rng)
    out = img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    arr = np.asarray(out)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr)


def eval_image(data: bytes, resize: int, crop: int) -> np.ndarray:
    """Resize shorter side to `resize`, center crop `crop` → (crop, crop, 3) uint8."""
    img = decode_rgb(data)
    box = eval_box(img.width, img.height, resize, crop)
    return np.asarray(img.resize((crop, crop), Image.Resampling.BILINEAR, box=box))


def train_batch(batch: dict[str, np.ndarray], size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Decode + augment a batch {'image': bytes[], 'label': int[]}; undecodable rows are dropped.

    Prepared datasets are decode-checked, so a failure here means corruption after preparation;
    training goes on without that image rather than crashing a multi-day run.
    """
    images, labels = [], []
    for data, label in zip(batch["image"], batch["label"]):
        try:
            images.append(train_image(data, size, rng))
        except DecodeError:
            continue
        labels.append(label)
    return {
        "image": np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
        "label": np.asarray(labels, dtype=np.int64),
    }


def eval_batch(batch: dict[str, np.ndarray], resize: int, crop: int) -> dict[str, np.ndarray]:
    """Eval preset on a batch. A decode failure raises: validation never silently shrinks."""
    images = []
    for data, key in zip(batch["image"], batch.get("key", [None] * len(batch["image"]))):
        try:
            images.append(eval_image(data, resize, crop))
        except DecodeError as exc:
            raise DecodeError(f"val image {key}: {exc}") from None
    return {"image": np.stack(images), "label": np.asarray(batch["label"], dtype=np.int64)}
