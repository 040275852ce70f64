"""`bench data` section 4, stored variants: what each (max side, quality) that prepare can store costs, as bytes
per image and train/eval kernel images per CPU-second, and the cores per GPU that follow from them.
Pure functions: bench/data.py pins the core and times the sides made here (`interleaved`); docs/benchmarks.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from imagenet_ray.errors import UserError

DEFAULT_MAX_SIDES = (256, 320, 384, 448, 512)  # FFCV's published ImageNet runs store max side 256-512
DEFAULT_QUALITIES = (90, 95)
LOW_RES_CROPS = (192, 160)  # FFCV's low-resolution train crops (progressive resizing runs 160 -> 192)
IMAGENET_TRAIN_IMAGES = 1_281_167  # ILSVRC2012-CLS train
# Images/s one GPU trains at, per train crop: round figures for an H100-class GPU on ResNet-50 (mixed
# precision, channels_last), assumed, not measured here; the GPU script measures them (bench/gpu.py).
DEFAULT_GPU_IMAGES_PER_S = {224: 3000.0, 160: 4500.0}
ORIGINAL = "original"
QUALITY_RANGE = (1, 100)


@dataclass(frozen=True)
class Variant:
    """A stored variant: the source bytes unchanged (max_side None) or prepare's re-encode at (max_side, quality)."""

    max_side: int | None = None
    quality: int | None = None

    @property
    def name(self) -> str:
        return ORIGINAL if self.max_side is None else f"max_side_{self.max_side}_q{self.quality}"


# --- arguments --------------------------------------------------------------------------------------------------


def parse_int_list(text: str, flag: str, low: int, high: int | None = None) -> tuple[int, ...]:
    """'256,320' → (256, 320), each in [low, high]; a one-line UserError naming `flag` otherwise."""
    within = f"{low}..{high}" if high is not None else f"≥ {low}"
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"bench data {flag} {text!r}: not a comma-separated list of integers {within}") from None
    bad = [v for v in values if v < low or (high is not None and v > high)]
    if bad:
        raise UserError(f"bench data {flag} {text!r}: {bad[0]} is out of range (each must be {within})")
    return tuple(dict.fromkeys(values))  # duplicates once, order kept


def parse_gpu_rates(text: str, flag: str = "--variant-gpu-rates") -> dict[int, float]:
    """'224=3000,160=4500' → {224: 3000.0, 160: 4500.0} (train crop → images/s one GPU consumes)."""
    rates: dict[int, float] = {}
    for part in text.split(","):
        crop, _, rate = part.partition("=")
        try:
            rates[int(crop)] = float(rate)
        except ValueError:
            raise UserError(f"bench data {flag} {text!r}: expected CROP=IMAGES_PER_S pairs, e.g. 224=3000") from None
        if int(crop) < 1 or not math.isfinite(rates[int(crop)]) or rates[int(crop)] <= 0:
            raise UserError(f"bench data {flag} {text!r}: {part!r} needs a crop ≥ 1 and a rate > 0")
    return rates


def variant_grid(max_sides: Sequence[int], qualities: Sequence[int]) -> list[Variant]:
    """The originals first, then every max side × quality (max side outer: the table reads by size)."""
    return [Variant()] + [Variant(m, q) for m in max_sides for q in qualities]


def reference_variant(grid: Sequence[Variant]) -> Variant:
    """The re-encode ratios are also taken against: the largest max side at the lowest quality (512 q90 by
    default, the largest FFCV stores)."""
    encoded = [v for v in grid if v.max_side is not None]
    if not encoded:
        return grid[0]
    return max(encoded, key=lambda v: (v.max_side, -(v.quality or 0)))


def train_crops(crop: int) -> tuple[int, ...]:
    """The configured crop, then FFCV's low-resolution ones."""
    return tuple(dict.fromkeys((crop, *LOW_RES_CROPS)))


