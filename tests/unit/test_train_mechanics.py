"""Training mechanics without Ray: batch mixing, model tweaks, weight-decay groups, progressive resizing,
precision, loss, evaluation with flips / per-class counts, and checkpointed EMA + RNG state."""

from __future__ import annotations

import random

import numpy as np
import pytest
from ffcv_reference import ffcv_resolution
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.models.resnet import BasicBlock, Bottleneck

from imagenet_ray.config import DataSection, ProgressiveResize
from imagenet_ray.train import loop
from imagenet_ray.train.batch_aug import mix_batch
from imagenet_ray.train.checkpoint import read_checkpoint_dir, restore_rng, rng_state, write_checkpoint_dir
from imagenet_ray.train.loop import (amp_dtype, autocast_context, evaluate, loss_fn, resize_on_device,
                                     to_model_input, train_size_for_epoch)
from imagenet_ray.train.models import BlurPool2d, add_blurpool, build_model
from imagenet_ray.train.optim import build_sgd, param_groups

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """These tests draw from (and reset) the global RNGs; leave them as found for other tests."""
    saved = rng_state()
    yield
    restore_rng(saved)


# ================================================================ mix_batch


def _onehot(labels, c):
    return F.one_hot(labels, c).double()


def _const_batch(n=6, c=3, h=24, w=20) -> torch.Tensor:
    """Image i is the constant i + 1 everywhere: any pixel tells which image it came from."""
    return torch.arange(1, n + 1, dtype=torch.float64).view(n, 1, 1, 1).expand(n, c, h, w).clone()


def test_mix_batch_no_alphas_returns_inputs_and_one_hot():
    x = torch.randn(5, 3, 8, 8)
    labels = torch.tensor([0, 3, 2, 9, 3])
    out, target = mix_batch(x, labels, 10, 0.0, 0.0, np.random.default_rng(0))
    assert torch.equal(out, x)
    assert target.dtype == x.dtype and target.shape == (5, 10)
    assert torch.equal(target, F.one_hot(labels, 10).float())


def test_mix_batch_no_alphas_label_smoothing():
    eps, c = 0.1, 10
    x = torch.randn(4, 3, 4, 4)
    labels = torch.tensor([1, 1, 7, 0])
    out, target = mix_batch(x, labels, c, 0.0, 0.0, np.random.default_rng(0), label_smoothing=eps)
    assert torch.equal(out, x)
    assert torch.allclose(target.sum(1), torch.ones(4))
    assert torch.allclose(target.max(1).values, torch.full((4,), 1 - eps + eps / c))
    assert torch.allclose(target.min(1).values, torch.full((4,), eps / c))
    assert torch.equal(target.argmax(1), labels)


def test_mix_batch_single_image_is_not_mixed():
    x = torch.randn(1, 3, 8, 8)
    out, target = mix_batch(x, torch.tensor([2]), 4, 1.0, 1.0, np.random.default_rng(0))
    assert torch.equal(out, x) and torch.equal(target, F.one_hot(torch.tensor([2]), 4).float())


@pytest.mark.parametrize("seed", range(6))
def test_mixup_is_a_convex_mix_with_the_rolled_batch(seed):
    n, c = 6, 8
    torch.manual_seed(seed)
    x = torch.randn(n, 3, 10, 12, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])  # distinct neighbours: the lam can be read off the target
    out, target = mix_batch(x, labels, c, mixup_alpha=0.2, cutmix_alpha=0.0, rng=np.random.default_rng(seed))
    assert torch.allclose(target.sum(1), torch.ones(n, dtype=torch.float64))
    lam = target[0, labels[0]].item()
    assert 0.0 <= lam <= 1.0
    own, rolled = _onehot(labels, c), _onehot(labels.roll(1, 0), c)
    assert torch.allclose(target, lam * own + (1 - lam) * rolled)  # same lam for every row
    assert torch.allclose(out, lam * x + (1 - lam) * x.roll(1, 0))
    assert (target >= 0).all()


