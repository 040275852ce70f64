"""A miniature ImageNet written in Kaggle's real CLS-LOC layout, for the demo and the tests.

Real wnids; each class has a signal that survives RandomResizedCrop at low resolution (hue, stripes, a
blob); sizes and aspect ratios vary around ImageNet's, about 1 in 12 is grayscale, each a real JPEG.
"""

from __future__ import annotations

import colorsys
import io
import math
from dataclasses import dataclass
from typing import cast

import numpy as np
from PIL import Image

from imagenet_ray import storage
from imagenet_ray.data.classes import ClassList, imagenet_classes
from imagenet_ray.data.layouts import KAGGLE_SYNSETS, KAGGLE_TRAIN_DIR, KAGGLE_VAL_DIR, KAGGLE_VAL_SOLUTION
from imagenet_ray.errors import ConfigError

_ASPECTS = (4 / 3, 4 / 3, 4 / 3, 3 / 4, 1.0, 3 / 2, 16 / 9, 2 / 3)
GRAYSCALE_FRACTION = 1 / 12


@dataclass(frozen=True)
class ClassStyle:
    rgb: np.ndarray  # float32 (3,), main colour in [0, 1]
    blob_rgb: np.ndarray
    angle: float  # stripe orientation (radians)
    cycles: float  # stripes across the longer side


def class_style(index: int, num_classes: int) -> ClassStyle:
    """Deterministic, well-separated style for class `index` of `num_classes`."""
    hue = index / num_classes
    rgb = np.array(colorsys.hsv_to_rgb(hue, 0.85, 0.9), np.float32)
    blob = np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.9, 0.8), np.float32)
    angle = (index * 0.61803398875 % 1.0) * math.pi
    cycles = 4.0 + (index * 7 % 11)
    return ClassStyle(rgb, blob, angle, cycles)


def render_image(style: ClassStyle, rng: np.random.Generator) -> np.ndarray:
    """One (H, W, 3) uint8 image of a class."""
    long_side = int(rng.integers(400, 501))
    aspect = float(rng.choice(_ASPECTS))
    if aspect >= 1:
        width, height = long_side, max(32, round(long_side / aspect))
    else:
        width, height = max(32, round(long_side * aspect)), long_side
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    scale = 2 * math.pi * style.cycles / max(width, height)
    angle = style.angle + rng.normal(0, 0.08)
    phase = rng.uniform(0, 2 * math.pi)
    stripes = 0.5 + 0.5 * np.sin(scale * (xs * math.cos(angle) + ys * math.sin(angle)) + phase)
    shade = 0.55 + 0.45 * stripes
    colour = np.clip(style.rgb + rng.normal(0, 0.04, 3).astype(np.float32), 0, 1)
    img = shade[..., None] * colour[None, None, :]
    # A soft blob of the complementary hue somewhere in the image.
    cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
    radius = rng.uniform(0.12, 0.3) * min(width, height)
    mask = np.exp(-(((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * radius**2)))[..., None]
    img = img * (1 - mask) + mask * style.blob_rgb[None, None, :]
    img += rng.normal(0, 0.05, img.shape).astype(np.float32)
    return cast(np.ndarray, (np.clip(img, 0, 1) * 255).astype(np.uint8))


def encode_jpeg(pixels: np.ndarray, grayscale: bool, quality: int = 90) -> bytes:
    img = Image.fromarray(pixels)
    if grayscale:
        img = img.convert("L")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass(frozen=True)
class SynthSummary:
    url: str
    classes: int
    train_images: int
    val_images: int


def write_synthetic_imagenet(
    out_url: str,
    num_classes: int = 10,
    train_per_class: int = 50,
    val_per_class: int = 10,
    seed: int = 0,
    wnids: list[str] | None = None,
) -> SynthSummary:
    """Write a miniature ImageNet in Kaggle's CLS-LOC layout to `out_url`."""
    if num_classes < 1 or train_per_class < 1 or val_per_class < 0:
        raise ConfigError("synth: --classes and --train-per-class must be ≥ 1, --val-per-class ≥ 0")
    all_classes = imagenet_classes()
    if wnids is None:
        if num_classes > len(all_classes):
            raise ConfigError(f"synth: --classes must be ≤ {len(all_classes)}")
        wnids = list(all_classes.wnids[:num_classes])
    classes: ClassList = all_classes.subset(wnids)
    root = storage.resolve(out_url)
    rng = np.random.default_rng(seed)

    for label, wnid in enumerate(classes.wnids):
        style = class_style(label, len(classes))
        for n in range(train_per_class):
            data = encode_jpeg(render_image(style, rng), rng.random() < GRAYSCALE_FRACTION)
            storage.write_bytes_atomic(root.child(KAGGLE_TRAIN_DIR, wnid, f"{wnid}_{n + 1}.JPEG"), data)

    # Val: ids 1..M over a random permutation of classes, as in the real val set.
    val_labels = rng.permutation(np.repeat(np.arange(len(classes)), val_per_class))
    rows = ["ImageId,PredictionString"]
    for i, label in enumerate(val_labels, 1):
        image_id = f"ILSVRC2012_val_{i:08d}"
        pixels = render_image(class_style(int(label), len(classes)), rng)
        data = encode_jpeg(pixels, rng.random() < GRAYSCALE_FRACTION)
        storage.write_bytes_atomic(root.child(KAGGLE_VAL_DIR, f"{image_id}.JPEG"), data)
        h, w = pixels.shape[:2]
        rows.append(f"{image_id},{classes.wnids[label]} 0 0 {w - 1} {h - 1} ")
    storage.write_bytes_atomic(root.child(KAGGLE_VAL_SOLUTION), ("\n".join(rows) + "\n").encode())
    # The mapping is written last: a listing only recognises the layout once it is complete.
    storage.write_bytes_atomic(root.child(KAGGLE_SYNSETS), classes.to_synset_mapping().encode())
    return SynthSummary(out_url, len(classes), len(classes) * train_per_class, len(val_labels))
