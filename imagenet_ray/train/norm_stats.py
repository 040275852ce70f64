"""One set of BatchNorm statistics for all workers before they evaluate (and before a checkpoint).

DDP keeps parameters identical across ranks but not BatchNorm's running statistics: it copies rank
0's buffers into the others at the start of each forward, and that forward then updates every rank's
copy from its own batch. After the last training step each rank therefore holds a different model;
evaluating the unwrapped model on every rank would score a mixture of them, not the model that is
checkpointed. Averaging the statistics over ranks (timm's `distribute_bn(reduce=True)`, its default)
makes every rank evaluate one model, estimated from every rank's last batches, and that is the model
rank 0 then writes to the checkpoint: `imagenet-ray evaluate` on it reproduces val/top1 exactly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


def average_batchnorm_stats(module: nn.Module) -> int:
    """All-reduce-mean every BatchNorm running_mean/running_var in place; returns how many tensors.

    No-op (returns 0) without an initialised process group or with one rank. num_batches_tracked is
    left alone: every rank takes the same number of steps, so it is already equal.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    world = dist.get_world_size()
    count = 0
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.modules.batchnorm._NormBase) and layer.track_running_stats:
                for buf in (layer.running_mean, layer.running_var):
                    if buf is not None:
                        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                        buf.div_(world)
                        count += 1
    return count
