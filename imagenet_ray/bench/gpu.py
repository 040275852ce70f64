"""GPU check, ready for a lent H200 (`python -m imagenet_ray.bench.gpu --out DIR`); also runs on CPU.

Uses only the project's pure modules (the device machine has no Ray, MLflow or pydantic): the ResNet-50
training-step ceiling on device-resident batches, nvJPEG decode + RandomResizedCrop on the device, and
that path end to end from prepare's Parquet shards; the targets are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: `--help` stays fast
    import torch


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _resnet50_and_sgd(device: torch.device) -> tuple[torch.nn.Module, torch.optim.SGD]:
    import torch
    import torchvision.models

    from imagenet_ray.train.optim import build_sgd

    # torchvision's ResNet-50 as build_model makes it (no BlurPool), without timm: the device has only torch.
    model = torchvision.models.resnet50(num_classes=1000).to(device).to(memory_format=torch.channels_last)
    return model, build_sgd(model, 0.1, 0.9, 5e-5)


def ceiling(device: torch.device, batch: int, steps: int, size: int, compile_model: bool) -> dict[str, Any]:
    import torch

    from imagenet_ray.train.device import autocast_context, to_model_input
    from imagenet_ray.train.step import loss_fn

    model, opt = _resnet50_and_sgd(device)
    step_model = torch.compile(model) if compile_model else model
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else None

    def one() -> None:
        with autocast_context(device, dtype):
            logits = step_model(to_model_input(images))
        loss = loss_fn(logits, labels, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(max(3, steps // 5)):
        one()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    _sync(device)
    seconds = time.perf_counter() - t0
    return {
        "images_per_s": batch * steps / seconds,
        "batch": batch,
        "steps": steps,
        "size": size,
        "compile": compile_model,
    }


def make_shards(work: Path, classes: int, per_class: int) -> list[Path]:
    """Synthetic ImageNet-like JPEGs → Parquet shards with prepare's own (pure) writer, no Ray."""
    from imagenet_ray.data.layouts import detect_and_list
    from imagenet_ray.data.prepare import PrepareOptions, plan_tasks, write_shard
    from imagenet_ray.data.synth import write_synthetic_imagenet

    raw, out = work / "raw", work / "prepared"
    write_synthetic_imagenet(str(raw), classes, per_class, 1, seed=0)
    listing = detect_and_list(str(raw))
    tasks = [t for t in plan_tasks(listing, str(out), PrepareOptions(shard_mb=32)) if t["split"] == "train"]
    return [out / write_shard(t)["path"] for t in tasks]


def read_encoded(shards: list[Path]) -> tuple[list[bytes], list[int]]:
    import pyarrow.parquet as pq

    images, labels = [], []
    for path in shards:
        table = pq.read_table(path, columns=["image", "label"])
        images.extend(table.column("image").to_pylist())
        labels.extend(table.column("label").to_pylist())
    return images, labels


def gpu_decode(device: torch.device, encoded: list[bytes], batch: int, size: int, rounds: int) -> dict[str, Any]:
    import numpy as np

    from imagenet_ray.data.device_decode import train_batch_on_device

    rng = np.random.default_rng(0)
    train_batch_on_device(encoded[:batch], size, device, rng)  # warm up nvJPEG
    _sync(device)
    t0, n = time.perf_counter(), 0
    for _ in range(rounds):
        for i in range(0, len(encoded) - batch + 1, batch):
            train_batch_on_device(encoded[i : i + batch], size, device, rng)
            n += batch
    _sync(device)
    return {"images_per_s": n / (time.perf_counter() - t0), "batch": batch, "size": size}


def end_to_end(
    device: torch.device, encoded: list[bytes], labels: list[int], batch: int, size: int, rounds: int
) -> dict[str, Any]:
    import numpy as np
    import torch

    from imagenet_ray.data.device_decode import train_batch_on_device
    from imagenet_ray.train.device import autocast_context, to_model_input
    from imagenet_ray.train.step import loss_fn

    model, opt = _resnet50_and_sgd(device)
    rng = np.random.default_rng(0)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    data_s = step_s = 0.0
    n = 0
    for r in range(rounds + 1):
        for i in range(0, len(encoded) - batch + 1, batch):
            t0 = time.perf_counter()
            images = train_batch_on_device(encoded[i : i + batch], size, device, rng)
            target = torch.as_tensor(labels[i : i + batch], device=device)
            _sync(device)
            t1 = time.perf_counter()
            with autocast_context(device, dtype):
                logits = model(to_model_input(images))
            loss = loss_fn(logits, target, 0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _sync(device)
            t2 = time.perf_counter()
            if r > 0:  # round 0 warms up
                data_s, step_s, n = data_s + (t1 - t0), step_s + (t2 - t1), n + batch
    return {
        "images_per_s": n / (data_s + step_s),
        "data_wait_frac": data_s / (data_s + step_s),
        "note": "decode and step run one after the other in one process (no Ray on the device machine); "
        "with Ray Data prefetching the decode of batch i+1 overlaps the step of batch i",
    }


def main(argv: list[str] | None = None) -> int:
    import tempfile

    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write results.json here")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--per-class", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    results["ceiling"] = ceiling(device, args.batch, args.steps, args.size, args.compile)
    print(json.dumps(results, indent=1), flush=True)  # the result so far, on stdout (a device run may be cut short)
    with tempfile.TemporaryDirectory() as tmp:
        encoded, labels = read_encoded(make_shards(Path(tmp), args.classes, args.per_class))
    results["gpu_decode"] = gpu_decode(device, encoded, args.batch, args.size, args.rounds)
    results["end_to_end_gpu_decode"] = end_to_end(device, encoded, labels, args.batch, args.size, args.rounds)
    print(json.dumps(results, indent=1), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
