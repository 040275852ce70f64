"""build_model (train/models.py): zero-init residuals, timm's BlurPool2d in FFCV's configuration, checkpoint names."""

from __future__ import annotations

import pytest
import timm.layers
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck

from imagenet_ray.train.models import BlurPool2d, add_blurpool, build_model

# The module names a BlurPool ResNet-18 checkpoint holds for its wrapped convs (index 1 of the Sequential).
RESNET18_BLURPOOL_WRAPPED = [
    "layer2.0.conv1",
    "layer2.0.downsample.0",
    "layer3.0.conv1",
    "layer3.0.downsample.0",
    "layer4.0.conv1",
    "layer4.0.downsample.0",
]


def _ffcv_blur(x: torch.Tensor) -> torch.Tensor:
    """FFCV's BlurPoolConv2d blur: [1, 2, 1]⊗[1, 2, 1] / 16 per channel, stride 1, zero padding 1."""
    k = torch.tensor([1.0, 2.0, 1.0])
    kernel = (k[:, None] * k[None, :] / 16.0).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(x, kernel, padding=1, groups=x.shape[1])


def test_blurpool_is_timms_layer_in_ffcvs_configuration():
    blur = BlurPool2d(7)
    assert isinstance(blur, timm.layers.BlurPool2d)
    assert (blur.channels, blur.filt_size, blur.stride, blur.pad_mode) == (7, 3, 1, "constant")
    assert list(blur.state_dict()) == []  # the filter is not saved: checkpoints hold only the convs


def test_blurpool_gives_ffcvs_numbers():
    torch.manual_seed(0)
    for shape in [(2, 5, 9, 7), (3, 16, 14, 14), (1, 8, 1, 1)]:
        x = torch.randn(shape)
        assert torch.equal(BlurPool2d(shape[1])(x), _ffcv_blur(x))
        x_cl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(BlurPool2d(shape[1])(x_cl), _ffcv_blur(x))


def test_blurpool_state_dict_loads_into_a_rebuilt_blurpool_model():
    torch.manual_seed(0)
    trained = build_model("resnet18", num_classes=10, blurpool=True)
    with torch.no_grad():  # move the weights off their init so the load is seen
        for p in trained.parameters():
            p.add_(0.01)
    state = trained.state_dict()
    plain_keys = set(build_model("resnet18", num_classes=10).state_dict())
    wrapped = {f"{name}.weight" for name in RESNET18_BLURPOOL_WRAPPED}
    assert wrapped <= plain_keys
    assert set(state) == (plain_keys - wrapped) | {f"{name}.1.weight" for name in RESNET18_BLURPOOL_WRAPPED}
    rebuilt = build_model("resnet18", num_classes=10, blurpool=True)
    rebuilt.load_state_dict(state)  # strict: evaluate rebuilds BlurPool models this way
    x = torch.randn(2, 3, 64, 64)
    trained.eval()
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(trained(x), rebuilt(x))


def test_blurpool_state_dict_does_not_fit_the_plain_model():
    state = build_model("resnet18", num_classes=10, blurpool=True).state_dict()
    with pytest.raises(RuntimeError, match=r"layer2\.0\.conv1\.1\.weight"):
        build_model("resnet18", num_classes=10).load_state_dict(state)


def test_blurpool_model_on_a_1x1_feature_map():
    # zero padding: timm's default reflect padding fails on layer4's 1×1 input of a 16 px image
    model = build_model("resnet18", num_classes=3, blurpool=True).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 16, 16)).shape == (1, 3)
        with pytest.raises(RuntimeError):
            timm.layers.BlurPool2d(512, stride=1)(torch.randn(1, 512, 1, 1))
    assert sum(isinstance(m, nn.Sequential) and isinstance(m[0], BlurPool2d) for m in model.modules()) == 6


# ================================================================ build_model


def _residual_blocks(model):
    return [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]


def _last_bn(block):
    return block.bn3 if isinstance(block, Bottleneck) else block.bn2


@pytest.fixture(scope="module")
def resnet18_plain():
    """resnet18 (10 classes) built with seed 0, no tweaks; shared (its parameters are never changed)."""
    torch.manual_seed(0)
    return build_model("resnet18", num_classes=10)


@pytest.mark.parametrize("name,n_blocks", [("resnet18", 8), ("resnet50", 16)])
def test_zero_init_residual(name, n_blocks, resnet18_plain):
    torch.manual_seed(0)
    zeroed = build_model(name, num_classes=10, zero_init_residual=True)
    blocks = _residual_blocks(zeroed)
    assert len(blocks) == n_blocks
    for block in blocks:
        assert torch.count_nonzero(_last_bn(block).weight) == 0
        assert torch.count_nonzero(block.bn1.weight) > 0  # only the last BN of each block
    plain = resnet18_plain if name == "resnet18" else build_model(name, num_classes=10, zero_init_residual=False)
    for block in _residual_blocks(plain):
        assert torch.count_nonzero(_last_bn(block).weight) == _last_bn(block).weight.numel()


