"""Step curves and progress lines during an epoch (torchvision's `MetricLogger.log_every`, for a cluster):
every `every_steps` optimizer steps each worker all-reduces the interval's totals asynchronously, read at
the next interval (no step waits for it); rank 0 turns them into step-curve metrics and, at most every
`every_s`, a line with the epoch's and the run's ETA."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclass(frozen=True)
class Interval:
    """One interval's totals over all workers, ending at optimizer step `step`."""

    step: int
    loss_sum: float  # summed per-image loss (0 when nothing was trained)
    images: float
    wait_s: float  # data wait summed over workers
    wall_s: float  # wall time summed over workers
    world: int
    grad_norm_sum: float = 0.0  # pre-clip gradient norms of the interval's steps, summed over workers
    grad_norm_steps: float = 0.0  # how many norms that sum holds (0 when clipping is off)

    def metrics(self, lr: float | None) -> dict[str, float]:
        """The step-curve values (MLflow step = `step`, the global optimizer step)."""
        out: dict[str, float] = {
            "perf/images_per_s": self.images / max(self.wall_s / self.world, 1e-9),
            "perf/data_wait_frac": self.wait_s / max(self.wall_s, 1e-9),
        }
        if lr is not None:
            out["train/loss"] = self.loss_sum / max(self.images, 1.0)
            out["train/lr"] = lr
        if self.grad_norm_steps:
            out["train/grad_norm"] = self.grad_norm_sum / self.grad_norm_steps
        return out


class IntervalMeter:
    """One worker's running interval; every rank calls `add` per batch and `cut` at the same steps."""

    def __init__(self, every_steps: int, device: torch.device, clock: Callable[[], float] = time.perf_counter) -> None:
        self.every_steps, self.device, self._clock = every_steps, device, clock
        self.world = dist.get_world_size() if _distributed() else 1
        self._loss = torch.zeros((), dtype=torch.float64, device=device)
        self._images, self._wait_s = 0, 0.0
        self._grad_norm = torch.zeros((), dtype=torch.float64, device=device)
        self._grad_norm_steps = 0
        self._start = clock()
        self._last_cut_step = -1
        # (step, totals, async work, CUDA event after the totals' copy to the host)
        self._in_flight: tuple[int, torch.Tensor, Any, Any] | None = None

    def add(
        self, images: int, wait_s: float, loss_sum: torch.Tensor | None = None, grad_norm: torch.Tensor | None = None
    ) -> None:
        """`grad_norm`: the pre-clip gradient norm of an optimizer step taken on this batch (a device tensor:
        added on the device, read with the interval's totals, so it costs no sync)."""
        self._images += images
        self._wait_s += wait_s
        if loss_sum is not None:
            self._loss += loss_sum
        if grad_norm is not None:
            self._grad_norm += grad_norm
            self._grad_norm_steps += 1

    def due(self, step: int) -> bool:
        return step > 0 and step % self.every_steps == 0 and step != self._last_cut_step

    def cut(self, step: int) -> Interval | None:
        """Close the interval ending at `step` (its reduction is started) and return the previous one."""
        now = self._clock()
        totals = torch.stack(
            [
                self._loss,
                torch.tensor(float(self._images), dtype=torch.float64, device=self.device),
                torch.tensor(self._wait_s, dtype=torch.float64, device=self.device),
                torch.tensor(now - self._start, dtype=torch.float64, device=self.device),
                self._grad_norm,
                torch.tensor(float(self._grad_norm_steps), dtype=torch.float64, device=self.device),
            ]
        )
        work = dist.all_reduce(totals, op=dist.ReduceOp.SUM, async_op=True) if _distributed() else None
        previous = self._collect()
        event = None
        if totals.is_cuda:
            # Reading a CUDA tensor later would wait for every kernel queued by then (the next steps' too):
            # copy it to pinned host memory behind the collective now, and later wait for that copy alone.
            if work is not None:
                work.wait()  # NCCL: the stream waits for the collective; the host does not
                work = None
            host = torch.empty(totals.shape, dtype=totals.dtype, pin_memory=True)
            host.copy_(totals, non_blocking=True)
            totals, event = host, torch.cuda.Event()
            event.record()
        self._in_flight = (step, totals, work, event)
        self._last_cut_step = step
        self._loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self._images, self._wait_s, self._start = 0, 0.0, now
        self._grad_norm = torch.zeros((), dtype=torch.float64, device=self.device)
        self._grad_norm_steps = 0
        return previous

    def finish(self) -> Interval | None:
        """The last reduced interval (at the end of the epoch); the partial one after it is not a point."""
        return self._collect()

    def _collect(self) -> Interval | None:
        if self._in_flight is None:
            return None
        step, totals, work, event = self._in_flight
        self._in_flight = None
        if work is not None:
            work.wait()
        if event is not None:
            event.synchronize()
        loss_sum, images, wait_s, wall_s, norm_sum, norm_steps = totals.tolist()
        return Interval(step, loss_sum, images, wait_s, wall_s, self.world, norm_sum, norm_steps)


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


@dataclass
class ProgressLine:
    """Rank 0's progress line: at most one every `every_s`, with the epoch's and the run's ETA."""

    epochs: int
    steps_per_epoch: int
    every_s: float
    clock: Callable[[], float] = time.monotonic
    epoch_s: float | None = None  # the last whole epoch (with validation), for the run's ETA
    _last: float | None = None

    def line(self, epoch: int, step_in_epoch: int, interval: Interval, elapsed_s: float) -> str | None:
        """`epoch` is 0-based; `elapsed_s` the time spent in this epoch so far; None when not due."""
        now = self.clock()
        if self._last is not None and now - self._last < self.every_s:
            return None
        self._last = now
        rate = step_in_epoch / max(elapsed_s, 1e-9)  # steps per second in this epoch
        left_epoch = max(0, self.steps_per_epoch - step_in_epoch) / max(rate, 1e-9)
        per_epoch = self.epoch_s if self.epoch_s is not None else self.steps_per_epoch / max(rate, 1e-9)
        left_run = left_epoch + per_epoch * (self.epochs - epoch - 1)
        m = interval.metrics(lr=0.0)
        loss = f" loss={m['train/loss']:.4f}" if interval.loss_sum else ""
        return (
            f"[epoch {epoch + 1}/{self.epochs}] step {step_in_epoch}/{self.steps_per_epoch}{loss} "
            f"images/s={m['perf/images_per_s']:.1f} data_wait={m['perf/data_wait_frac']:.2f} "
            f"eta epoch {format_duration(left_epoch)}, run {format_duration(left_run)}"
        )
