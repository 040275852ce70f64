"""The run's pictures decode as PNGs of a plausible size, without a display; confused pairs count exactly."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from imagenet_ray.data.classes import imagenet_classes
from imagenet_ray.train.evaluation import ConfusionPairs, PerClassCounts, evaluate
from imagenet_ray.train.pictures import (
    augmented_grid_png,
    class_label,
    confused_pairs_dict,
    confused_pairs_png,
    per_class_top1_png,
    top_confused_pairs,
)

CPU = torch.device("cpu")


def decoded(png: bytes) -> Image.Image:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


@pytest.fixture(autouse=True)
def no_display(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)


def test_pictures_never_choose_a_global_backend():
    import matplotlib

    before = matplotlib.rcParams["backend"]
    per_class_top1_png({"classes": ["a"], "top1": [0.5], "count": [2.0]})
    assert matplotlib.rcParams["backend"] == before  # no pyplot, no matplotlib.use(): Agg canvases only


def test_class_label_names_imagenet_wnids():
    assert class_label("n01440764") == "tench (n01440764)"
    # two classes named "crane": the wnid tells them apart
    assert class_label("n02012849") != class_label("n03126707")
    assert class_label("cat") == "cat"
    assert len(class_label("x" * 100)) == 32


def test_per_class_top1_ten_classes_as_bars():
    per_class = {
        "classes": [f"class {i}" for i in range(10)],
        "top1": [i / 10 for i in range(10)],
        "count": [50.0] * 10,
    }
    image = decoded(per_class_top1_png(per_class))
    assert image.width >= 700 and 300 <= image.height <= 700


def test_per_class_top1_a_thousand_classes_as_curve_and_worst():
    rng = np.random.default_rng(0)
    wnids = list(imagenet_classes().wnids)
    top1 = rng.uniform(0.2, 1.0, 1000)
    count = np.full(1000, 50.0)
    count[7] = 0  # a class without val images is left out, not drawn as 0
    per_class = {"classes": wnids, "top1": top1.tolist(), "count": count.tolist()}
    image = decoded(per_class_top1_png(per_class))
    assert (image.width, image.height) == (1400, 600)
    assert json.dumps(per_class)  # the artifact it reads is plain JSON


def test_confusion_pairs_count_exactly_and_skip_correct_predictions():
    hook = ConfusionPairs(4, CPU)
    eye = torch.eye(4)
    # batch 1: true 0 → 1 twice, true 2 → 3 once, one correct 0
    hook.add(eye[[1, 1, 3, 0]] * 5, {"label": torch.tensor([0, 0, 2, 0])})
    # batch 2: true 0 → 1 once more, true 3 → 2 once, two correct (1 and 3)
    hook.add(eye[[1, 2, 1, 3]] * 5, {"label": torch.tensor([0, 3, 1, 3])})
    counts = hook.reduced()
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[0, 1], expected[2, 3], expected[3, 2] = 3, 1, 1
    assert counts.dtype == torch.int64 and torch.equal(counts, expected)
    assert int(counts.diagonal().sum()) == 0 and int(counts.sum()) == 5  # 8 images, 3 correct

    pairs = top_confused_pairs(counts, k=2)
    assert pairs == [(0, 1, 3), (2, 3, 1)]  # largest first, ties by (true, predicted)
    assert top_confused_pairs(counts, k=10) == [(0, 1, 3), (2, 3, 1), (3, 2, 1)]
    names = ["n01440764", "n01443537", "n01484850", "n01491361"]
    as_json = confused_pairs_dict(pairs, names)
    assert as_json["pairs"][0] == {
        "true": 0,
        "true_name": "n01440764",
        "predicted": 1,
        "predicted_name": "n01443537",
        "count": 3,
    }
    json.dumps(as_json)
    image = decoded(confused_pairs_png(top_confused_pairs(counts, k=10), names))
    assert image.width >= 800 and image.height >= 150


def test_confusion_pairs_as_an_evaluate_hook_agree_with_per_class_counts():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(n, 5, generator=g) for n in (6, 6, 3)]
    labels = [torch.randint(0, 5, (n,), generator=g) for n in (6, 6, 3)]
    batches = [{"image": torch.zeros(len(y), 4, 4, 3, dtype=torch.uint8), "label": y} for y in labels]

    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return logits[self.calls - 1]

    confusion, per_class = ConfusionPairs(5, CPU), PerClassCounts(5, CPU)
    totals = evaluate(Scripted(), batches, CPU, hooks=[confusion, per_class])
    counts = confusion.reduced()
    assert int(counts.sum()) == totals.samples - totals.top1
    # each true class's wrong predictions = its images - its correct ones
    pc = per_class.reduced()
    assert torch.equal(counts.sum(1), (pc[1] - pc[0]).to(torch.int64))
    predicted, truth = torch.cat(logits).argmax(1), torch.cat(labels)
    wrong = predicted != truth
    for t, p in zip(truth[wrong].tolist(), predicted[wrong].tolist(), strict=True):
        assert counts[t, p] >= 1


def test_no_confusions_still_draw():
    assert top_confused_pairs(np.eye(3, dtype=np.int64) * 9, k=5) == []
    decoded(confused_pairs_png([], ["a", "b", "c"]))


@pytest.mark.parametrize("channels_first", [False, True])
def test_augmented_grid(channels_first):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (20, 64, 48, 3), dtype=np.uint8)
    batch = torch.from_numpy(images.transpose(0, 3, 1, 2).copy() if channels_first else images)
    labels = torch.arange(20) % 3
    image = decoded(augmented_grid_png(batch, labels, ["n01440764", "cat", "dog"], n=16))
    assert (image.width, image.height) == (880, 960)  # 4 × 4 cells of 2.2 × 2.4 inches at 100 dpi
    small = decoded(augmented_grid_png(images[:3], [0, 1, 2], ["a", "b", "c"]))
    assert (small.width, small.height) == (440, 480)  # 3 images: 2 × 2
    with pytest.raises(ValueError, match="uint8"):
        augmented_grid_png(images.astype(np.float32), labels, ["a", "b", "c"])
