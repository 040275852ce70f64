"""Exact top-k accuracy: integer correct counts and sample counts, summed over all workers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Number of rows whose target is among the top-k logits, for each k (k clamped to #classes)."""
    max_k = min(max(ks), logits.shape[1])
    top = logits.topk(max_k, dim=1).indices  # (N, max_k)
    hits = top.eq(target.view(-1, 1))
    return torch.stack([hits[:, : min(k, max_k)].any(dim=1).sum() for k in ks]).to(torch.int64)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all workers (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


@dataclass
class EvalTotals:
    """Running sums for one pass; float64 holds integer counts exactly up to 2**53."""

    loss_sum: float = 0.0
    samples: int = 0
    top1: int = 0
    top5: int = 0

    def add(self, loss_sum: float, samples: int, correct: torch.Tensor) -> None:
        self.loss_sum += float(loss_sum)
        self.samples += int(samples)
        self.top1 += int(correct[0])
        self.top5 += int(correct[1])

    def reduced(self, device: torch.device) -> EvalTotals:
        t = torch.tensor([self.loss_sum, self.samples, self.top1, self.top5], dtype=torch.float64, device=device)
        loss_sum, samples, top1, top5 = all_reduce_sum(t).tolist()
        return EvalTotals(loss_sum, int(samples), int(top1), int(top5))

    def as_metrics(self, prefix: str) -> dict[str, float]:
        n = max(1, self.samples)
        return {
            f"{prefix}/loss": self.loss_sum / n,
            f"{prefix}/top1": self.top1 / n,
            f"{prefix}/top5": self.top5 / n,
            f"{prefix}/images": float(self.samples),
        }
