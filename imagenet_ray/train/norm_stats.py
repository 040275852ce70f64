"""One set of BatchNorm statistics for all workers before they evaluate (and before a checkpoint).

DDP keeps parameters equal across ranks but not BatchNorm's running statistics; averaging them over
ranks (timm's `distribute_bn(reduce=True)`) makes every rank evaluate, and rank 0 checkpoint, one model.
Why this matters is in docs/architecture.md.
"""

from __future__ import annotations

import torch.distributed as dist
import torch.nn as nn
from timm.utils import distribute_bn
from timm.utils.model import unwrap_model

_STAT_NAMES = ("running_mean", "running_var")


def average_batchnorm_stats(module: nn.Module) -> int:
    """All-reduce-mean every BatchNorm running_mean/running_var in place; returns how many tensors.

    No-op (returns 0) without an initialised process group or with one rank. num_batches_tracked is
    left alone (timm averages only the two statistics): every rank takes the same number of steps.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    distribute_bn(module, dist.get_world_size(), reduce=True)
    # the buffers distribute_bn reduced, by its own name rule
    return sum(any(stat in name for stat in _STAT_NAMES) for name, _ in unwrap_model(module).named_buffers())
