"""Optimizer parameter groups and learning-rate schedules (pure functions of the step)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

if TYPE_CHECKING:  # the GPU benchmark imports this module on a machine without pydantic
    from imagenet_ray.config import OptimSection

# Module types whose parameters get no weight decay (decided by module type, not parameter name).
_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)


def scaled_lr(lr_per_256: float, global_batch: int) -> float:
    """Linear scaling rule (Goyal et al., 2017): the learning rate grows with the global batch."""
    return lr_per_256 * global_batch / 256


@dataclass(frozen=True)
class LrSchedule:
    """Learning rate as a pure function of the optimizer step (0-based)."""

    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | step | constant | poly
    steps_per_epoch: int = 1
    step_epochs: int = 30
    step_gamma: float = 0.1
    warmup_start_factor: float = 0.0
    poly_power: float = 2.0
    poly_end_lr: float = 0.0

    def __call__(self, step: int) -> float:
        if self.warmup_steps > 0 and step < self.warmup_steps:
            f = self.warmup_start_factor
            return self.peak_lr * (f + (1.0 - f) * (step + 1) / self.warmup_steps)
        if self.schedule == "constant":
            return self.peak_lr
        if self.schedule == "step":  # torchvision V1: ×gamma every step_epochs epochs
            epoch = step // max(1, self.steps_per_epoch)
            return self.peak_lr * self.step_gamma ** (epoch // self.step_epochs)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.schedule == "cosine":
            return self.peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.schedule == "linear":  # FFCV: linear ramp to the peak, then linear to 0
            return self.peak_lr * (1.0 - progress)
        if self.schedule == "poly":  # MLPerf ResNet-50 (LARS): power 2 to an end LR
            return self.poly_end_lr + (self.peak_lr - self.poly_end_lr) * math.pow(1.0 - progress, self.poly_power)
        raise ValueError(f"unknown schedule {self.schedule!r}")


@dataclass(frozen=True)
class ResumedSchedule:
    """The LR of optimizer step `step` of a run resumed at step `resumed_step` after `epochs_done` epochs.

    The schedule's position is the training progress (epochs done × this world's steps per epoch, plus
    the steps since the restart), not the step count: an elastic restart on another world size changes
    the steps per epoch, and must change nothing but the batch. A fresh run is `ResumedSchedule(s)`.
    """

    schedule: LrSchedule
    resumed_step: int = 0
    epochs_done: float = 0.0

    def position(self, step: int) -> int:
        return round(self.epochs_done * self.schedule.steps_per_epoch) + step - self.resumed_step

    def __call__(self, step: int) -> float:
        return self.schedule(self.position(step))


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, schedule: str) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then `schedule` to the end."""
    return LrSchedule(peak_lr, total_steps, warmup_steps, schedule)(step)


def param_groups(model: nn.Module, weight_decay: float, no_decay_norm_and_bias: bool = True) -> list[dict[str, Any]]:
    """Two groups: decayed weights, and norm-layer parameters + all biases without weight decay.

    With `no_decay_norm_and_bias=False` (torchvision's V1 recipe) everything is decayed.
    """
    if not no_decay_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if isinstance(module, _NORM_TYPES) or name == "bias":
                no_decay.append(param)
            else:
                decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_sgd(
    model: nn.Module,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool = False,
    no_decay_norm_and_bias: bool = True,
) -> torch.optim.SGD:
    return torch.optim.SGD(
        param_groups(model, weight_decay, no_decay_norm_and_bias), lr=lr, momentum=momentum, nesterov=nesterov
    )


def build_lars(
    model: nn.Module,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool = False,
    no_decay_norm_and_bias: bool = True,
    trust_coeff: float = 0.001,
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """timm's Lars over `param_groups`: the decayed weights get the trust ratio; norm layers and biases
    (when exempt) get neither it nor weight decay, as MLPerf's reference LARS skips them."""
    from timm.optim import Lars  # here: the GPU benchmark imports this module on a machine without timm

    groups = param_groups(model, weight_decay, no_decay_norm_and_bias)  # [decayed] or [decayed, exempt]
    # timm adapts a group only if its weight decay is non-zero, unless always_adapt: set per group, so that
    # weight_decay=0 still adapts the weights and the exempt group is never adapted.
    for group, adapt in zip(groups, (True, False), strict=False):
        group["always_adapt"] = adapt
    return Lars(groups, lr=lr, momentum=momentum, nesterov=nesterov, trust_coeff=trust_coeff, eps=eps)


def build_optimizer(model: nn.Module, optim_cfg: OptimSection, peak_lr: float) -> torch.optim.Optimizer:
    """The optimizer `optim.name` names, at the run's peak LR (the schedule sets it each step)."""
    o = optim_cfg
    if o.name == "lars":
        return build_lars(
            model,
            peak_lr,
            o.momentum,
            o.weight_decay,
            o.nesterov,
            o.no_decay_norm_and_bias,
            o.lars_trust_coeff,
            o.lars_eps,
        )
    return build_sgd(model, peak_lr, o.momentum, o.weight_decay, o.nesterov, o.no_decay_norm_and_bias)


def schedule_from_config(optim_cfg: OptimSection, peak_lr: float, steps_per_epoch: int, epochs: int) -> LrSchedule:
    """The run's LR schedule in optimizer steps (micro-batches / grad_accum_steps)."""
    return LrSchedule(
        peak_lr=peak_lr,
        total_steps=steps_per_epoch * epochs,
        warmup_steps=round(optim_cfg.warmup_epochs * steps_per_epoch),
        schedule=optim_cfg.schedule,
        steps_per_epoch=steps_per_epoch,
        step_epochs=optim_cfg.step_epochs,
        step_gamma=optim_cfg.step_gamma,
        warmup_start_factor=optim_cfg.warmup_start_factor,
        poly_power=optim_cfg.poly_power,
        poly_end_lr=optim_cfg.poly_end_lr,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass(frozen=True)
class WorldScale:
    """What depends on the number of workers: recomputed when an elastic run resizes."""

    world_size: int
    global_batch: int
    peak_lr: float
    steps_per_epoch: int


def scale_for_world(
    num_train: int, world_size: int, batch_size: int, grad_accum_steps: int, lr_per_256: float
) -> WorldScale:
    """streaming_split(equal=True) gives each worker floor(num_train / world) rows; one optimizer
    step per grad_accum_steps micro-batches (a last partial group also steps)."""
    global_batch = batch_size * world_size * grad_accum_steps
    micro_batches = math.ceil((num_train // world_size) / batch_size)
    steps = max(1, math.ceil(micro_batches / grad_accum_steps))
    return WorldScale(world_size, global_batch, scaled_lr(lr_per_256, global_batch), steps)
