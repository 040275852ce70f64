"""Loop pieces usable without Ray: input conversion, one SGD step, exact evaluation."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from imagenet_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from imagenet_ray.train.loop import evaluate, to_model_input, train_step
from imagenet_ray.train.metrics import topk_correct

CPU = torch.device("cpu")


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


def _tiny_model(num_classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, num_classes)).to(memory_format=torch.channels_last)


def test_train_step_decreases_loss_on_a_fixed_batch():
    torch.manual_seed(1)
    model = _tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    colours = torch.tensor([[220, 30, 30], [30, 220, 30], [30, 30, 220], [200, 200, 40]], dtype=torch.float32)
    noise = torch.randn(8, 16, 16, 3) * 20
    images = (colours[labels].view(8, 1, 1, 3) + noise).clamp(0, 255).to(torch.uint8)
    model.train()
    losses = [train_step(model, opt, images, labels, lr=0.1).item() for _ in range(15)]
    assert all(loss > 0 for loss in losses)
    assert losses[-1] < losses[0] * 0.7, losses
    assert opt.param_groups[0]["lr"] == 0.1  # train_step sets the lr it is given


def test_train_step_returns_summed_loss_and_uses_label_smoothing():
    model = _tiny_model()
    images = torch.randint(0, 256, (6, 8, 8, 3), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    model.eval()  # BatchNorm in eval: the forward pass is deterministic and independent of the step
    with torch.no_grad():
        logits = model(to_model_input(images))
    expected = F.cross_entropy(logits, labels, label_smoothing=0.1).item() * 6
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    got = train_step(model, opt, images, labels, lr=0.0, label_smoothing=0.1)
    assert got.requires_grad is False
    assert got.item() == pytest.approx(expected, rel=1e-5)


class ScriptedLogits(nn.Module):
    """Returns pre-set logits for each successive batch, ignoring the pixels (checks the batch size)."""

    def __init__(self, logits: list[torch.Tensor]):
        super().__init__()
        self.logits = list(logits)
        self.calls = 0
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        out = self.logits[self.calls]
        assert x.shape[0] == out.shape[0] and x.shape[1] == 3
        self.calls += 1
        return out + 0 * self.anchor


def test_evaluate_exact_counts_over_uneven_batches():
    g = torch.Generator().manual_seed(0)
    sizes = [5, 5, 3]  # a short last batch: nothing dropped or padded
    logits = [torch.randn(n, 10, generator=g) for n in sizes]
    labels = [torch.randint(0, 10, (n,), generator=g) for n in sizes]
    # make some rows exact top-1 hits so both counts are non-trivial
    labels[0][:3] = logits[0][:3].argmax(1)
    batches = [{"image": torch.zeros(n, 4, 4, 3, dtype=torch.uint8), "label": y} for n, y in zip(sizes, labels)]
    model = ScriptedLogits(logits)
    model.train()
    totals = evaluate(model, batches, CPU)
    assert not model.training, "evaluate must switch the model to eval mode"
    assert model.calls == 3
    all_logits, all_labels = torch.cat(logits), torch.cat(labels)
    top1, top5 = topk_correct(all_logits, all_labels).tolist()
    assert totals.samples == 13
    assert (totals.top1, totals.top5) == (top1, top5)
    assert totals.top1 >= 3
    assert totals.loss_sum == pytest.approx(F.cross_entropy(all_logits, all_labels, reduction="sum").item(), rel=1e-6)
    metrics = totals.as_metrics("val")
    assert metrics["val/top1"] == pytest.approx(top1 / 13) and metrics["val/images"] == 13.0


def test_evaluate_hand_computed_counts():
    logits = [torch.tensor([[5.0, 1.0, 0.0], [0.0, 1.0, 5.0]]), torch.tensor([[1.0, 2.0, 3.0]])]
    batches = [{"image": torch.zeros(2, 2, 2, 3, dtype=torch.uint8), "label": torch.tensor([0, 1])},
               {"image": torch.zeros(1, 2, 2, 3, dtype=torch.uint8), "label": torch.tensor([0])}]
    totals = evaluate(ScriptedLogits(logits), batches, CPU)
    # 3 classes: top-5 is clamped to 3, so every row counts
    assert (totals.samples, totals.top1, totals.top5) == (3, 1, 3)


def test_evaluate_empty_gives_zero_totals():
    totals = evaluate(ScriptedLogits([]), [], CPU)
    assert (totals.samples, totals.top1, totals.top5, totals.loss_sum) == (0, 0, 0, 0.0)
