"""The plan's measured inputs: the train kernel's images per CPU-second on a sample of a prepared dataset's
shards (or from `bench data --json`), the GPU script's results.json, and bytes per image from the manifest.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagenet_ray.capacity.model import Sourced, scale_to_size
from imagenet_ray.errors import UserError, describe_error

if TYPE_CHECKING:
    import numpy as np
    import pyarrow.fs as pafs

    from imagenet_ray.config import DataSection

log = logging.getLogger(__name__)

SAMPLE_ROWS_PER_SHARD = 256  # one row group of prepare's shards
SAMPLE_SHARDS = 2
SAMPLE_PASSES = 2


def variant_name(max_side: int | None) -> str:
    """The prepared variant as `bench data` names it: "original" or "max_side_N"."""
    return "original" if max_side is None else f"max_side_{max_side}"


def manifest_variant(manifest: Mapping[str, Any]) -> str:
    return variant_name(manifest.get("options", {}).get("max_side"))


def bytes_per_image(manifest: Mapping[str, Any], split: str = "train") -> float:
    """Stored bytes per image of a split: its shards' bytes over their rows (what object storage serves)."""
    shards = manifest["splits"][split]["shards"]
    rows = sum(int(s["rows"]) for s in shards)
    if rows == 0:
        raise UserError(f"plan: the {split} split of the dataset has no images")
    return sum(int(s["bytes"]) for s in shards) / rows


def gpu_crop_range(data: DataSection, epochs: int) -> tuple[int, int]:
    """(smallest, largest) train crop the model sees over the schedule (progressive resizing)."""
    from imagenet_ray.train.device import train_size_for_epoch

    sizes = [train_size_for_epoch(data, epoch) for epoch in range(epochs)]
    return min(sizes), max(sizes)


# --- the kernel, measured here ------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelSample:
    """CPU time to read a sample of a dataset's train rows and (decode_on=cpu) decode + augment them."""

    images: int
    shards: int
    read_cpu_s: float
    decode_cpu_s: float  # 0 with decode_on=gpu: the CPU side only reads bytes
    decode_on: str
    crop: int

    @property
    def images_per_core_s(self) -> float:
        return self.images / max(self.read_cpu_s + self.decode_cpu_s, 1e-9)


def measure_kernel(
    url: str,
    crop: int,
    decode_on: str = "cpu",
    rows_per_shard: int = SAMPLE_ROWS_PER_SHARD,
    shards: int = SAMPLE_SHARDS,
    passes: int = SAMPLE_PASSES,
    seed: int = 0,
) -> KernelSample:
    """Time the pipeline's own train kernel (`transforms.train_batch` on 32-row chunks, one torch thread, as
    a Ray Data task with num_cpus=1 runs it) on the first rows of the first train shards of `url`.

    Rates are images per CPU-second of this process (`time.process_time`): what one core of *this* machine
    delivers; run it on a decode node for the cluster's cores. The sample is `rows_per_shard` rows of each
    of `shards` shards (more shards when they are smaller); read and kernel are each the best of `passes`,
    the kernel after a warm-up chunk."""
    from imagenet_ray.data.format import open_prepared

    if rows_per_shard < 1 or shards < 1 or passes < 1:
        raise UserError("plan: the kernel sample needs ≥ 1 row, shard and pass")
    fs, paths = open_prepared(url).shard_paths("train")
    wanted = rows_per_shard * shards
    blocks: list[dict[str, np.ndarray]] = []
    read_s = 0.0
    for path in paths:
        if sum(len(b["label"]) for b in blocks) >= wanted:
            break
        block, seconds = _read_rows(fs, path, rows_per_shard, passes)
        if len(block["label"]):
            blocks.append(block)
            read_s += seconds
    images = sum(len(b["label"]) for b in blocks)
    if images == 0:
        raise UserError(f"{url}: no rows in the train shards")
    decode_s = 0.0 if decode_on == "gpu" else _time_kernel(blocks, crop, passes, seed)
    return KernelSample(images, len(blocks), read_s, decode_s, decode_on, crop)


def _read_rows(fs: pafs.FileSystem, path: str, rows: int, passes: int) -> tuple[dict[str, np.ndarray], float]:
    """The first `rows` rows (image bytes + label) of a shard as the pipeline's numpy batches hold them,
    and the best CPU time of reading them (open, footer, row groups, to numpy)."""
    import numpy as np
    import pyarrow.parquet as pq

    best, block = math.inf, {"image": np.empty(0, dtype=object), "label": np.empty(0, dtype=np.int64)}
    for _ in range(passes):
        start = time.process_time()
        with fs.open_input_file(path) as f:
            batch = next(pq.ParquetFile(f).iter_batches(batch_size=rows, columns=["image", "label"]), None)
        if batch is not None:
            block = {
                "image": batch.column("image").to_numpy(zero_copy_only=False),
                "label": batch.column("label").to_numpy(),
            }
        best = min(best, time.process_time() - start)
    return block, best


