"""Mid-epoch checkpoints: when one is due (agreed by every rank without a collective of its own), what
it holds beyond the epoch-boundary state (each rank's RNGs and EMA buffers, the epoch's partial sums),
and how a resume continues the interrupted epoch (docs/reliability.md, "Preemption")."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class MidEpochState:
    """Where an epoch was interrupted: `batches` per rank were trained by `world` ranks; the sums are
    over all ranks; `rank_states[r]` is rank r's RNG and EMA-buffer state at that point."""

    epoch: int  # 0-based index of the epoch in progress (= epochs completed)
    batches: int
    samples: int
    loss_sum: float
    decode_errors: int
    world: int
    rank_states: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> MidEpochState:
        return MidEpochState(**d)


@dataclass(frozen=True)
class EpochResume:
    """How this attempt runs the interrupted epoch: skip the first `skip_batches` of the shard (exact,
    the same order as before), or train only `stop_after_samples` per rank (same count, fresh order)."""

    skip_batches: int = 0
    stop_after_samples: int | None = None
    exact: bool = False


def plan_resume(state: MidEpochState, world: int, deterministic: bool, num_train: int) -> EpochResume:
    """Pure: a deterministic run on the same world size sees the same rows in the same order, so it skips
    the batches trained; otherwise the order differs and it trains what is left of the epoch's count."""
    if deterministic and world == state.world:
        return EpochResume(skip_batches=state.batches, exact=True)
    rows_per_rank = num_train // world  # streaming_split(equal=True)
    return EpochResume(stop_after_samples=max(0, rows_per_rank - math.ceil(state.samples / world)))


class CheckpointClock:
    """Decides from each interval's all-reduced wall time, which every rank holds identically, so the
    ranks agree on when to checkpoint and when to ask for preemption notices."""

    def __init__(self, every_s: float | None, preemption_every_s: float | None) -> None:
        self.every_s, self.preemption_every_s = every_s, preemption_every_s
        self.since_checkpoint_s = 0.0
        self.since_preemption_check_s = 0.0

    def add(self, wall_s: float) -> None:
        self.since_checkpoint_s += wall_s
        self.since_preemption_check_s += wall_s

    def interval_passed(self) -> bool:
        return self.every_s is not None and self.since_checkpoint_s >= self.every_s

    def preemption_check_due(self) -> bool:
        if self.preemption_every_s is None or self.since_preemption_check_s < self.preemption_every_s:
            return False
        self.since_preemption_check_s = 0.0
        return True

    def checkpointed(self) -> None:
        self.since_checkpoint_s = 0.0


def _ema_buffers(ema: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    # DDP broadcasts the model's buffers from rank 0 at each forward; the EMA's drift per rank.
    return {} if ema is None else {k: v.detach().cpu().clone() for k, v in ema.named_buffers()}


def rank_local_state(aug_rng: np.random.Generator, ema: torch.nn.Module | None, device: torch.device) -> dict[str, Any]:
    """What differs between ranks and is not in rank 0's checkpoint: the RNGs and the EMA's buffers."""
    state: dict[str, Any] = {
        "aug_rng": aug_rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "ema_buffers": _ema_buffers(ema),
    }
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_rank_local_state(
    state: dict[str, Any], aug_rng: np.random.Generator, ema: torch.nn.Module | None, device: torch.device
) -> None:
    aug_rng.bit_generator.state = state["aug_rng"]
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    if ema is not None:
        buffers = dict(ema.named_buffers())
        for name, value in state["ema_buffers"].items():
            buffers[name].copy_(value.to(buffers[name].device))


def gather_to_all(local: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's `local`, in rank order (the identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [local]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return gathered
