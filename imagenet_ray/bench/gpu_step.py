"""The GPU script's training step (ResNet-50, SGD with momentum, cross-entropy; bf16 autocast on CUDA,
channels_last) in eager or `torch.compile` modes, and its timing: synchronized windows after warm-up,
median images/s. Imports only torch, torchvision and the project's pure train modules."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from imagenet_ray.train.device import autocast_context, to_model_input
from imagenet_ray.train.optim import build_sgd
from imagenet_ray.train.step import loss_fn

ARCHS = ("resnet50", "resnet-tiny", "probe")
EAGER = "eager"
# torch.compile modes; "default" is what model.compile=true trains with.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
AUTOTUNE_MODES = ("max-autotune-no-cudagraphs", "max-autotune")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(arch: str) -> nn.Module:
    """resnet50: torchvision's, as build_model makes it without timm (the device machine lacks it).
    resnet-tiny: the same Bottleneck code, one block per stage, for CPU tests; probe: a few layers, for
    compiling on CPU in seconds."""
    import torchvision.models
    from torchvision.models.resnet import Bottleneck, ResNet

    model: nn.Module
    if arch == "resnet50":
        model = torchvision.models.resnet50(num_classes=1000)
    elif arch == "resnet-tiny":
        model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=1000, width_per_group=16)
    elif arch == "probe":
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 1000),
        )
    else:
        raise ValueError(f"unknown arch {arch!r} (known: {', '.join(ARCHS)})")
    return model


class BenchStep:
    """One real training step on uint8 (N, H, W, 3) images: normalise, forward, loss, backward, SGD step.

    Only the model is compiled, as model.compile does in training; the optimizer step stays eager."""

    def __init__(self, arch: str, mode: str, device: torch.device) -> None:
        if mode != EAGER and mode not in COMPILE_MODES:
            raise ValueError(f"unknown mode {mode!r} (known: {EAGER}, {', '.join(COMPILE_MODES)})")
        self.mode, self.device = mode, device
        self.model = build_model(arch).to(device).to(memory_format=torch.channels_last)
        self.opt = build_sgd(self.model, 0.1, 0.9, 5e-5)
        # dynamic=False: each size compiles its own static graph (CUDA graphs need static shapes).
        self.forward: Callable[[torch.Tensor], torch.Tensor] = (
            self.model
            if mode == EAGER
            else torch.compile(self.model, mode=None if mode == "default" else mode, dynamic=False)
        )
        self.cudagraphs = mode in CUDAGRAPH_MODES
        self.amp = torch.bfloat16 if device.type == "cuda" else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if self.cudagraphs:
            # A new iteration: the graph may overwrite last step's outputs (all consumed by now).
            torch.compiler.cudagraph_mark_step_begin()
        with autocast_context(self.device, self.amp):
            logits = self.forward(to_model_input(images))
        loss = loss_fn(logits, labels, 0.1)
        loss.backward()
        self.opt.step()
        # Gradients dropped before the next replay reuses the graph's memory.
        self.opt.zero_grad(set_to_none=True)

    def close(self) -> None:
        del self.forward, self.model, self.opt
        release_device_memory(self.device)


def release_device_memory(device: torch.device) -> None:
    """Frees compiled graphs (and their CUDA-graph pools) and cached blocks between measurements."""
    import torch._dynamo

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Timing:
    warmup_steps: int  # excluded from the windows; a compiled step also compiles (and records) here
    windows: int
    steps_per_window: int

    @property
    def steps(self) -> int:
        return self.warmup_steps + self.windows * self.steps_per_window


def window_summary(images_per_window: int, seconds: list[float]) -> dict[str, Any]:
    rates = [images_per_window / s for s in seconds]
    return {
        "images_per_s": statistics.median(rates),
        "window_images_per_s": [round(r, 1) for r in rates],
        "window_s": [round(s, 4) for s in seconds],
    }


COUNTERS = {("inductor", "cudagraph_skips"), ("inductor", "fxgraph_cache_hit"), ("inductor", "fxgraph_cache_miss")}


def compile_counters() -> dict[str, int]:
    """torch.compile's counters that say whether CUDA graphs ran and compiled graphs came from the cache."""
    from torch._dynamo.utils import counters

    return {name: int(counters[group][name]) for group, name in sorted(COUNTERS)}


def measure_step(step: BenchStep, batch: int, size: int, timing: Timing) -> dict[str, Any]:
    """Images/s of `step` on one device-resident random batch (the ceiling: no data loading)."""
    device = step.device
    counters_before = compile_counters()
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    step(images, labels)
    sync(device)
    first_step_s = time.perf_counter() - t0
    # CUDA graphs: warm-up run, then recording, then replays: at least 3 calls before timing.
    warmup = max(timing.warmup_steps, 3 if step.mode != EAGER else 1)
    for _ in range(warmup - 1):
        step(images, labels)
    sync(device)
    warmup_s = time.perf_counter() - t0
    seconds = []
    for _ in range(timing.windows):
        t = time.perf_counter()
        for _ in range(timing.steps_per_window):
            step(images, labels)
        sync(device)
        seconds.append(time.perf_counter() - t)
    out = window_summary(batch * timing.steps_per_window, seconds)
    out.update(
        mode=step.mode,
        size=size,
        batch=batch,
        steps_per_window=timing.steps_per_window,
        # The first call compiles (compiled modes); kept out of the windows, reported here.
        first_step_s=round(first_step_s, 2),
        warmup_steps=warmup,
        warmup_s=round(warmup_s, 2),
    )
    if step.mode != EAGER:
        # cudagraph_skips > 0: a CUDA-graph mode ran without graphs (the log says why).
        out.update({k: v - counters_before[k] for k, v in compile_counters().items()})
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out
