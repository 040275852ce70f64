"""The GPU script's data side: a folder of JPEGs → prepare's Parquet shards (its own writer, no Ray), then
nvJPEG decode + RandomResizedCrop on the device (data/device_decode.py), alone and feeding the training
step as train/runner.py does with decode_on=gpu (data wait = time blocked on the batch iterator)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imagenet_ray.bench.gpu_step import BenchStep, Timing, sync, window_summary

JPEG_SUFFIXES = (".jpeg", ".jpg")


def cpu_seconds() -> float:
    """CPU time of this process, all threads (nvJPEG's host work included), user + system."""
    t = os.times()
    return t.user + t.system


def list_jpegs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"no JPEG folder at {folder} (pass --jpegs DIR, or --synthetic N)")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in JPEG_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no .jpeg/.jpg files in {folder}")
    return paths


def synthetic_jpegs(work: Path, count: int) -> list[Path]:
    """`count` generated ImageNet-like JPEGs (the project's synth), for machines without the samples."""
    from imagenet_ray.data.layouts import KAGGLE_TRAIN_DIR
    from imagenet_ray.data.synth import write_synthetic_imagenet

    classes = max(1, min(4, count))
    write_synthetic_imagenet(str(work), classes, -(-count // classes), 0, seed=0)
    return sorted((work / KAGGLE_TRAIN_DIR).rglob("*.JPEG"))[:count]


def prepare_shards(jpegs: list[Path], work: Path) -> list[Path]:
    """The JPEGs as prepare writes them (class folders from the `<wnid>_` prefix, as bench data does)."""
    from imagenet_ray.bench.data import build_folder_layout
    from imagenet_ray.data.layouts import detect_and_list
    from imagenet_ray.data.prepare import PrepareOptions, plan_tasks, write_shard

    raw, out = work / "raw", work / "prepared"
    build_folder_layout(jpegs, raw, val_images=1)
    listing = detect_and_list(str(raw), layout="folders")
    tasks = [t for t in plan_tasks(listing, str(out), PrepareOptions(shard_mb=32)) if t["split"] == "train"]
    return [out / write_shard(t)["path"] for t in tasks]


def read_shards(shards: list[Path]) -> tuple[list[bytes], list[int], float]:
    """(JPEG bytes, labels, CPU-seconds the Parquet read took): the read side that Ray Data runs."""
    import pyarrow.parquet as pq

    images: list[bytes] = []
    labels: list[int] = []
    cpu0 = cpu_seconds()
    for path in shards:
        table = pq.read_table(path, columns=["image", "label"])
        images.extend(table.column("image").to_pylist())
        labels.extend(table.column("label").to_pylist())
    return images, labels, cpu_seconds() - cpu0


def describe_images(encoded: list[bytes]) -> dict[str, Any]:
    from io import BytesIO

    from PIL import Image

    sizes = [Image.open(BytesIO(b)).size for b in encoded]  # header only: no decode
    return {
        "count": len(encoded),
        "mean_kb": round(sum(map(len, encoded)) / len(encoded) / 1e3, 1),
        "mean_width": round(float(np.mean([w for w, _ in sizes]))),
        "mean_height": round(float(np.mean([h for _, h in sizes]))),
    }


def cycled(n_items: int, batch: int) -> Iterator[list[int]]:
    """Index batches that wrap around the images (fewer images than a timing needs)."""
    start = 0
    while True:
        yield [(start + k) % n_items for k in range(batch)]
        start = (start + batch) % n_items


def measure_decode(
    device: torch.device, encoded: list[bytes], batch: int, size: int | None, timing: Timing
) -> dict[str, Any]:
    """Batched nvJPEG decode alone (`size` None) or decode + RandomResizedCrop + flip to `size`."""
    from imagenet_ray.data.device_decode import decode_batch, train_batch_on_device

    rng = np.random.default_rng(0)
    batches = cycled(len(encoded), batch)

    def one() -> None:
        chunk = [encoded[i] for i in next(batches)]
        if size is None:
            decode_batch(chunk, device)
        else:
            train_batch_on_device(chunk, size, device, rng)

    for _ in range(max(1, timing.warmup_steps)):
        one()  # nvJPEG handles and buffers are made on the first batches
    sync(device)
    seconds, cores = [], []
    for _ in range(timing.windows):
        t, cpu = time.perf_counter(), cpu_seconds()
        for _ in range(timing.steps_per_window):
            one()
        sync(device)
        seconds.append(time.perf_counter() - t)
        cores.append((cpu_seconds() - cpu) / seconds[-1])
    out = window_summary(batch * timing.steps_per_window, seconds)
    out.update(
        what="decode_jpeg only" if size is None else "decode_jpeg + RandomResizedCrop + flip",
        batch=batch,
        size=size,
        cpu_cores_busy=round(float(np.median(cores)), 2),
    )
    return out


def device_batches(
    encoded: list[bytes], labels: list[int], batch: int, size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """What train/runner.py's train_batches yields with decode_on=gpu, from bytes already in memory
    (Ray Data's read and prefetch run in other processes)."""
    from imagenet_ray.data.device_decode import train_batch_on_device

    rng = np.random.default_rng(0)
    for idx in cycled(len(encoded), batch):
        images = train_batch_on_device([encoded[i] for i in idx], size, device, rng)
        yield images, torch.as_tensor([labels[i] for i in idx], dtype=torch.int64).to(device)


def measure_fed_step(
    step: BenchStep, encoded: list[bytes], labels: list[int], batch: int, size: int, timing: Timing
) -> dict[str, Any]:
    """The training step fed by the GPU decode path; data wait is the wall time blocked in next(), as
    perf/data_wait_frac counts it (no synchronisation between decode and step, as in training)."""
    device = step.device
    batches = device_batches(encoded, labels, batch, size, device)
    for _ in range(max(timing.warmup_steps, 3 if step.mode != "eager" else 1)):
        step(*next(batches))
    sync(device)
    seconds, waits, feed_cpu, cores = [], [], [], []
    for _ in range(timing.windows):
        t, cpu, wait, feed = time.perf_counter(), cpu_seconds(), 0.0, 0.0
        for _ in range(timing.steps_per_window):
            w, c = time.perf_counter(), cpu_seconds()
            images, target = next(batches)
            wait, feed = wait + time.perf_counter() - w, feed + cpu_seconds() - c
            step(images, target)
        sync(device)
        seconds.append(time.perf_counter() - t)
        waits.append(wait)
        feed_cpu.append(feed)
        cores.append((cpu_seconds() - cpu) / seconds[-1])
    out = window_summary(batch * timing.steps_per_window, seconds)
    out.update(
        mode=step.mode,
        size=size,
        batch=batch,
        data_wait_frac=round(sum(waits) / sum(seconds), 4),
        # Whole process (step launches, decode, CUDA's spin-wait at synchronisation), as cores busy.
        process_cpu_cores=round(float(np.median(cores)), 2),
        # CPU spent inside next(): the decode's host side (an upper bound: other threads count too).
        feed_cpu_cores=round(sum(feed_cpu) / sum(seconds), 2),
    )
    return out