def test_mixup_with_label_smoothing_rows_sum_to_one():
    eps, c = 0.1, 5
    labels = torch.tensor([0, 1, 2, 3])
    _, target = mix_batch(torch.randn(4, 3, 6, 6), labels, c, 0.5, 0.0, np.random.default_rng(3), eps)
    assert torch.allclose(target.sum(1), torch.ones(4))
    assert target.min() >= eps / c - 1e-6  # smoothing mass survives the mix
    s_own = _onehot(labels, c) * (1 - eps) + eps / c
    s_rolled = s_own.roll(1, 0)
    lam = ((target.double() - s_rolled) / (s_own - s_rolled))[0, 0].item()
    assert torch.allclose(target.double(), lam * s_own + (1 - lam) * s_rolled, atol=1e-6)


@pytest.mark.parametrize("seed", range(12))
def test_cutmix_pastes_a_rectangle_of_the_rolled_batch(seed):
    n, c, h, w = 6, 3, 24, 20
    x = _const_batch(n, c, h, w)
    labels = torch.arange(n)
    out, target = mix_batch(x, labels, n, mixup_alpha=0.0, cutmix_alpha=1.0, rng=np.random.default_rng(seed))
    rolled = x.roll(1, 0)
    changed = out != x  # (n, c, h, w)
    # the same region in every image and channel
    region = changed[0, 0]
    assert (changed == region).all()
    # inside: exactly the neighbour's pixels; outside: untouched
    assert torch.equal(out[:, :, region], rolled[:, :, region])
    assert torch.equal(out[:, :, ~region], x[:, :, ~region])
    # a rectangle: its area equals its bounding box
    area = int(region.sum())
    if area:
        rows, cols = region.any(1).nonzero(), region.any(0).nonzero()
        assert area == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    # lam is 1 - the fraction actually pasted, for every row
    lam = 1.0 - area / (h * w)
    assert torch.allclose(target.double(), lam * _onehot(labels, n) + (1 - lam) * _onehot(labels.roll(1, 0), n))
    assert torch.allclose(target.sum(1).double(), torch.ones(n, dtype=torch.float64))


def test_cutmix_pastes_something_for_some_seeds():
    x = _const_batch()
    areas = []
    for seed in range(20):
        out, _ = mix_batch(x, torch.arange(6), 6, 0.0, 1.0, np.random.default_rng(seed))
        areas.append(int((out != x)[0, 0].sum()))
    assert max(areas) > 0 and len(set(areas)) > 3


def test_mix_batch_picks_one_of_mixup_and_cutmix_per_batch():
    x = _const_batch()
    kinds = set()
    for seed in range(40):
        out, _ = mix_batch(x, torch.arange(6), 6, 0.2, 1.0, np.random.default_rng(seed))
        frac = out - out.floor()
        kinds.add("mixup" if (frac != 0).any() else "cutmix")  # cutmix only moves whole constants
    assert kinds == {"mixup", "cutmix"}


@pytest.mark.parametrize("alphas", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_mix_batch_is_deterministic_for_a_seeded_rng(alphas):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    labels = torch.randint(0, 10, (8,))
    a = mix_batch(x, labels, 10, *alphas, rng=np.random.default_rng(42), label_smoothing=0.1)
    b = mix_batch(x, labels, 10, *alphas, rng=np.random.default_rng(42), label_smoothing=0.1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    rng = np.random.default_rng(42)
    outs = [mix_batch(x, labels, 10, *alphas, rng=rng)[1] for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # the rng advances: batches differ


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
    wrapped = [m for m in blurred.modules()
               if isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[0], BlurPool2d)]
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
    assert all(torch.equal(a, b) for a, b in zip(blurred.parameters(), plain.parameters()))
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
    model = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.Conv2d(16, 32, 3, stride=2),
                          nn.Sequential(nn.Conv2d(32, 32, 3, stride=1), nn.Conv2d(32, 8, 1, stride=(1, 2))))
    assert add_blurpool(model) == 2
    assert isinstance(model[0], nn.Conv2d)
    assert isinstance(model[1][0], BlurPool2d) and model[1][0].channels == 16
    assert isinstance(model[2][0], nn.Conv2d)
    assert isinstance(model[2][1][0], BlurPool2d) and model[2][1][0].channels == 32


def test_blurpool_keeps_a_constant_image_and_its_size():
    blur = BlurPool2d(5)
    assert torch.allclose(blur.kernel.sum((1, 2, 3)), torch.ones(5))  # low-pass: unit DC gain
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


# ================================================================ param_groups


def test_param_groups_without_norm_exemption_decays_everything(resnet18_plain):
    model = resnet18_plain
    groups = param_groups(model, 1e-4, no_decay_norm_and_bias=False)
    assert len(groups) == 1
    assert groups[0]["weight_decay"] == 1e-4
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.parameters()}
    opt = build_sgd(model, lr=0.1, momentum=0.9, weight_decay=1e-4, no_decay_norm_and_bias=False)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 1e-4
    bn_ids = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert bn_ids and bn_ids <= {id(p) for p in opt.param_groups[0]["params"]}
    # with the exemption (FFCV / torchvision V2): every BN parameter and the fc bias are not decayed
    decay, no_decay = build_sgd(model, 0.1, 0.9, 1e-4).param_groups
    assert no_decay["weight_decay"] == 0.0
    assert {id(p) for p in no_decay["params"]} == bn_ids | {id(model.fc.bias)}


