"""The training step, used by training and by `bench train`: forward under autocast, backward, and one
optimizer step per `accum_steps` micro-batches (DDP's all-reduce skipped on the others)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from imagenet_ray.train.device import autocast_context
from imagenet_ray.train.optim import set_lr


def loss_fn(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Mean cross-entropy; `target` is class indices or (already smoothed) soft targets."""
    if target.dtype.is_floating_point:
        return F.cross_entropy(logits.float(), target)
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


class TrainStep:
    """Call it on each micro-batch of model input; call `flush` at the end of an epoch.

    `lr_at(step)` gives the learning rate of optimizer step `step` (a pure function of progress);
    `after_step(step)` runs after each optimizer step (the EMA update). `ddp` is the module whose
    `no_sync` skips the gradient all-reduce (default: `model`, when it has one). `clip_grad_norm` clips
    the global gradient norm before each optimizer step; `grad_norm` is then the norm before clipping of
    the step the last call took (a device tensor, None when that call took no step).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_at: Callable[[int], float],
        *,
        accum_steps: int = 1,
        amp: torch.dtype | None = None,
        label_smoothing: float = 0.0,
        after_step: Callable[[int], None] | None = None,
        ddp: nn.Module | None = None,
        step: int = 0,
        clip_grad_norm: float | None = None,
    ) -> None:
        self.model, self.optimizer, self.lr_at = model, optimizer, lr_at
        self.accum_steps, self.amp, self.label_smoothing = accum_steps, amp, label_smoothing
        self.after_step = after_step
        self.clip_grad_norm = clip_grad_norm
        self.grad_norm: torch.Tensor | None = None
        self._no_sync = getattr(ddp if ddp is not None else model, "no_sync", None)
        self.step = step  # optimizer steps taken so far (the LR schedule's position)
        self.pending = 0  # micro-batches since the last optimizer step

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns its summed (not mean) loss, float64, detached."""
        self.grad_norm = None
        self.pending += 1
        final = self.pending == self.accum_steps
        sync_context = self._no_sync() if not final and self._no_sync is not None else contextlib.nullcontext()
        with sync_context:
            with autocast_context(x.device, self.amp):
                logits = self.model(x)
            loss = loss_fn(logits, target, self.label_smoothing)
            (loss / self.accum_steps).backward()
        if final:
            self._optimizer_step()
        return loss.detach().double() * target.shape[0]

    def skip(self) -> None:
        """A micro-batch consumed without training (train.skip_step): counted like one, so the step axis
        of the curves and checkpoints still moves."""
        self.pending += 1
        if self.pending == self.accum_steps:
            self.step += 1
            self.pending = 0

    def flush(self) -> None:
        """Step on a last partial accumulation (every rank has as many micro-batches, so all call this)."""
        if self.pending == 0:
            return
        if self._no_sync is not None:
            _average_gradients(self.model)  # those micro-batches ran under no_sync: nothing was all-reduced
        self._optimizer_step()

    def _optimizer_step(self) -> None:
        set_lr(self.optimizer, self.lr_at(self.step))
        if self.clip_grad_norm is not None:
            # Once per optimizer step, on the accumulated and all-reduced gradients (the same on every rank).
            # No GradScaler to unscale first: train.precision is bf16 or fp32, and neither needs one.
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            self.grad_norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm).detach()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.pending = 0
        if self.after_step is not None:
            self.after_step(self.step)


class StepPacer:
    """Paces training steps so that a worker consumes at most `images_per_s` (None: no pacing at all).

    train.throttle_images_per_s: stands in for a GPU of that speed on CPU-only test clusters, for capacity
    checks. After the real step it sleeps the rest of images / rate; the sleep is step time, not data wait.
    """

    def __init__(
        self,
        images_per_s: float | None,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if images_per_s is not None and images_per_s <= 0:
            raise ValueError(f"images_per_s must be > 0, got {images_per_s}")
        self.images_per_s, self._clock, self._sleep = images_per_s, clock, sleep
        self.slept_s = 0.0  # total pacing sleep so far

    @contextlib.contextmanager
    def pace(self, images: int) -> Iterator[None]:
        """Wrap one step of `images` images; it lasts at least images / images_per_s seconds."""
        if self.images_per_s is None:
            yield
            return
        start = self._clock()
        yield
        # On CUDA the step's kernels may still be queued: the sleep then overlaps them (a slower real
        # step than the throttle wins either way).
        remaining = images / self.images_per_s - (self._clock() - start)
        if remaining > 0:
            self._sleep(remaining)
            self.slept_s += remaining


def _average_gradients(model: nn.Module) -> None:
    """Mean of every gradient over the ranks, as DDP's all-reduce would have given it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad.div_(world)