def _time_kernel(blocks: list[dict[str, np.ndarray]], crop: int, passes: int, seed: int) -> float:
    import numpy as np
    import torch

    from imagenet_ray.data import transforms
    from imagenet_ray.data.pipeline import DECODE_BATCH_ROWS, row_chunks

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(seed)
        transforms.train_batch(next(row_chunks(blocks[0], DECODE_BATCH_ROWS)), crop, rng)  # warm-up
        best = math.inf
        for _ in range(passes):
            start = time.process_time()
            for block in blocks:
                for chunk in row_chunks(block, DECODE_BATCH_ROWS):
                    transforms.train_batch(chunk, crop, rng)
            best = min(best, time.process_time() - start)
        return best
    finally:
        torch.set_num_threads(threads)


def kernel_rate(url: str, crop: int, decode_on: str, rows_per_shard: int, shards: int) -> Sourced:
    from imagenet_ray.data.decode import crop_decoder_description

    sample = measure_kernel(url, crop, decode_on, rows_per_shard, shards)
    what = "read only (decode_on=gpu)" if decode_on == "gpu" else f"read + train kernel at {crop} px"
    decoder = "" if decode_on == "gpu" else f", {crop_decoder_description()}"
    return Sourced(
        sample.images_per_core_s,
        f"measured on this machine: {what}, {sample.images} images of {sample.shards} shard(s){decoder}",
    )


# --- rates measured elsewhere ---------------------------------------------------------------------------------


def _load_json(path: str, flag: str) -> dict[str, Any]:
    try:
        loaded = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"plan {flag} {path}: {describe_error(exc, 200)}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"plan {flag} {path}: not a JSON object")
    return loaded


def kernel_rate_from_bench_json(path: str, variant: str, crop: int) -> Sourced:
    """The train kernel's images per CPU-second for `variant` from `bench data --json`: the median over its
    fresh processes when it ran several (`kernel.processes`), else the best pass of its one process."""
    report = _load_json(path, "--bench-json")
    variants = report.get("kernel", {}).get("variants")
    if not isinstance(variants, dict):
        raise UserError(f"plan --bench-json {path}: no kernel section (bench data ran with --skip-kernel?)")
    if variant not in variants:
        raise UserError(
            f"plan --bench-json {path}: no kernel result for the dataset's variant {variant!r} "
            f"(it has {', '.join(variants)}); rerun bench data with that --max-side"
        )
    processes = report["kernel"].get("processes", {})
    per_process = processes.get("variants", {}).get(variant, {}).get("train_ours_best")
    if per_process:
        rate, how = float(per_process["median"]), f"median of {processes['count']} processes"
    else:
        rate, how = float(variants[variant]["train"]["ours"]["best"]), "best pass of 1 process"
    measured_crop = report.get("settings", {}).get("crop")
    if measured_crop != crop:
        log.warning(f"plan: {path} measured the kernel at crop {measured_crop}, the config decodes to {crop}")
    return Sourced(rate, f"bench data JSON {path}: train kernel, {variant}, {how}, crop {measured_crop}")


def gpu_rates_from_json(path: str, model: str, size: int) -> tuple[Sourced, Sourced | None]:
    """(training images/s per GPU at `size`, nvJPEG images/s or None) from the GPU script's results.json.

    The script measures ResNet-50 only; its ceiling is scaled ∝ pixels from the size it ran at."""
    results = _load_json(path, "--gpu-json")
    ceiling = results.get("ceiling")
    if not isinstance(ceiling, dict) or "images_per_s" not in ceiling:
        raise UserError(f"plan --gpu-json {path}: no ceiling.images_per_s (not the GPU script's results.json)")
    if model != "resnet50":
        raise UserError(f"plan --gpu-json {path}: the GPU script measures resnet50, the config trains {model}")
    measured_size = int(ceiling.get("size", size))
    device = results.get("device", "?")
    scaled = "" if measured_size == size else f", scaled ∝ pixels from {measured_size} to {size} px"
    train = Sourced(
        scale_to_size(float(ceiling["images_per_s"]), measured_size, size),
        f"GPU script {path} on {device}: ceiling {float(ceiling['images_per_s']):,.0f} img/s at "
        f"{measured_size} px{scaled}",
    )
    decode = results.get("gpu_decode")
    if not isinstance(decode, dict) or "images_per_s" not in decode:
        return train, None
    return train, Sourced(float(decode["images_per_s"]), f"GPU script {path} on {device}: gpu_decode")
