"""The training step: loss, one SGD step per micro-batch group, accumulation with no_sync, the last flush."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from imagenet_ray.train.batch_aug import mix_batch
from imagenet_ray.train.device import to_model_input
from imagenet_ray.train.step import TrainStep, loss_fn


def _tiny_model(num_classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    ).to(memory_format=torch.channels_last)


def test_train_step_decreases_loss_on_a_fixed_batch():
    torch.manual_seed(1)
    model = _tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    colours = torch.tensor([[220, 30, 30], [30, 220, 30], [30, 30, 220], [200, 200, 40]], dtype=torch.float32)
    noise = torch.randn(8, 16, 16, 3) * 20
    images = (colours[labels].view(8, 1, 1, 3) + noise).clamp(0, 255).to(torch.uint8)
    model.train()
    step = TrainStep(model, opt, lambda _: 0.1)
    losses = [step(to_model_input(images), labels).item() for _ in range(15)]
    assert all(loss > 0 for loss in losses)
    assert losses[-1] < losses[0] * 0.7, losses
    assert opt.param_groups[0]["lr"] == 0.1  # the step sets the lr it is given


def test_train_step_returns_summed_loss_and_uses_label_smoothing():
    model = _tiny_model()
    images = torch.randint(0, 256, (6, 8, 8, 3), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    model.eval()  # BatchNorm in eval: the forward pass is deterministic and independent of the step
    with torch.no_grad():
        logits = model(to_model_input(images))
    expected = F.cross_entropy(logits, labels, label_smoothing=0.1).item() * 6
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    got = TrainStep(model, opt, lambda _: 0.0, label_smoothing=0.1)(to_model_input(images), labels)
    assert got.requires_grad is False
    assert got.item() == pytest.approx(expected, rel=1e-5)


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


# ================================================================ gradient accumulation


class _NoSyncRecorder(nn.Module):
    """A linear model with DDP's `no_sync` API that records which forwards ran inside it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
        self.inside, self.synced = False, []

    @contextlib.contextmanager
    def no_sync(self):
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def forward(self, x):
        self.synced.append(not self.inside)
        return self.body(x)


def _batches(n: int, size: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            to_model_input(torch.randint(0, 256, (size, 4, 4, 3), dtype=torch.uint8, generator=g)),
            torch.randint(0, 3, (size,), generator=g),
        )
        for _ in range(n)
    ]


def test_accumulation_steps_once_per_group_and_flushes_the_rest():
    model = _NoSyncRecorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    lrs, after = [], []
    step = TrainStep(model, opt, lambda s: lrs.append(s) or 0.01 * (s + 1), accum_steps=3, after_step=after.append)
    for x, y in _batches(7):
        step(x, y)
    assert step.step == 2 and step.pending == 1
    step.flush()
    assert step.step == 3 and step.pending == 0
    assert lrs == [0, 1, 2] and after == [1, 2, 3]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.03)
    # the all-reduce is skipped on every micro-batch but the last of each group
    assert model.synced == [False, False, True, False, False, True, False]
    step.flush()  # nothing pending: no extra step
    assert step.step == 3


def test_accumulated_micro_batches_equal_one_big_batch():
    (x1, y1), (x2, y2) = _batches(2)
    big, small = _NoSyncRecorder(), _NoSyncRecorder()
    big_opt = torch.optim.SGD(big.parameters(), lr=0.5, momentum=0.9)
    small_opt = torch.optim.SGD(small.parameters(), lr=0.5, momentum=0.9)
    TrainStep(big, big_opt, lambda _: 0.5)(torch.cat([x1, x2]), torch.cat([y1, y2]))
    step = TrainStep(small, small_opt, lambda _: 0.5, accum_steps=2)
    step(x1, y1)
    step(x2, y2)
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_step_starts_at_the_restored_step_and_takes_soft_targets():
    model = _NoSyncRecorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen = []
    step = TrainStep(model, opt, lambda s: seen.append(s) or 0.1, step=40, label_smoothing=0.1)
    x, y = _batches(1)[0]
    _, soft = mix_batch(x, y, 3, 0.0, 0.0, np.random.default_rng(0), 0.1)
    with torch.no_grad():
        expected = F.cross_entropy(model.body(x), soft).item() * 4
    assert step(x, soft).item() == pytest.approx(expected, rel=1e-5)
    assert seen == [40] and step.step == 41


