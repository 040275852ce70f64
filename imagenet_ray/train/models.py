"""torchvision classification models by name, randomly initialised (no weights are downloaded),
with the init and architecture tweaks the recipes use."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import timm.layers
import torch.nn as nn
import torchvision.models
import torchvision.models.resnet as resnet


class BlurPool2d(timm.layers.BlurPool2d):
    """timm's binomial blur as FFCV's ResNet recipes place it (Zhang 2019): a fixed [1, 2, 1]⊗[1, 2, 1]
    filter per channel, stride 1 and zero padding, before a strided conv that then does the subsampling."""

    def __init__(self, channels: int) -> None:
        # zero padding as FFCV's BlurPoolConv2d (timm's default reflect padding fails on 1×1 maps of small inputs)
        super().__init__(channels, filt_size=3, stride=1, pad_mode="constant")


def add_blurpool(model: nn.Module) -> int:
    """Put a BlurPool2d before every strided conv with ≥ 16 input channels (FFCV's rule); returns how many."""
    count = 0
    for name, child in model.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(model, name, nn.Sequential(BlurPool2d(child.in_channels), child))
            count += 1
        else:
            count += add_blurpool(child)
    return count


def build_model(name: str, num_classes: int, zero_init_residual: bool = False, blurpool: bool = False) -> nn.Module:
    """Randomly initialised torchvision `name`; blurpool wraps strided convs (module names change, see add_blurpool)."""
    kwargs: dict[str, object] = {"weights": None, "num_classes": num_classes}
    builder = torchvision.models.get_model_builder(name)
    # zero_init_residual exists on the ResNet family; other families have no residual BN to zero.
    if zero_init_residual and "zero_init_residual" in _builder_kwargs(builder):
        kwargs["zero_init_residual"] = True
    model: nn.Module = builder(**kwargs)
    if blurpool:
        add_blurpool(model)
    return model


def _builder_kwargs(builder: Callable[..., nn.Module]) -> set[str]:
    params = set(inspect.signature(builder).parameters)
    if "kwargs" in params and builder.__module__ == resnet.__name__:
        params |= set(inspect.signature(resnet.ResNet).parameters)
    return params