def test_zero_init_residual_on_a_non_resnet_builds():
    model = build_model("mobilenet_v3_small", num_classes=7, zero_init_residual=True)
    assert not _residual_blocks(model)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def _resnet_features(m, x):
    """torchvision ResNet.forward up to layer4, keeping each stage's output."""
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    return [x := layer(x) for layer in (m.layer1, m.layer2, m.layer3, m.layer4)]


def _resnet_head(m, features):
    return m.fc(torch.flatten(m.avgpool(features), 1))


def test_blurpool_before_every_strided_conv_with_16_plus_channels(resnet18_plain):
    torch.manual_seed(0)
    blurred = build_model("resnet18", num_classes=10, blurpool=True)
    plain = resnet18_plain
    blurs = [m for m in blurred.modules() if isinstance(m, BlurPool2d)]
    # layer2/3/4: first 3×3 conv and 1×1 downsample (the stem conv has 3 input channels: left alone)
    assert len(blurs) == 6
    wrapped = [
        m for m in blurred.modules() if isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[0], BlurPool2d)
    ]
    assert len(wrapped) == 6
    for seq in wrapped:
        conv = seq[1]
        assert isinstance(conv, nn.Conv2d) and max(conv.stride) > 1 and conv.in_channels >= 16
        assert seq[0].channels == conv.in_channels
    strided = [m for m in plain.modules() if isinstance(m, nn.Conv2d) and max(m.stride) > 1]
    assert sum(c.in_channels >= 16 for c in strided) == 6 and any(c.in_channels < 16 for c in strided)
    assert not isinstance(blurred.conv1, nn.Sequential)
    # same weights (the filter is a fixed buffer, not a parameter), same shapes everywhere
    assert sum(p.numel() for p in blurred.parameters()) == sum(p.numel() for p in plain.parameters())
    assert all(torch.equal(a, b) for a, b in zip(blurred.parameters(), plain.parameters(), strict=True))
    x = torch.randn(2, 3, 64, 64)
    blurred.eval()
    plain.eval()
    with torch.no_grad():
        fb, fp = _resnet_features(blurred, x), _resnet_features(plain, x)
        assert [f.shape for f in fb] == [f.shape for f in fp]
        assert fb[-1].shape == (2, 512, 2, 2)
        assert _resnet_head(blurred, fb[-1]).shape == _resnet_head(plain, fp[-1]).shape == (2, 10)
        assert torch.equal(fb[0], fp[0])  # layer1 has no strided conv: untouched
        assert not torch.allclose(fb[1], fp[1])  # layer2 sees blurred input


def test_add_blurpool_counts_and_skips_thin_convs():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2),
        nn.Conv2d(16, 32, 3, stride=2),
        nn.Sequential(nn.Conv2d(32, 32, 3, stride=1), nn.Conv2d(32, 8, 1, stride=(1, 2))),
    )
    assert add_blurpool(model) == 2
    assert isinstance(model[0], nn.Conv2d)
    assert isinstance(model[1][0], BlurPool2d) and model[1][0].channels == 16
    assert isinstance(model[2][0], nn.Conv2d)
    assert isinstance(model[2][1][0], BlurPool2d) and model[2][1][0].channels == 32


def test_blurpool_keeps_a_constant_image_and_its_size():
    blur = BlurPool2d(5)
    assert torch.allclose(blur.get_buffer("filt").sum((1, 2, 3)), torch.ones(5))  # low-pass: unit DC gain
    x = torch.full((2, 5, 9, 7), 3.25)
    y = blur(x)
    assert y.shape == x.shape
    # zero padding (as FFCV): the constant is kept everywhere but on the 1-pixel border
    assert torch.allclose(y[..., 1:-1, 1:-1], x[..., 1:-1, 1:-1])
    y_cl = blur(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(y_cl, y)


def test_blurpool_removes_the_nyquist_checkerboard():
    ii, jj = torch.meshgrid(torch.arange(8), torch.arange(10), indexing="ij")
    board = ((ii + jj) % 2 * 2 - 1).float().expand(1, 2, 8, 10)
    assert torch.allclose(BlurPool2d(2)(board)[..., 1:-1, 1:-1], torch.zeros(1, 2, 6, 8), atol=1e-6)
    # channels are filtered independently
    x = torch.stack([torch.zeros(6, 6), torch.ones(6, 6)]).unsqueeze(0)
    y = BlurPool2d(2)(x)
    assert torch.allclose(y[0, 0], torch.zeros(6, 6)) and torch.allclose(y[0, 1, 1:-1, 1:-1], torch.ones(4, 4))
