"""Batch-level augmentation on the training device: Mixup and CutMix (as in torchvision's reference
recipe: one of the two per batch, each pairing an image with its neighbour in the batch)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def mix_batch(x: torch.Tensor, labels: torch.Tensor, num_classes: int, mixup_alpha: float, cutmix_alpha: float,
              rng: np.random.Generator, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed images, soft targets). With both alphas 0 returns the inputs and one-hot targets."""
    target = F.one_hot(labels, num_classes).to(x.dtype)
    if label_smoothing > 0:
        target = target * (1 - label_smoothing) + label_smoothing / num_classes
    choices = [k for k, a in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if a > 0]
    if not choices or x.shape[0] < 2:
        return x, target
    kind = choices[int(rng.integers(len(choices)))]
    lam = float(rng.beta(mixup_alpha, mixup_alpha) if kind == "mixup" else rng.beta(cutmix_alpha, cutmix_alpha))
    x_rolled, target_rolled = x.roll(1, 0), target.roll(1, 0)
    if kind == "mixup":
        return x * lam + x_rolled * (1 - lam), target * lam + target_rolled * (1 - lam)
    h, w = x.shape[-2:]
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    mixed = x.clone()
    mixed[..., top:bottom, left:right] = x_rolled[..., top:bottom, left:right]
    lam = 1.0 - (bottom - top) * (right - left) / (h * w)  # the area actually pasted
    return mixed, target * lam + target_rolled * (1 - lam)
