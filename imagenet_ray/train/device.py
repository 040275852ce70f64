"""Batches on the training device: uint8 (N, H, W, 3) → normalised float NCHW (channels_last), the
autocast precision, and progressive resizing (the crop size of each epoch, and the downscale to it)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from imagenet_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:  # the GPU benchmark imports this module on a machine without pydantic
    from imagenet_ray.config import DataSection


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) → normalised float (N, 3, H, W) in channels_last memory format."""
    x = images.permute(0, 3, 1, 2).float()  # a view: NCHW shape, NHWC strides = channels_last
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
    # Device-decoded batches arrive as NCHW memory; make every input channels_last (no-op if already).
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs (auto/bf16); fp32 on CPU unless bf16 is asked for explicitly."""
    if precision == "fp32":
        return None
    if precision == "bf16" or device.type == "cuda":
        return torch.bfloat16
    return None


DEVICE_DEFAULT: Any = object()  # "the device's default precision": bf16 on CUDA, fp32 on CPU


def autocast_context(
    device: torch.device, dtype: torch.dtype | Any | None = DEVICE_DEFAULT
) -> AbstractContextManager[Any]:
    """Autocast to `dtype`; None = off (fp32). Without `dtype`: bf16 on CUDA, off on CPU."""
    if dtype is DEVICE_DEFAULT:
        dtype = torch.bfloat16 if device.type == "cuda" else None
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def train_size_for_epoch(data_cfg: DataSection, epoch: int) -> int:
    """Train crop for `epoch` (0-based): fixed, or FFCV's linear progressive resizing (nearest multiple)."""
    prog = data_cfg.progressive
    if prog is None:
        return data_cfg.train_crop
    if epoch <= prog.start_epoch:
        size = float(prog.start_size)
    elif epoch >= prog.end_epoch:
        size = float(prog.end_size)
    else:
        frac = (epoch - prog.start_epoch) / (prog.end_epoch - prog.start_epoch)
        size = prog.start_size + frac * (prog.end_size - prog.start_size)
    # FFCV rounds the interpolated size to the nearest multiple of 32 (np.round: half to even).
    return max(prog.step, int(np.round(size / prog.step)) * prog.step)


def resize_on_device(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased downscale of a float NCHW batch (progressive resizing of CPU-decoded crops)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).contiguous(
        memory_format=torch.channels_last
    )
