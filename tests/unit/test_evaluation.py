"""The evaluation engine: exact counts over uneven batches, mirrored logits, per-batch hooks, val batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from imagenet_ray.train.device import to_model_input
from imagenet_ray.train.evaluation import PerClassCounts, evaluate, val_batches
from imagenet_ray.train.metrics import topk_correct

CPU = torch.device("cpu")


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
    batches = [
        {"image": torch.zeros(n, 4, 4, 3, dtype=torch.uint8), "label": y} for n, y in zip(sizes, labels, strict=True)
    ]
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
    batches = [
        {"image": torch.zeros(2, 2, 2, 3, dtype=torch.uint8), "label": torch.tensor([0, 1])},
        {"image": torch.zeros(1, 2, 2, 3, dtype=torch.uint8), "label": torch.tensor([0])},
    ]
    totals = evaluate(ScriptedLogits(logits), batches, CPU)
    # 3 classes: top-5 is clamped to 3, so every row counts
    assert (totals.samples, totals.top1, totals.top5) == (3, 1, 3)


def test_evaluate_empty_gives_zero_totals():
    totals = evaluate(ScriptedLogits([]), [], CPU)
    assert (totals.samples, totals.top1, totals.top5, totals.loss_sum) == (0, 0, 0, 0.0)


def _linear_model(h=4, w=5, classes=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * h * w, classes))


def test_evaluate_hflip_averages_logits_of_image_and_mirror():
    model = _linear_model()
    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "image": torch.randint(0, 256, (n, 4, 5, 3), dtype=torch.uint8, generator=g),
            "label": torch.randint(0, 3, (n,), generator=g),
        }
        for n in (5, 3)
    ]
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
        return -((x.mean((1, 2, 3)).unsqueeze(1) - self.centers.unsqueeze(0)) ** 2)


def _images_predicting(classes):
    codes = torch.tensor([_ConstantClassifier.CODES[k] for k in classes], dtype=torch.uint8)
    return codes.view(-1, 1, 1, 1).expand(-1, 6, 6, 3).contiguous()


def test_evaluate_per_class_counts_by_hand():
    model = _ConstantClassifier()
    batches = [
        {"image": _images_predicting([0, 1, 2, 2]), "label": torch.tensor([0, 1, 1, 2])},
        {"image": _images_predicting([2, 0, 3]), "label": torch.tensor([2, 1, 3])},
    ]
    counts = PerClassCounts(5, CPU)
    t = evaluate(model, batches, CPU, hflip=True, hooks=[counts])
    per_class = counts.counts
    # class:            0  1  2  3  4
    # correct top-1:    1  1  2  1  0
    # images:           1  3  2  1  0
    assert per_class[0].tolist() == [1.0, 1.0, 2.0, 1.0, 0.0]
    assert per_class[1].tolist() == [1.0, 3.0, 2.0, 1.0, 0.0]
    assert (t.samples, t.top1) == (7, 5)
    assert per_class[0].sum().item() == t.top1 and per_class[1].sum().item() == t.samples
    # the tensor accumulates: a second pass adds the same counts
    evaluate(model, batches, CPU, hooks=[counts])
    assert per_class[1].tolist() == [2.0, 6.0, 4.0, 2.0, 0.0]
    assert per_class[0].tolist() == [2.0, 2.0, 4.0, 2.0, 0.0]


class _RecordingHook:
    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []

    def add(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        self.seen.append((logits, batch))


def test_hooks_see_the_averaged_logits_and_the_extra_columns():
    model = _ConstantClassifier()
    batches = [
        {
            "image": _images_predicting([0, 4]),
            "label": torch.tensor([0, 3], dtype=torch.int32),
            "val_index": torch.tensor([7, -1]),
        }
    ]
    hook = _RecordingHook()
    evaluate(model, batches, CPU, hflip=True, hooks=[hook])
    ((logits, batch),) = hook.seen
    assert logits.dtype == torch.float32 and logits.argmax(1).tolist() == [0, 4]
    assert batch["label"].dtype == torch.int64  # labels arrive as int64 whatever the column's dtype
    assert batch["val_index"].tolist() == [7, -1]


def test_per_class_artifact_names_the_classes():
    counts = PerClassCounts(3, CPU)
    counts.add(torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0]]), {"label": torch.tensor([0, 0, 2])})
    art = counts.as_artifact(("n1", "n2", "n3"))
    assert art == {"classes": ["n1", "n2", "n3"], "top1": [0.5, 0.0, 0.0], "count": [2.0, 0.0, 1.0]}


class _FakeShard:
    def __init__(self, batches):
        self.batches, self.calls = batches, []

    def iter_torch_batches(self, **kwargs):
        self.calls.append(kwargs)
        return iter(self.batches)


def test_val_batches_on_cpu_passes_every_column_through():
    batch = {
        "image": torch.zeros(2, 4, 4, 3, dtype=torch.uint8),
        "label": torch.tensor([1, 2]),
        "val_index": torch.tensor([0, 5]),
    }
    shard = _FakeShard([batch])
    assert list(val_batches(shard, 16, 3, CPU)) == [batch]
    assert shard.calls == [{"batch_size": 16, "prefetch_batches": 3, "device": CPU}]
