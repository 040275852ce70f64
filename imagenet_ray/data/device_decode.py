"""GPU decode path (`data.decode_on: gpu`): the training worker decodes and augments whole batches of
JPEG bytes on its device (nvJPEG through torchvision.io.decode_jpeg); the same functions run on CPU
tensors, so the path is tested without a GPU. Output follows the CPU kernel's convention: uint8
(N, H, W, 3), here a channels_last view of NCHW memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from imagenet_ray.data.transforms import RRC_RATIO, RRC_SCALE, eval_box, sample_rrc_box


def _as_tensors(encoded: Sequence[bytes]) -> list[torch.Tensor]:
    return [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in encoded]


def decode_batch(encoded: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
    """Decode JPEGs to RGB uint8 (3, H, W) tensors on `device` (batched nvJPEG on CUDA)."""
    return cast(list[torch.Tensor], decode_jpeg(_as_tensors(encoded), mode=ImageReadMode.RGB, device=device))


def _nhwc(chw_images: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(chw_images).permute(0, 2, 3, 1)


def train_batch_on_device(
    encoded: Sequence[bytes],
    size: int,
    device: torch.device,
    rng: np.random.Generator,
    scale: tuple[float, float] = RRC_SCALE,
    ratio: tuple[float, float] = RRC_RATIO,
) -> torch.Tensor:
    """RandomResizedCrop(size, scale, ratio) + flip on the device, same box distribution as the CPU kernel."""
    out = []
    for img in decode_batch(encoded, device):
        h, w = img.shape[-2:]
        left, top, cw, ch = sample_rrc_box(int(w), int(h), rng, scale, ratio)
        crop = TF.resized_crop(img, top, left, ch, cw, [size, size], antialias=True)
        out.append(crop.flip(-1) if rng.random() < 0.5 else crop)
    return _nhwc(out)


def eval_batch_on_device(encoded: Sequence[bytes], resize: int, crop: int, device: torch.device) -> torch.Tensor:
    """Resize(shorter side) + CenterCrop on the device (same source box as the CPU kernel)."""
    out = []
    for img in decode_batch(encoded, device):
        h, w = img.shape[-2:]
        left, top, right, bottom = eval_box(int(w), int(h), resize, crop)
        # Integer box in source pixels, then one antialiased resize to (crop, crop).
        box_top, box_left = round(top), round(left)
        ch, cw = max(1, round(bottom - top)), max(1, round(right - left))
        out.append(TF.resized_crop(img, box_top, box_left, ch, cw, [crop, crop], antialias=True))
    return _nhwc(out)
