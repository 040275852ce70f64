"""`imagenet-ray bench train`: Ray Train's overhead on CPU, side by side with a plain PyTorch loop.

Both sides run training's own step (`train.step.TrainStep`) on the same in-memory uint8 batches, same
model and torch threads; one of them inside a TorchTrainer worker (reporting once per epoch). Rounds
alternate plain / Ray so that machine noise hits both; the ratio is of the medians of the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from imagenet_ray.runtime import start_local_ray

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# torch, Ray and the training modules are imported inside the functions: the CLI imports this module
# to build its parser, and `imagenet-ray --help` should not pay for them.


def _make_batches(
    num_images: int, size: int, batch_size: int, num_classes: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_images, size, size, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, num_classes, (num_images,), generator=g)
    return [(images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, num_images, batch_size)]


def _epochs_images_per_s(
    model_name: str,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    epochs: int,
    threads: int,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> list[float]:
    import torch

    from imagenet_ray.train.device import to_model_input
    from imagenet_ray.train.models import build_model
    from imagenet_ray.train.optim import build_sgd
    from imagenet_ray.train.step import TrainStep

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(model_name, 10).to(memory_format=torch.channels_last)
    if report is not None:
        import ray.train.torch

        model = ray.train.torch.prepare_model(model)
    optimizer = build_sgd(model, 0.05, 0.9, 5e-5)
    step = TrainStep(model, optimizer, lambda _: 0.05)  # fp32 on CPU, as training's precision "auto"
    rates = []
    for epoch in range(epochs):
        start, n = time.perf_counter(), 0
        for images, labels in batches:
            step(to_model_input(images), labels)
            n += labels.shape[0]
        step.flush()
        rates.append(n / (time.perf_counter() - start))
        if report is not None:
            report({"epoch": epoch, "images_per_s": rates[-1], "history": list(rates)})
    return rates


def _ray_worker(config: dict[str, Any]) -> None:
    from imagenet_ray.train.report import report_with_marker

    batches = _make_batches(config["images"], config["size"], config["batch"], 10)
    # Every epoch reports (as a real run does); the last report carries the history back.
    _epochs_images_per_s(config["model"], batches, config["epochs"], config["threads"], report=report_with_marker)


def run_train_overhead(
    model: str = "resnet18",
    images: int = 256,
    size: int = 64,
    batch: int = 32,
    epochs: int = 3,
    rounds: int = 3,
    threads: int = 1,
    storage: str | None = None,
) -> dict[str, Any]:
    import tempfile

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        start_local_ray(num_cpus=max(2, threads + 1), log_to_driver=False)
    batches = _make_batches(images, size, batch, 10)
    plain, in_ray = [], []
    storage = storage or tempfile.mkdtemp(prefix="bench-train-")
    config = {"model": model, "images": images, "size": size, "batch": batch, "epochs": epochs, "threads": threads}
    for r in range(rounds):
        # The first epoch of each side warms up allocator and kernels: report the later ones.
        plain.extend(_epochs_images_per_s(model, batches, epochs, threads)[1:])
        result = TorchTrainer(
            _ray_worker,
            train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": threads}),
            run_config=ray.train.RunConfig(name=f"overhead-{r}-{time.time_ns()}", storage_path=storage),
        ).fit()
        history = list((result.metrics or {}).get("history", []))
        if not history:
            raise RuntimeError("the Ray Train side reported no throughput")
        in_ray.extend(history[1:] if len(history) > 1 else history)
    plain_med, ray_med = statistics.median(plain), statistics.median(in_ray)
    return {
        "model": model,
        "image_size": size,
        "batch": batch,
        "threads": threads,
        "rounds": rounds,
        "plain_images_per_s": plain,
        "ray_images_per_s": in_ray,
        "plain_median": plain_med,
        "ray_median": ray_med,
        "ratio": ray_med / plain_med,
        "target": 0.95,
    }


def add_bench_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="resnet18")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the results here")


def run_bench_train(args: argparse.Namespace) -> int:
    res = run_train_overhead(
        args.model, args.images, args.size, args.batch_size, args.epochs, args.rounds, args.threads
    )
    log.info(
        f"Ray Train overhead ({res['model']}, {res['image_size']} px, batch {res['batch']}, "
        f"{res['threads']} thread(s), {res['rounds']} alternating rounds)"
    )
    log.info(f"  plain PyTorch loop : {res['plain_median']:8.1f} img/s (median)")
    log.info(f"  TorchTrainer worker: {res['ray_median']:8.1f} img/s (median)")
    log.info(f"  ratio              : {res['ratio']:.3f}  (target ≥ {res['target']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0
