"""Device-side augmentation (train/batch_aug.py): torchvision's MixUp/CutMix, RandomErasing and
TrivialAugmentWide, driven by a seeded numpy Generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imagenet_ray.train.batch_aug import mix_batch, random_erase, trivial_augment
from imagenet_ray.train.checkpoint import restore_rng, rng_state


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


def test_trivial_augment_keeps_shape_and_dtype_and_changes_pixels():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 24, 24, 3), dtype=torch.uint8)
    out = trivial_augment(images)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert sum(not torch.equal(a, b) for a, b in zip(out, images, strict=True)) >= 8  # most: a non-identity op


def test_random_erase_rectangles_and_probability():
    x = torch.ones(200, 3, 32, 32)
    out = random_erase(x, 0.5, np.random.default_rng(0))
    erased = (out == 0).flatten(1).any(1)
    assert 70 <= int(erased.sum()) <= 130  # ~ p × N
    frac = (out[erased] == 0).float().mean(dim=(1, 2, 3))
    assert float(frac.min()) >= 0.015 and float(frac.max()) <= 0.34  # 2–33 % of the area
    assert torch.equal(random_erase(x, 0.0, np.random.default_rng(0)), x) and torch.equal(x, torch.ones_like(x))


@pytest.mark.parametrize("alphas", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_mix_batch_leaves_torchs_global_rng_alone(alphas):
    # TrivialAugmentWide draws from torch's RNG: mixing must not shift its stream
    x = torch.randn(4, 3, 8, 8)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    mix_batch(x, torch.arange(4), 4, *alphas, rng=np.random.default_rng(0))
    assert torch.equal(torch.rand(3), expected)


def test_mix_batch_targets_keep_the_image_dtype():
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(4, 3, 8, 8, dtype=dtype)
        for alphas in ((0.0, 0.0), (0.2, 0.0), (0.0, 1.0)):
            out, target = mix_batch(x, torch.arange(4), 5, *alphas, rng=np.random.default_rng(1), label_smoothing=0.1)
            assert out.dtype == target.dtype == dtype


def test_random_erase_is_deterministic_for_a_seeded_rng_and_leaves_torchs_rng_alone():
    x = torch.ones(32, 3, 16, 16)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a = random_erase(x, 0.5, np.random.default_rng(7))
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(a, random_erase(x, 0.5, np.random.default_rng(7)))
    rng = np.random.default_rng(7)
    outs = [random_erase(x, 0.5, rng) for _ in range(3)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # the rng advances


def test_random_erase_one_rectangle_per_image_of_its_own():
    x = _const_batch(n=40, h=32, w=32)
    out = random_erase(x, 1.0, np.random.default_rng(0))
    regions = out[:, 0] == 0  # (n, h, w)
    assert (out == 0).eq(regions[:, None]).all()  # the same region in every channel
    assert torch.equal(out[~(out == 0)], x[~(out == 0)])  # the rest untouched
    for region in regions[regions.flatten(1).any(1)]:
        rows, cols = region.any(1).nonzero(), region.any(0).nonzero()
        assert int(region.sum()) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert int(regions.flatten(1).any(1).sum()) >= 35  # p = 1: nearly every image (10 tries to fit)
    assert len({tuple(r.flatten().nonzero().flatten().tolist()) for r in regions}) > 30  # not one shared box


def test_random_erase_keeps_the_input_unchanged():
    x = torch.randn(8, 3, 12, 12)
    before = x.clone()
    random_erase(x, 1.0, np.random.default_rng(0))
    assert torch.equal(x, before)
