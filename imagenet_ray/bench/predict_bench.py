"""`imagenet-ray bench predict`: images/s of predict's Ray Data pipeline side by side with a plain single-process
loop: same inputs, model, decode kernel and cores, both ending with their Parquet written (run_predict_bench says
how each side is set up). Rounds alternate plain / Ray; the ratio is of the medians of the same run."""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from typing import TYPE_CHECKING, Any

from imagenet_ray.errors import ConfigError
from imagenet_ray.runtime import start_local_ray

if TYPE_CHECKING:
    from imagenet_ray.predict import ModelSpec

log = logging.getLogger(__name__)

# torch, Ray and predict are imported inside the functions: the CLI imports this module to build its parser,
# and `imagenet-ray --help` should not pay for them.


def _random_spec(architecture: str, resize: int, crop: int) -> ModelSpec:
    """A randomly initialised 1,000-class torchvision model (no download): the cost of the real one."""
    import torch

    from imagenet_ray.data.classes import imagenet_classes
    from imagenet_ray.predict import ModelSpec
    from imagenet_ray.train.models import build_model

    torch.manual_seed(0)
    classes = imagenet_classes()
    state = build_model(architecture, len(classes)).state_dict()
    return ModelSpec(architecture, len(classes), False, state, classes.wnids, classes.names, resize, crop)


def _available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _start_ray_on(cores: int) -> bool:
    """A local Ray on `cores` CPUs (this process and so Ray's workers pinned to them); False when Ray already
    runs here (then Ray Data's CPU limit keeps the pipeline to `cores`)."""
    import ray

    if ray.is_initialized():
        return False
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
    start_local_ray(num_cpus=cores, log_to_driver=False)
    return True


def run_predict_bench(
    images: str,
    cores: int,
    model: str | None = None,
    architecture: str = "resnet18",
    resize: int | None = None,
    crop: int | None = None,
    batch_size: int = 64,
    rounds: int = 3,
    workers: int | None = None,
    tracking_uri: str | None = None,
    work_dir: str | None = None,
) -> dict[str, Any]:
    """plain: one process reads, decodes and runs the model batch after batch, with `cores` torch threads.
    Ray: predict.write_predictions (decode tasks, `workers` CPU model actors of one thread each, the accounting and
    the publish) on `cores` CPUs: a local Ray started on them (this process, and so Ray's workers, pinned to them
    first), or Ray Data's CPU limit on a Ray already running here. Each side's time includes building its model:
    the actors' start-up is part of what the pipeline costs (small inputs favour the plain loop)."""
    import dataclasses

    import pyarrow.parquet as pq
    from ray.data import DataContext, ExecutionResources

    from imagenet_ray import storage
    from imagenet_ray.predict import (
        PipelineOptions,
        load_model_spec,
        open_inputs,
        predict_local,
        write_predictions,
    )
    from imagenet_ray.runtime import absolute_url

    if cores < 2:
        raise ConfigError("bench predict: --cores must be ≥ 2 (the pipeline decodes and runs the model apart)")
    if rounds < 1 or batch_size < 1 or (workers is not None and workers < 1):
        raise ConfigError("bench predict: --rounds, --batch-size and --workers must be ≥ 1")
    if workers is not None and workers >= cores:
        raise ConfigError(f"bench predict: --workers {workers} on {cores} cores leaves no CPU for reading")
    inputs = open_inputs(absolute_url(images))
    if model:
        spec = load_model_spec(model, tracking_uri, inputs.classes)
        spec = dataclasses.replace(spec, resize=resize or spec.resize, crop=crop or spec.crop)
    else:
        spec = _random_spec(architecture, resize or 256, crop or 224)
    if spec.crop > spec.resize:
        raise ConfigError("bench predict: --crop must not exceed --resize")
    options = PipelineOptions(batch_size=batch_size, workers=workers or cores - 1, use_gpu=False)
    started_ray = _start_ray_on(cores)
    context = DataContext.get_current()
    previous_limits = context.execution_options.resource_limits
    if not started_ray:
        context.execution_options.resource_limits = ExecutionResources(cpu=cores)
    root = work_dir or tempfile.mkdtemp(prefix="bench-predict-")
    plain: list[float] = []
    in_ray: list[float] = []
    broken = 0
    try:
        for r in range(rounds):
            start = time.perf_counter()
            table = predict_local(inputs, spec, batch_size, threads=cores)
            os.makedirs(os.path.join(root, f"plain-{r}"), exist_ok=True)
            pq.write_table(table, os.path.join(root, f"plain-{r}", "predictions.parquet"))
            plain.append(table.num_rows / (time.perf_counter() - start))
            out = storage.resolve(os.path.join(root, f"ray-{r}"))
            summary = write_predictions(inputs, spec, out, options, model_ref=model or f"random {architecture}")
            in_ray.append(summary.images_per_s)
            broken = summary.broken
            if table.num_rows != summary.images:
                raise RuntimeError(f"the plain loop wrote {table.num_rows} rows, the pipeline {summary.images}")
    finally:
        context.execution_options.resource_limits = previous_limits
    plain_med, ray_med = statistics.median(plain), statistics.median(in_ray)
    return {
        "images": inputs.count,
        "broken": broken,
        "input": inputs.describe(),
        "model": model or f"{architecture} (random init)",
        "architecture": spec.architecture,
        "resize": spec.resize,
        "crop": spec.crop,
        "batch": batch_size,
        "cores": cores,
        "workers": options.workers,
        "rounds": rounds,
        "plain_images_per_s": plain,
        "ray_images_per_s": in_ray,
        "plain_median": plain_med,
        "ray_median": ray_med,
        "ratio": ray_med / plain_med,
    }


def add_bench_predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, help="what `predict --images` takes (folder, layout, prepared)")
    p.add_argument("--cores", type=int, default=_available_cores(), help="CPUs for each side (default: all)")
    p.add_argument("--model", default=None, help="a `predict --model` reference (default: a random --architecture)")
    p.add_argument("--architecture", default="resnet18", help="torchvision model, randomly initialised")
    p.add_argument("--resize", type=int, default=None, help="default: the model's (256 for a random one)")
    p.add_argument("--crop", type=int, default=None, help="default: the model's (224 for a random one)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=None, help="model actors of the pipeline (default: cores - 1)")
    p.add_argument("--mlflow-uri", default=None, help="resolves a runs:/ or models:/ --model")
    p.add_argument("--json", default=None, help="also write the results here")


def run_bench_predict(args: argparse.Namespace) -> int:
    res = run_predict_bench(
        args.images,
        args.cores,
        model=args.model,
        architecture=args.architecture,
        resize=args.resize,
        crop=args.crop,
        batch_size=args.batch_size,
        rounds=args.rounds,
        workers=args.workers,
        tracking_uri=args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI"),
    )
    log.info(
        f"predict: Ray Data pipeline vs a plain loop ({res['input']}; {res['model']}, resize {res['resize']} "
        f"crop {res['crop']}, batch {res['batch']}, {res['cores']} cores, {res['rounds']} alternating rounds)"
    )
    ray_label = f"Ray Data, {res['workers']} model actor(s)"
    log.info(f"  {'plain single-process loop':<30}: {res['plain_median']:8.1f} img/s (median)")
    log.info(f"  {ray_label:<30}: {res['ray_median']:8.1f} img/s (median)")
    log.info(f"  {'ratio (Ray / plain)':<30}: {res['ratio']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0