def test_param_groups_without_exemption_skips_frozen_params():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    model[0].bias.requires_grad_(False)
    (group,) = param_groups(model, 0.5, no_decay_norm_and_bias=False)
    assert {id(p) for p in group["params"]} == {id(model[0].weight), id(model[1].weight), id(model[1].bias)}


# ================================================================ progressive resizing




def test_train_size_without_progressive_is_the_train_crop():
    data = DataSection(train_crop=176, val_resize=232, val_crop=224)
    assert {train_size_for_epoch(data, e) for e in range(0, 600, 13)} == {176}


def test_train_size_ffcv_88_epochs():
    data = DataSection(train_crop=192, val_resize=292, val_crop=256,
                       progressive=ProgressiveResize(start_size=160, end_size=192, start_epoch=65, end_epoch=76,
                                                     step=32))
    sizes = [train_size_for_epoch(data, e) for e in range(88)]
    assert set(sizes[:66]) == {160}
    assert set(sizes[76:]) == {192}
    # by hand: 160 + 32·(e - 65)/11 rounds to 192 once (e - 65)/11 > 1/2, i.e. from epoch 71
    assert sizes[70] == 160 and sizes[71] == 192
    assert sizes == [ffcv_resolution(e, 160, 192, 76, 65) for e in range(88)]
    assert sizes == sorted(sizes)


@pytest.mark.parametrize("start,end", [(11, 13), (17, 20), (23, 27), (29, 34), (0, 1)])
def test_train_size_matches_ffcv_for_other_ramps(start, end):
    data = DataSection(train_crop=192, progressive=ProgressiveResize(start_size=160, end_size=192,
                                                                     start_epoch=start, end_epoch=end))
    epochs = end + 5
    assert [train_size_for_epoch(data, e) for e in range(epochs)] == \
        [ffcv_resolution(e, 160, 192, end, start) for e in range(epochs)]


def test_train_size_wider_ramp_uses_intermediate_multiples():
    data = DataSection(train_crop=256, progressive=ProgressiveResize(start_size=128, end_size=256, start_epoch=0,
                                                                     end_epoch=8, step=32))
    # 128 + 16·e, over 32, rounded half to even as np.round does: 4.5 → 4, 5.5 → 6, 6.5 → 6, 7.5 → 8
    assert [train_size_for_epoch(data, e) for e in range(10)] == [128, 128, 160, 192, 192, 192, 224, 256, 256, 256]


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
    calls: list = []

    def __init__(self, device_type, dtype=None, enabled=True, **_):
        self.device_type, self.dtype, self.enabled = device_type, dtype, enabled
        _RecordingAutocast.calls.append(self)


def test_autocast_context_on_cuda_uses_bf16_for_auto_and_bf16(monkeypatch):
    monkeypatch.setattr(loop.torch, "autocast", _RecordingAutocast)
    cuda = torch.device("cuda")
    for precision in ("auto", "bf16"):
        ctx = autocast_context(cuda, amp_dtype(precision, cuda))
        assert (ctx.device_type, ctx.enabled, ctx.dtype) == ("cuda", True, torch.bfloat16), precision


def test_precision_fp32_disables_autocast_on_cuda(monkeypatch):
    monkeypatch.setattr(loop.torch, "autocast", _RecordingAutocast)
    cuda = torch.device("cuda")
    ctx = autocast_context(cuda, amp_dtype("fp32", cuda))
    assert ctx.device_type == "cuda"
    assert ctx.enabled is False


