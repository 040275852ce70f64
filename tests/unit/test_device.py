"""Batches on the device: uint8 → normalised channels_last input, progressive resizing, precision."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from ffcv_reference import ffcv_resolution
from imagenet_ray.config import DataSection, ProgressiveResize
from imagenet_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from imagenet_ray.train import device
from imagenet_ray.train.device import (
    amp_dtype,
    autocast_context,
    resize_on_device,
    to_model_input,
    train_size_for_epoch,
)

CPU = torch.device("cpu")


# ================================================================ to_model_input


def test_to_model_input_layout_and_dtype():
    images = torch.randint(0, 256, (4, 10, 12, 3), dtype=torch.uint8)
    x = to_model_input(images)
    assert x.shape == (4, 3, 10, 12)
    assert x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    # pixel (n, h, w, c) ends up at x[n, c, h, w], normalised
    n, h, w, c = 2, 7, 3, 1
    expected = (images[n, h, w, c].item() / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
    assert x[n, c, h, w].item() == pytest.approx(expected, abs=1e-5)


def test_to_model_input_mean_maps_to_zero_and_range():
    mean_pixel = torch.tensor([round(m * 255) for m in IMAGENET_MEAN], dtype=torch.uint8)
    images = mean_pixel.view(1, 1, 1, 3).expand(2, 5, 5, 3).contiguous()
    x = to_model_input(images)
    assert x.abs().max().item() < 0.01  # ~0 (only the rounding of the mean to uint8)
    black = to_model_input(torch.zeros(1, 2, 2, 3, dtype=torch.uint8))
    white = to_model_input(torch.full((1, 2, 2, 3), 255, dtype=torch.uint8))
    for c in range(3):
        assert black[0, c].flatten()[0].item() == pytest.approx(-IMAGENET_MEAN[c] / IMAGENET_STD[c], abs=1e-5)
        assert white[0, c].flatten()[0].item() == pytest.approx((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], abs=1e-5)


# ================================================================ progressive resizing


def test_train_size_without_progressive_is_the_train_crop():
    data = DataSection(train_crop=176)
    assert {train_size_for_epoch(data, e) for e in range(0, 600, 13)} == {176}


def test_train_size_ffcv_88_epochs():
    data = DataSection(
        train_crop=192,
        progressive=ProgressiveResize(start_size=160, end_size=192, start_epoch=65, end_epoch=76, step=32),
    )
    sizes = [train_size_for_epoch(data, e) for e in range(88)]
    assert set(sizes[:66]) == {160}
    assert set(sizes[76:]) == {192}
    # by hand: 160 + 32·(e - 65)/11 rounds to 192 once (e - 65)/11 > 1/2, i.e. from epoch 71
    assert sizes[70] == 160 and sizes[71] == 192
    assert sizes == [ffcv_resolution(e, 160, 192, 76, 65) for e in range(88)]
    assert sizes == sorted(sizes)


@pytest.mark.parametrize("start,end", [(11, 13), (17, 20), (23, 27), (29, 34), (0, 1)])
def test_train_size_matches_ffcv_for_other_ramps(start, end):
    data = DataSection(
        train_crop=192, progressive=ProgressiveResize(start_size=160, end_size=192, start_epoch=start, end_epoch=end)
    )
    epochs = end + 5
    assert [train_size_for_epoch(data, e) for e in range(epochs)] == [
        ffcv_resolution(e, 160, 192, end, start) for e in range(epochs)
    ]


def test_train_size_wider_ramp_uses_intermediate_multiples():
    data = DataSection(
        train_crop=256, progressive=ProgressiveResize(start_size=128, end_size=256, start_epoch=0, end_epoch=8, step=32)
    )
    # 128 + 16·e, over 32, rounded half to even as np.round does: 4.5 → 4, 5.5 → 6, 6.5 → 6, 7.5 → 8
    assert [train_size_for_epoch(data, e) for e in range(10)] == [128, 128, 160, 192, 192, 192, 224, 256, 256, 256]


# ================================================================ resize_on_device


# ================================================================ resize_on_device


def test_resize_on_device_shape_layout_and_noop():
    x = to_model_input(torch.randint(0, 256, (3, 40, 40, 3), dtype=torch.uint8))
    y = resize_on_device(x, 32)
    assert y.shape == (3, 3, 32, 32) and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert resize_on_device(x, 40) is x
    # antialiased bilinear keeps a constant image constant
    c = torch.full((2, 3, 48, 48), 0.7)
    assert torch.allclose(resize_on_device(c, 20), torch.full((2, 3, 20, 20), 0.7), atol=1e-6)
    # and is the mean-preserving downscale, not a nearest-neighbour pick
    ramp = torch.linspace(0, 1, 64).expand(1, 3, 64, 64)
    assert resize_on_device(ramp, 16).mean().item() == pytest.approx(ramp.mean().item(), abs=1e-3)


# ================================================================ precision


def test_amp_dtype():
    cuda = torch.device("cuda")  # constructing a device does not touch CUDA
    assert amp_dtype("fp32", CPU) is None
    assert amp_dtype("fp32", cuda) is None
    assert amp_dtype("auto", CPU) is None
    assert amp_dtype("bf16", CPU) is torch.bfloat16
    assert amp_dtype("auto", cuda) is torch.bfloat16
    assert amp_dtype("bf16", cuda) is torch.bfloat16


def test_autocast_context_on_cpu():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast_context(CPU, amp_dtype("auto", CPU)):
        assert (a @ b).dtype == torch.float32
    with autocast_context(CPU, amp_dtype("bf16", CPU)):
        assert (a @ b).dtype == torch.bfloat16
    with autocast_context(CPU):
        assert (a @ b).dtype == torch.float32


class _RecordingAutocast:
    calls: ClassVar[list[_RecordingAutocast]] = []

    def __init__(self, device_type, dtype=None, enabled=True, **_):
        self.device_type, self.dtype, self.enabled = device_type, dtype, enabled
        _RecordingAutocast.calls.append(self)


def test_autocast_context_on_cuda_uses_bf16_for_auto_and_bf16(monkeypatch):
    monkeypatch.setattr(device.torch, "autocast", _RecordingAutocast)
    cuda = torch.device("cuda")
    for precision in ("auto", "bf16"):
        ctx = autocast_context(cuda, amp_dtype(precision, cuda))
        assert (ctx.device_type, ctx.enabled, ctx.dtype) == ("cuda", True, torch.bfloat16), precision


def test_precision_fp32_disables_autocast_on_cuda(monkeypatch):
    monkeypatch.setattr(device.torch, "autocast", _RecordingAutocast)
    cuda = torch.device("cuda")
    ctx = autocast_context(cuda, amp_dtype("fp32", cuda))
    assert ctx.device_type == "cuda"
    assert ctx.enabled is False
