"""The run's pictures, as PNG bytes: per-class top-1, the most-confused class pairs, and a grid of augmented
training inputs as the model saw them.

Pure functions: numbers in, bytes out. Figures draw on matplotlib's Agg canvas without pyplot, so nothing
needs a display and no global backend is set for whoever imports this."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from imagenet_ray.data.classes import WNID_RE, imagenet_classes

BARS_UP_TO = 40  # classes: one bar each up to here; beyond, the sorted curve and the worst ones by name
LABEL_CHARS = 32


def class_label(name: str) -> str:
    """`tench (n01440764)` for an ImageNet wnid (two classes share the name "crane"), else `name`; short."""
    if WNID_RE.match(name):
        classes = imagenet_classes()
        if name in classes.index:
            name = f"{classes.names[classes.index[name]].split(',')[0]} ({name})"
    return name if len(name) <= LABEL_CHARS else name[: LABEL_CHARS - 1] + "…"


def _png(fig: Figure, dpi: int = 100) -> bytes:
    FigureCanvasAgg(fig)  # attaches itself as the figure's canvas
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=dpi)
    return out.getvalue()


def _as_numpy(values: Any) -> np.ndarray[Any, Any]:
    if hasattr(values, "detach"):  # a torch tensor, possibly on a GPU
        values = values.detach().cpu().numpy()
    return np.asarray(values)


# -- per-class top-1 ------------------------------------------------------------------------------
def per_class_top1_png(per_class: Mapping[str, Any], worst: int = 20) -> bytes:
    """A chart of `per_class_top1.json` (`PerClassCounts.as_artifact`: classes, top1, count); classes
    without a val image are left out. Up to 40 classes: a bar each; more: the sorted curve of every
    class's top-1 beside the `worst` classes by name."""
    top1 = np.asarray(per_class["top1"], dtype=np.float64)
    count = np.asarray(per_class["count"], dtype=np.float64)
    seen = np.flatnonzero(count > 0)
    labels = [class_label(str(per_class["classes"][i])) for i in seen]
    top1, count = top1[seen], count[seen]
    mean = float(top1.mean()) if len(top1) else 0.0
    title = f"per-class top-1: mean {mean:.3f} over {len(top1)} classes ({int(count.sum())} images)"
    if len(top1) <= BARS_UP_TO:
        fig = Figure(figsize=(8, 1.2 + 0.3 * max(1, len(top1))), layout="constrained")
        ax = fig.add_subplot()
        ax.barh(range(len(top1)), top1, color="tab:blue")
        ax.set_yticks(range(len(top1)), labels, fontsize=8)
        ax.invert_yaxis()  # class 0 on top, as listed
        for y, value in enumerate(top1):
            ax.text(min(value, 1.0) + 0.01, y, f"{value:.2f}", va="center", fontsize=7)
        ax.axvline(mean, color="tab:red", linestyle="--", linewidth=1, label=f"mean {mean:.3f}")
        ax.set_xlim(0, 1.1)
        ax.set_xlabel("top-1")
        ax.legend(loc="lower right", fontsize=8)
        fig.suptitle(title, fontsize=10)
        return _png(fig)
    fig = Figure(figsize=(14, 6), layout="constrained")
    curve, bars = fig.subplots(1, 2, width_ratios=[3, 2])
    ranked = np.sort(top1)[::-1]
    curve.plot(np.arange(1, len(ranked) + 1), ranked, color="tab:blue")
    curve.fill_between(np.arange(1, len(ranked) + 1), ranked, alpha=0.2, color="tab:blue")
    curve.axhline(mean, color="tab:red", linestyle="--", linewidth=1, label=f"mean {mean:.3f}")
    for q in (0.1, 0.5):  # how bad the tail is, in two numbers
        curve.axhline(float(np.quantile(top1, q)), color="gray", linestyle=":", linewidth=1)
        curve.text(len(ranked), float(np.quantile(top1, q)), f"p{int(q * 100)}", ha="right", va="bottom", fontsize=8)
    curve.set_xlim(1, len(ranked))
    curve.set_ylim(0, 1.02)
    curve.set_xlabel("classes, best to worst")
    curve.set_ylabel("top-1")
    curve.legend(loc="lower left", fontsize=8)
    # The worst classes, worst on top; ties by class order.
    order = np.lexsort((np.arange(len(top1)), top1))[:worst]
    bars.barh(range(len(order)), top1[order], color="tab:orange")
    bars.set_yticks(range(len(order)), [labels[i] for i in order], fontsize=8)
    bars.invert_yaxis()
    for y, i in enumerate(order):
        bars.text(top1[i] + 0.01, y, f"{top1[i]:.2f}", va="center", fontsize=7)
    bars.set_xlim(0, 1.1)
    bars.set_title(f"the {len(order)} worst classes", fontsize=9)
    fig.suptitle(title, fontsize=11)
    return _png(fig)


