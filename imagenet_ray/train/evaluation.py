"""The evaluation engine of training's validation and the evaluate job: exact loss and top-1/top-5 over
every batch a worker receives (no padding, no drop), optional mirrored logits, and per-batch hooks
(per-class counts and confused class pairs here; the evaluate job adds ImageNet-ReaL) that see each
batch's logits."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from imagenet_ray.data.device_decode import eval_batch_on_device
from imagenet_ray.train.device import DEVICE_DEFAULT, autocast_context, to_model_input
from imagenet_ray.train.metrics import EvalTotals, all_reduce_sum, topk_correct


class BatchHook(Protocol):
    """Counts something more per batch: `logits` (N, classes) float, `batch` holds `label` (and extras)."""

    def add(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> None: ...


class PerClassCounts:
    """Per-class [correct top-1, images] sums, a (2, num_classes) float64 tensor on `device`."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.counts = torch.zeros(2, num_classes, dtype=torch.float64, device=device)

    def add(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        labels = batch["label"]
        hit = (logits.argmax(1) == labels).to(self.counts.dtype)
        self.counts[0].index_add_(0, labels, hit)
        self.counts[1].index_add_(0, labels, torch.ones_like(hit))

    def reduced(self) -> torch.Tensor:
        """The sums over all workers, on the CPU."""
        return all_reduce_sum(self.counts).cpu()

    def as_artifact(self, classes: Sequence[str]) -> dict[str, Any]:
        """per_class_top1.json of reduced counts (call on every rank first: `reduced` all-reduces)."""
        counts = self.reduced()
        return {
            "classes": list(classes),
            "top1": (counts[0] / counts[1].clamp(min=1)).tolist(),
            "count": counts[1].tolist(),
        }


class ConfusionPairs:
    """Wrong top-1 predictions per (true, predicted) class pair: a (classes × classes) int64 count on
    `device`, 8 MB for 1,000 classes; correct predictions (the diagonal) stay 0."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)

    def add(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        labels = batch["label"].long()
        predicted = logits.argmax(1)
        # Every row is added, a correct one with weight 0: no boolean mask, so no device sync per batch.
        self.counts.index_add_(0, labels * self.num_classes + predicted, (predicted != labels).long())

    def reduced(self) -> torch.Tensor:
        """The (true, predicted) counts summed over all workers, (classes, classes) on the CPU (call on
        every rank: it all-reduces)."""
        return all_reduce_sum(self.counts).cpu().view(self.num_classes, self.num_classes)


def val_batches(
    shard: Any,
    batch_size: int,
    prefetch_batches: int,
    device: torch.device,
    decode_on: str = "cpu",
    resize: int = 0,
    crop: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's share of the val set (every image once over all workers), on `device`.

    decode_on="gpu": the shard holds JPEG bytes, decoded and cropped (resize, crop) here."""
    if decode_on == "gpu":
        for b in shard.iter_batches(batch_size=batch_size, prefetch_batches=prefetch_batches, batch_format="numpy"):
            out = {
                "image": eval_batch_on_device(list(b["image"]), resize, crop, device),
                "label": torch.as_tensor(b["label"], dtype=torch.int64).to(device),
            }
            if "val_index" in b:
                out["val_index"] = torch.as_tensor(b["val_index"], dtype=torch.int64).to(device)
            yield out
    else:
        # dtypes are inferred (uint8 images; `evaluate` casts labels to int64): extra columns such as
        # `val_index` pass through, which a per-column dtypes dict would refuse.
        yield from shard.iter_torch_batches(batch_size=batch_size, prefetch_batches=prefetch_batches, device=device)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype | Any | None = DEVICE_DEFAULT,
    hflip: bool = False,
    hooks: Sequence[BatchHook] = (),
) -> EvalTotals:
    """This worker's loss and top-1/top-5 counts (`.reduced(device)` sums them over workers).

    dtype: autocast precision (None = fp32; default: the device's). hflip: average the logits of each
    image and its mirror. hooks: each gets every batch's (averaged) logits.
    """
    model.eval()
    totals = EvalTotals()
    for batch in batches:
        batch = {**batch, "image": batch["image"].to(device), "label": batch["label"].to(device).long()}
        labels = batch["label"]
        x = to_model_input(batch["image"])
        with autocast_context(device, dtype):
            logits = model(x).float()
            if hflip:
                logits = (logits + model(x.flip(-1)).float()) / 2
        loss_sum = F.cross_entropy(logits, labels, reduction="sum")
        totals.add(loss_sum.item(), labels.shape[0], topk_correct(logits, labels))
        for hook in hooks:
            hook.add(logits, batch)
    return totals