def gpu_rate_at(crop: int, given: Mapping[int, float]) -> tuple[float, str]:
    """(images/s one GPU consumes at `crop`, where that figure comes from).

    Between or beyond the given crops, a GPU's time per image is taken affine in pixels (a fixed cost plus a
    per-pixel cost, through the two nearest given crops), so 160 px does not get the ∝-pixels 2x of 224 px."""
    if crop in given:
        return given[crop], "given"
    if not given:
        raise UserError("bench data --variant-gpu-rates: no CROP=IMAGES_PER_S given")
    nearest = sorted(given, key=lambda c: (abs(c * c - crop * crop), c))
    if len(nearest) == 1:
        c0 = nearest[0]
        return given[c0] * (c0 / crop) ** 2, f"∝ pixels from {c0} px"
    c0, c1 = sorted(nearest[:2])
    t0, t1 = 1 / given[c0], 1 / given[c1]
    per_pixel = (t1 - t0) / (c1 * c1 - c0 * c0)
    seconds = t0 + per_pixel * (crop * crop - c0 * c0)
    if seconds <= 0:  # far below the given crops the affine fit runs out: plain ∝ pixels from the nearest
        return given[nearest[0]] * (nearest[0] / crop) ** 2, f"∝ pixels from {nearest[0]} px"
    return 1 / seconds, f"time per image affine in pixels through {c0} and {c1} px"


# --- the variants and their kernel sides ------------------------------------------------------------------------


def make_variants(originals: Sequence[bytes], grid: Sequence[Variant]) -> dict[str, list[bytes]]:
    """Each variant's stored bytes, exactly as `prepare --max-side N --quality Q` stores them (the originals
    as given: prepare keeps plain JPEGs byte-exact)."""
    from imagenet_ray.data.storage_rules import normalize_for_storage

    return {
        v.name: list(originals)
        if v.max_side is None
        else [normalize_for_storage(d, max_side=v.max_side, quality=v.quality or 90)[0] for d in originals]
        for v in grid
    }


def side_name(variant: str, preset: str) -> str:
    return f"{variant}|{preset}"


def kernel_sides(
    stored: Mapping[str, Sequence[bytes]], crops: Sequence[int], resize: int, eval_crop: int, seed: int = 0
) -> dict[str, Callable[[Sequence[int]], Any]]:
    """One side per (variant, train crop) and per variant's eval: each runs the pipeline's own kernel
    (transforms.train_batch / eval_batch) on the rows of a chunk of image indices, so that `interleaved`
    gives every variant the same images chunk by chunk."""
    from imagenet_ray.data import transforms

    def as_batch(datas: Sequence[bytes], rows: Sequence[int]) -> dict[str, np.ndarray]:
        arr = np.empty(len(rows), dtype=object)
        arr[:] = [datas[i] for i in rows]
        return {"image": arr, "label": np.zeros(len(rows), np.int64)}

    def train_side(datas: Sequence[bytes], crop: int) -> Callable[[Sequence[int]], Any]:
        rng = np.random.default_rng(seed)  # the same seed per side: every variant draws the same relative boxes
        return lambda rows: transforms.train_batch(as_batch(datas, rows), crop, rng)

    def eval_side(datas: Sequence[bytes]) -> Callable[[Sequence[int]], Any]:
        return lambda rows: transforms.eval_batch(as_batch(datas, rows), resize, eval_crop)

    sides: dict[str, Callable[[Sequence[int]], Any]] = {}
    for name, datas in stored.items():
        for crop in crops:
            sides[side_name(name, f"train{crop}")] = train_side(datas, crop)
        sides[side_name(name, "eval")] = eval_side(datas)
    return sides


# --- the table --------------------------------------------------------------------------------------------------


def sizes(datas: Sequence[bytes], images: int = IMAGENET_TRAIN_IMAGES) -> dict[str, float]:
    """Mean stored bytes and pixel size per image; MB (10^6 bytes) for `images` such images."""
    from imagenet_ray.data.decode import jpeg_header

    headers = [h for h in map(jpeg_header, datas) if h is not None]
    mean = float(np.mean([len(d) for d in datas]))
    return {
        "mean_bytes": mean,
        "kb_per_image": mean / 1e3,
        "mb_per_imagenet": mean * images / 1e6,
        "mean_width": float(np.mean([w for w, _ in headers])) if headers else 0.0,
        "mean_height": float(np.mean([h for _, h in headers])) if headers else 0.0,
    }