# ================================================================ loss


def test_loss_fn_integer_targets_with_label_smoothing():
    torch.manual_seed(0)
    logits = torch.randn(7, 5)
    labels = torch.tensor([0, 4, 2, 2, 1, 3, 0])
    eps = 0.1
    got = loss_fn(logits, labels, eps)
    assert got.item() == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=eps).item(), rel=1e-6)
    logp = logits.log_softmax(1)
    by_hand = ((1 - eps) * -logp[torch.arange(7), labels] + eps * -logp.mean(1)).mean()
    assert got.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert loss_fn(logits, labels, 0.0).item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_loss_fn_soft_targets_ignores_smoothing_argument():
    torch.manual_seed(1)
    logits = torch.randn(6, 4)
    t = torch.rand(6, 4)
    t = t / t.sum(1, keepdim=True)
    expected = -(t * logits.log_softmax(1)).sum(1).mean()
    for eps in (0.0, 0.1, 0.3):  # soft targets are already smoothed: eps must not be applied twice
        assert loss_fn(logits, t, eps).item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_fn_smoothed_one_hot_equals_integer_path():
    torch.manual_seed(2)
    logits = torch.randn(5, 10)
    labels = torch.tensor([3, 9, 0, 3, 5])
    _, soft = mix_batch(torch.zeros(5, 3, 2, 2), labels, 10, 0.0, 0.0, np.random.default_rng(0), 0.1)
    assert loss_fn(logits, soft, 0.1).item() == pytest.approx(loss_fn(logits, labels, 0.1).item(), rel=1e-5)


def test_loss_fn_upcasts_bf16_logits():
    logits = torch.randn(3, 4).to(torch.bfloat16)
    assert loss_fn(logits, torch.tensor([0, 1, 2]), 0.1).dtype == torch.float32


# ================================================================ evaluate


def _linear_model(h=4, w=5, classes=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * h * w, classes))


