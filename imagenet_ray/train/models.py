"""torchvision classification models by name, randomly initialised (no weights are downloaded)."""

from __future__ import annotations

import torch.nn as nn


def build_model(name: str, num_classes: int) -> nn.Module:
    import torchvision.models

    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
