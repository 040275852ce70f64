"""Optimizer parameter groups and learning-rate schedules (pure functions of the step)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

# Module types whose parameters get no weight decay (decided by module type, not parameter name).
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm,
               nn.LocalResponseNorm)


def scaled_lr(lr_per_256: float, global_batch: int) -> float:
    """Linear scaling rule (Goyal et al., 2017): the learning rate grows with the global batch."""
    return lr_per_256 * global_batch / 256


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, schedule: str) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then `schedule` to the end."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and norm-layer parameters + all biases without weight decay."""
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


def build_sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum, nesterov=False)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