def test_evaluate_hflip_averages_logits_of_image_and_mirror():
    model = _linear_model()
    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randint(0, 256, (n, 4, 5, 3), dtype=torch.uint8, generator=g),
                "label": torch.randint(0, 3, (n,), generator=g)} for n in (5, 3)]
    images = torch.cat([b["image"] for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    with torch.no_grad():
        x = to_model_input(images)
        plain = model(x)
        mirror = model(x.flip(-1))
    assert not torch.allclose(plain, mirror, atol=1e-3)  # orientation matters to this model
    both = (plain + mirror) / 2

    t = evaluate(model, batches, CPU, hflip=True)
    assert t.samples == 8
    assert t.loss_sum == pytest.approx(F.cross_entropy(both, labels, reduction="sum").item(), rel=1e-5)
    assert t.top1 == int((both.argmax(1) == labels).sum())

    t0 = evaluate(model, batches, CPU, hflip=False)
    assert t0.loss_sum == pytest.approx(F.cross_entropy(plain, labels, reduction="sum").item(), rel=1e-5)
    assert t0.loss_sum != pytest.approx(t.loss_sum, rel=1e-4)
    assert not model.training


class _ConstantClassifier(nn.Module):
    """Predicts class k for the constant image whose pixels are all CODES[k]."""

    CODES = (10, 60, 110, 160, 210)

    def __init__(self):
        super().__init__()
        imgs = torch.tensor(self.CODES, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 2, 2, 3).contiguous()
        self.register_buffer("centers", to_model_input(imgs).mean((1, 2, 3)))

    def forward(self, x):
        return -(x.mean((1, 2, 3)).unsqueeze(1) - self.centers.unsqueeze(0)) ** 2


def _images_predicting(classes):
    codes = torch.tensor([_ConstantClassifier.CODES[k] for k in classes], dtype=torch.uint8)
    return codes.view(-1, 1, 1, 1).expand(-1, 6, 6, 3).contiguous()


def test_evaluate_per_class_counts_by_hand():
    model = _ConstantClassifier()
    batches = [
        {"image": _images_predicting([0, 1, 2, 2]), "label": torch.tensor([0, 1, 1, 2])},
        {"image": _images_predicting([2, 0, 3]), "label": torch.tensor([2, 1, 3])},
    ]
    per_class = torch.zeros(2, 5, dtype=torch.float64)
    t = evaluate(model, batches, CPU, hflip=True, per_class=per_class)
    # class:            0  1  2  3  4
    # correct top-1:    1  1  2  1  0
    # images:           1  3  2  1  0
    assert per_class[0].tolist() == [1.0, 1.0, 2.0, 1.0, 0.0]
    assert per_class[1].tolist() == [1.0, 3.0, 2.0, 1.0, 0.0]
    assert (t.samples, t.top1) == (7, 5)
    assert per_class[0].sum().item() == t.top1 and per_class[1].sum().item() == t.samples
    # the tensor accumulates: a second pass adds the same counts
    evaluate(model, batches, CPU, per_class=per_class)
    assert per_class[1].tolist() == [2.0, 6.0, 4.0, 2.0, 0.0]
    assert per_class[0].tolist() == [2.0, 2.0, 4.0, 2.0, 0.0]


# ================================================================ checkpoint: EMA + RNG


def _tiny_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def test_checkpoint_round_trips_the_ema_state(tmp_path):
    torch.manual_seed(0)
    model = _tiny_net()
    opt = build_sgd(model, lr=0.1, momentum=0.9, weight_decay=1e-4)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 0])).backward()
        opt.step()
        ema.update_parameters(model)
    assert not torch.allclose(ema.module[0].weight, model[0].weight)  # a real average, not a copy
    write_checkpoint_dir(tmp_path, model=model, optimizer=opt, epoch=1, step=3, mlflow_run_id=None,
                         config_yaml="name: x\n", ema=ema.state_dict())
    state = read_checkpoint_dir(tmp_path)
    saved = ema.state_dict()
    assert state["ema"].keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(state["ema"][k], v), k
    assert int(state["ema"]["n_averaged"]) == 3

    torch.manual_seed(99)
    fresh = AveragedModel(_tiny_net(), multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    fresh.load_state_dict(state["ema"])
    for (k, a), b in zip(fresh.state_dict().items(), saved.values()):
        assert torch.equal(a, b), k


def test_checkpoint_without_ema_stores_none(tmp_path):
    model = _tiny_net()
    write_checkpoint_dir(tmp_path, model=model, optimizer=build_sgd(model, 0.1, 0.9, 0.0), epoch=0, step=0,
                         mlflow_run_id="r", config_yaml="")
    assert read_checkpoint_dir(tmp_path)["ema"] is None


def _draw():
    return torch.rand(4), np.random.rand(4), random.random()


def _same(a, b):
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_restore_rng_repeats_every_generator():
    state = rng_state()
    first = _draw()
    assert not _same(first, _draw())  # the generators advance
    restore_rng(state)
    assert _same(first, _draw())


def test_rng_state_survives_a_checkpoint_round_trip(tmp_path):
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    model = _tiny_net()
    write_checkpoint_dir(tmp_path, model=model, optimizer=build_sgd(model, 0.1, 0.9, 0.0), epoch=1, step=1,
                         mlflow_run_id=None, config_yaml="")
    after_save = _draw()
    _draw()
    restore_rng(read_checkpoint_dir(tmp_path)["rng"])
    assert _same(after_save, _draw())


def test_trivial_augment_keeps_shape_and_dtype_and_changes_pixels():
    from imagenet_ray.train.batch_aug import trivial_augment

    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 24, 24, 3), dtype=torch.uint8)
    out = trivial_augment(images)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert sum(not torch.equal(a, b) for a, b in zip(out, images)) >= 8  # most images get a non-identity op


def test_random_erase_rectangles_and_probability():
    import numpy as np

    from imagenet_ray.train.batch_aug import random_erase

    x = torch.ones(200, 3, 32, 32)
    out = random_erase(x, 0.5, np.random.default_rng(0))
    erased = (out == 0).flatten(1).any(1)
    assert 70 <= int(erased.sum()) <= 130  # ~ p × N
    frac = (out[erased] == 0).float().mean(dim=(1, 2, 3))
    assert float(frac.min()) >= 0.015 and float(frac.max()) <= 0.34  # 2–33 % of the area
    assert torch.equal(random_erase(x, 0.0, np.random.default_rng(0)), x) and torch.equal(x, torch.ones_like(x))