# ================================================================ gradient clipping


class _StepRecorder:
    """Wraps an optimizer's step: the global gradient norm each step sees (after any clipping)."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.norms: list[float] = []
        self._step = opt.step
        opt.step = self
        self._params = [p for g in opt.param_groups for p in g["params"]]

    def __call__(self, *args, **kwargs):
        grads = [p.grad.flatten() for p in self._params if p.grad is not None]
        self.norms.append(torch.cat(grads).norm().item())
        return self._step(*args, **kwargs)


def _unclipped_norm(model: nn.Module, batches) -> float:
    """The global norm of the mean gradient over `batches` (each micro-batch's loss / len(batches))."""
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        (loss_fn(model(x), y, 0.0) / len(batches)).backward()
    norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    model.zero_grad(set_to_none=True)
    return norm


def test_clip_grad_norm_caps_the_norm_the_optimizer_sees_and_reports_the_norm_before():
    model = _NoSyncRecorder()
    (x, y), (x2, y2) = _batches(2)
    before = _unclipped_norm(model, [(x, y)])
    clip = before / 4
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen = _StepRecorder(opt)
    step = TrainStep(model, opt, lambda _: 0.0, clip_grad_norm=clip)
    step(x, y)
    assert step.grad_norm is not None and step.grad_norm.item() == pytest.approx(before, rel=1e-5)
    assert seen.norms == [pytest.approx(clip, rel=1e-5)]
    # a norm already under the limit is left as it is
    loose = TrainStep(model, opt, lambda _: 0.0, clip_grad_norm=1e6)
    loose(x2, y2)
    assert seen.norms[1] == pytest.approx(_unclipped_norm(model, [(x2, y2)]), rel=1e-5)
    assert loose.grad_norm is not None and loose.grad_norm.item() == pytest.approx(seen.norms[1], rel=1e-5)


def test_clipping_off_leaves_gradients_and_grad_norm_unset():
    model = _NoSyncRecorder()
    x, y = _batches(1)[0]
    expected = _unclipped_norm(model, [(x, y)])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen = _StepRecorder(opt)
    step = TrainStep(model, opt, lambda _: 0.0)
    step(x, y)
    assert step.grad_norm is None
    assert seen.norms == [pytest.approx(expected, rel=1e-6)]


def test_clipping_with_accumulation_clips_the_accumulated_gradient_once():
    """Two accumulated micro-batches with clipping train like one big batch with clipping: the norm is
    taken once, of the mean gradient, when the optimizer steps (not per micro-batch)."""
    (x1, y1), (x2, y2) = _batches(2)
    big, small = _NoSyncRecorder(), _NoSyncRecorder()
    mean_norm = _unclipped_norm(small, [(x1, y1), (x2, y2)])
    clip = mean_norm / 3
    big_opt = torch.optim.SGD(big.parameters(), lr=0.5, momentum=0.9)
    small_opt = torch.optim.SGD(small.parameters(), lr=0.5, momentum=0.9)
    seen = _StepRecorder(small_opt)
    TrainStep(big, big_opt, lambda _: 0.5, clip_grad_norm=clip)(torch.cat([x1, x2]), torch.cat([y1, y2]))
    step = TrainStep(small, small_opt, lambda _: 0.5, accum_steps=2, clip_grad_norm=clip)
    step(x1, y1)
    assert step.grad_norm is None and seen.norms == []  # no optimizer step yet: nothing clipped or reported
    step(x2, y2)
    assert step.grad_norm is not None and step.grad_norm.item() == pytest.approx(mean_norm, rel=1e-5)
    assert seen.norms == [pytest.approx(clip, rel=1e-5)]
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_flush_clips_a_partial_accumulation_too():
    model = _NoSyncRecorder()
    (x, y), (x2, y2) = _batches(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen = _StepRecorder(opt)
    step = TrainStep(model, opt, lambda _: 0.0, accum_steps=3, clip_grad_norm=1e-4)
    step(x, y)
    step(x2, y2)
    assert seen.norms == []
    step.flush()
    assert seen.norms == [pytest.approx(1e-4, rel=1e-4)] and step.step == 1
    assert step.grad_norm is not None and step.grad_norm.item() > 1e-3
