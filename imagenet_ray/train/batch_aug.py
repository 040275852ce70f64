"""Augmentation on the training device, torchvision's transforms: TrivialAugmentWide and random erasing
per image, MixUp or CutMix per batch (one of the two, as in torchvision's V2 reference recipe).
Erasing and mixing draw from a numpy Generator passed in, so deterministic runs seed them per epoch."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2


@contextlib.contextmanager
def _torch_rng_from(rng: np.random.Generator) -> Iterator[None]:
    """torchvision's transforms draw from torch's CPU RNG: within this block it is seeded from `rng`, and
    restored afterwards, so `rng` alone decides them and torch's own stream (TrivialAugmentWide's) is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(rng.integers(2**63)))
        yield


@functools.lru_cache(maxsize=8)
def _mixer(num_classes: int, mixup_alpha: float, cutmix_alpha: float) -> v2.Transform | None:
    """MixUp, CutMix, or a fair choice of the two (those whose alpha > 0); None when both alphas are 0."""
    mixers = [
        cls(alpha=alpha, num_classes=num_classes)
        for cls, alpha in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha))
        if alpha > 0
    ]
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def mix_batch(
    x: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    mixup_alpha: float,
    cutmix_alpha: float,
    rng: np.random.Generator,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed images, soft targets in x's dtype). Each image is paired with its neighbour in the batch.

    The targets are label-smoothed one-hot rows, then mixed. With both alphas 0, or a single image (it has
    no neighbour), returns the inputs and the smoothed one-hot targets."""
    target = F.one_hot(labels, num_classes).to(x.dtype)
    if label_smoothing > 0:
        target = target * (1 - label_smoothing) + label_smoothing / num_classes
    mixer = _mixer(num_classes, mixup_alpha, cutmix_alpha)
    if mixer is None or x.shape[0] < 2:
        return x, target
    with _torch_rng_from(rng):
        mixed, mixed_target = mixer(x, target)  # probability rows (N, num_classes): torchvision mixes them as given
    return mixed, mixed_target


@functools.lru_cache(maxsize=1)
def _eraser() -> v2.RandomErasing:
    # scale 2–33 % of the area, aspect ratio 0.3–3.3 (torchvision's defaults), value 0: the mean after normalising
    return v2.RandomErasing(p=1.0, value=0.0)


def trivial_augment(images: torch.Tensor) -> torch.Tensor:
    """TrivialAugmentWide (Müller & Hutter 2021) on each uint8 image of an (N, H, W, 3) batch.

    torchvision's implementation, one random op and magnitude per image (torch's RNG)."""
    augment = v2.TrivialAugmentWide()
    chw = images.permute(0, 3, 1, 2)
    out = torch.stack([augment(img) for img in chw])
    return out.permute(0, 2, 3, 1)


def random_erase(x: torch.Tensor, p: float, rng: np.random.Generator) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020) on a normalised float batch: each image with probability p gets
    one rectangle, drawn by torchvision's RandomErasing, set to 0. (The transform called on a whole batch
    would erase the same rectangle in every image.)"""
    if p <= 0:
        return x
    out = None
    with _torch_rng_from(rng):
        for i in torch.nonzero(torch.rand(x.shape[0]) < p).flatten().tolist():
            box = _eraser().make_params([x[i]])
            if box["v"] is not None:  # None: no rectangle fitted in 10 tries, the image stays as it is
                out = x.clone() if out is None else out
                # a scalar fill: no host-to-device copy of torchvision's value tensor
                out[i, :, box["i"] : box["i"] + box["h"], box["j"] : box["j"] + box["w"]] = 0
    return x if out is None else out
