"""Augmentation on the training device: TrivialAugmentWide and random erasing per image, Mixup and
CutMix per batch (as in torchvision's V2 reference recipe: one of the two per batch, each pairing an
image with its neighbour in the batch). Running them on the device keeps the CPU pipeline the same
for every recipe and lets deterministic runs seed them per epoch."""

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


def trivial_augment(images: torch.Tensor) -> torch.Tensor:
    """TrivialAugmentWide (Müller & Hutter 2021) on each uint8 image of an (N, H, W, 3) batch.

    torchvision's implementation, one random op and magnitude per image (torch's RNG)."""
    from torchvision.transforms import v2

    augment = v2.TrivialAugmentWide()
    chw = images.permute(0, 3, 1, 2)
    out = torch.stack([augment(img) for img in chw])
    return out.permute(0, 2, 3, 1)


def random_erase(x: torch.Tensor, p: float, rng: np.random.Generator) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020) on a normalised float batch, as torchvision's RandomErasing
    with value=0: each image with probability p gets one rectangle of 2–33 % of its area, aspect
    ratio in [0.3, 3.3], set to 0 (the mean after normalisation)."""
    if p <= 0:
        return x
    h, w = x.shape[-2:]
    out = None
    for i in np.flatnonzero(rng.random(x.shape[0]) < p):
        for _ in range(10):
            area = h * w * rng.uniform(0.02, 0.33)
            ratio = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
            eh, ew = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if eh < h and ew < w:
                top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
                out = x.clone() if out is None else out
                out[i, :, top:top + eh, left:left + ew] = 0
                break
    return x if out is None else out
