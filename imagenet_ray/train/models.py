"""torchvision classification models by name, randomly initialised (no weights are downloaded),
with the init and architecture tweaks the recipes use."""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F


class BlurPool2d(nn.Module):
    """Fixed [1, 2, 1]⊗[1, 2, 1] low-pass filter per channel (Zhang 2019), stride 1: placed before a
    strided conv it removes the aliasing of the subsampling (FFCV's ResNet-50 recipes use it)."""

    def __init__(self, channels: int):
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        kernel = (k[:, None] * k[None, :]) / 16.0
        self.register_buffer("kernel", kernel.expand(channels, 1, 3, 3).clone(), persistent=False)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Zero padding, as FFCV's BlurPoolConv2d (reflect padding fails on 1×1 maps of small inputs).
        return F.conv2d(x, self.kernel.to(x.dtype), padding=1, groups=self.channels)


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
    import torchvision.models

    kwargs = {"weights": None, "num_classes": num_classes}
    builder = torchvision.models.get_model_builder(name)
    # zero_init_residual exists on the ResNet family; other families have no residual BN to zero.
    if zero_init_residual and "zero_init_residual" in _builder_kwargs(builder):
        kwargs["zero_init_residual"] = True
    model = builder(**kwargs)
    if blurpool:
        add_blurpool(model)
    return model


def _builder_kwargs(builder) -> set[str]:
    import torchvision.models.resnet as resnet

    params = set(inspect.signature(builder).parameters)
    if "kwargs" in params and builder.__module__ == resnet.__name__:
        params |= set(inspect.signature(resnet.ResNet).parameters)
    return params