# -- the most-confused pairs ----------------------------------------------------------------------
def top_confused_pairs(counts: Any, k: int = 20) -> list[tuple[int, int, int]]:
    """The `k` largest (true, predicted, count) of a (classes, classes) count (`ConfusionPairs.reduced`),
    the diagonal (correct predictions) left out; largest first, ties by (true, predicted)."""
    matrix = _as_numpy(counts).astype(np.int64, copy=True)  # a copy: the diagonal is zeroed below
    num_classes = matrix.shape[0]
    np.fill_diagonal(matrix, 0)
    flat = matrix.ravel()
    wrong = np.flatnonzero(flat > 0)
    order = wrong[np.lexsort((wrong, -flat[wrong]))][:k]
    return [(int(i // num_classes), int(i % num_classes), int(flat[i])) for i in order]


def confused_pairs_dict(pairs: Sequence[tuple[int, int, int]], names: Sequence[str]) -> dict[str, Any]:
    """The pairs as a JSON artifact: `{"pairs": [{"true", "true_name", "predicted", "predicted_name",
    "count"}, ...]}`, largest first."""
    return {
        "pairs": [
            {"true": t, "true_name": names[t], "predicted": p, "predicted_name": names[p], "count": n}
            for t, p, n in pairs
        ]
    }


def confused_pairs_png(pairs: Sequence[tuple[int, int, int]], names: Sequence[str]) -> bytes:
    """A table-like bar chart, one row per pair, largest on top: "true → predicted: n"."""
    fig = Figure(figsize=(9, 1.2 + 0.32 * max(1, len(pairs))), layout="constrained")
    ax = fig.add_subplot()
    if not pairs:
        ax.text(0.5, 0.5, "no wrong predictions", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _png(fig)
    counts = [n for _, _, n in pairs]
    ax.barh(range(len(pairs)), counts, color="tab:purple")
    ax.set_yticks(
        range(len(pairs)), [f"{class_label(names[t])} → {class_label(names[p])}" for t, p, _ in pairs], fontsize=8
    )
    ax.invert_yaxis()
    for y, n in enumerate(counts):
        ax.text(n, y, f" {n}", va="center", fontsize=8)
    ax.set_xlim(0, max(counts) * 1.12)
    ax.set_xlabel("val images predicted as the other class")
    fig.suptitle(f"the {len(pairs)} most-confused class pairs (true → predicted)", fontsize=10)
    return _png(fig)


# -- augmented inputs -------------------------------------------------------------------------------
def augmented_grid_png(images: Any, labels: Any, names: Sequence[str], n: int = 16) -> bytes:
    """A grid of the first `n` images of a uint8 batch (N×H×W×3 or N×3×H×W, array or tensor) as the model
    saw them (after the crop and the augmentations), each titled with its class."""
    pixels, classes = _as_numpy(images), _as_numpy(labels).astype(np.int64).ravel()
    if pixels.ndim != 4 or pixels.dtype != np.uint8 or 3 not in (pixels.shape[1], pixels.shape[-1]):
        raise ValueError(f"augmented_grid_png: want uint8 N×H×W×3 or N×3×H×W images, got {pixels.dtype} {pixels.shape}")
    if pixels.shape[-1] != 3:
        pixels = pixels.transpose(0, 2, 3, 1)
    shown = min(n, len(pixels))
    cols = math.ceil(math.sqrt(shown)) if shown else 1
    rows = max(1, math.ceil(shown / cols))
    fig = Figure(figsize=(2.2 * cols, 2.4 * rows), layout="constrained")
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_axis_off()
        if i < shown:
            ax.imshow(pixels[i], interpolation="nearest")
            ax.set_title(class_label(names[classes[i]]), fontsize=7)
    fig.suptitle(f"{shown} augmented training inputs ({pixels.shape[1]}×{pixels.shape[2]})", fontsize=10)
    return _png(fig)