def cores_per_gpu(gpu_images_per_s: float, images_per_cpu_s: float) -> float:
    """Cores of the train kernel that keep one GPU consuming `gpu_images_per_s` fed (kernel only: the
    pipeline's own overheads are the planner's efficiency factor)."""
    return gpu_images_per_s / images_per_cpu_s if images_per_cpu_s > 0 else math.inf


def _ratios(row: Mapping[str, Any], base: Mapping[str, Any], crops: Sequence[int]) -> dict[str, float]:
    """Variant / base: bytes (< 1: smaller) and each kernel rate (> 1: faster)."""
    out = {"bytes": row["mean_bytes"] / base["mean_bytes"]}
    for crop in crops:
        out[f"train_{crop}"] = row["train"][str(crop)]["best"] / base["train"][str(crop)]["best"]
    out["eval"] = row["eval"]["best"] / base["eval"]["best"]
    return out


def summarise(
    grid: Sequence[Variant],
    stored: Mapping[str, Sequence[bytes]],
    timed: Mapping[str, Mapping[str, Any]],
    crops: Sequence[int],
    gpu_rates: Mapping[int, float],
) -> dict[str, Any]:
    """The variants table from `interleaved`'s results over `kernel_sides`: per variant its sizes, train
    (per crop) and eval rates, cores per GPU, and ratios against the originals and the reference variant."""
    gpu_at = {c: gpu_rate_at(c, gpu_rates) for c in crops}
    rows: dict[str, dict[str, Any]] = {}
    for v in grid:
        row: dict[str, Any] = {"max_side": v.max_side, "quality": v.quality, "images": len(stored[v.name])}
        row.update(sizes(stored[v.name]))
        row["train"] = {str(c): dict(timed[side_name(v.name, f"train{c}")]) for c in crops}
        row["eval"] = dict(timed[side_name(v.name, "eval")])
        row["cores_per_gpu"] = {str(c): cores_per_gpu(gpu_at[c][0], row["train"][str(c)]["best"]) for c in crops}
        rows[v.name] = row
    reference = reference_variant(grid).name
    for row in rows.values():
        row["vs_original"] = _ratios(row, rows[ORIGINAL], crops)
        row["vs_reference"] = _ratios(row, rows[reference], crops)
    return {
        "train_crops": list(crops),
        "reference": reference,
        "imagenet_train_images": IMAGENET_TRAIN_IMAGES,
        "gpu_images_per_s": {str(c): {"images_per_s": rate, "source": src} for c, (rate, src) in gpu_at.items()},
        "variants": rows,
    }


def format_table(section: Mapping[str, Any]) -> list[str]:
    """The printed table: one line per variant (rates are the best pass; the JSON has every pass)."""
    crops = section["train_crops"]
    ref = section["reference"]
    gpu = section["gpu_images_per_s"]
    lines = [
        f"\n4. stored variants, on core {section['core']} (best of {section['passes']} interleaved passes, images per "
        f"CPU-second; eval = resize {section['resize']} / crop {section['eval_crop']}); cores per GPU = G / train "
        "rate at G = "
        + ", ".join(f"{gpu[str(c)]['images_per_s']:,.0f} img/s at {c} px" for c in crops)
        + f"; ratios: / original and / {ref}",
        f"{'variant':18s}{'KB/img':>8s}{'MB/ImageNet':>12s}"
        + "".join(f"{'train ' + str(c):>10s}" for c in crops)
        + f"{'eval':>8s}"
        + "".join(f"{'cores ' + str(c):>10s}" for c in crops)
        + f"{'bytes /orig':>12s}{'train /orig':>12s}{'bytes /ref':>11s}{'train /ref':>11s}",
    ]
    first = str(crops[0])
    for name, row in section["variants"].items():
        lines.append(
            f"{name:18s}{row['kb_per_image']:8.1f}{row['mb_per_imagenet']:12,.0f}"
            + "".join(f"{row['train'][str(c)]['best']:10.0f}" for c in crops)
            + f"{row['eval']['best']:8.0f}"
            + "".join(f"{row['cores_per_gpu'][str(c)]:10.1f}" for c in crops)
            + f"{row['vs_original']['bytes']:11.2f}x{row['vs_original'][f'train_{first}']:11.2f}x"
            + f"{row['vs_reference']['bytes']:10.2f}x{row['vs_reference'][f'train_{first}']:10.2f}x"
        )
    return lines
