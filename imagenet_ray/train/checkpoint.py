"""Full training state ↔ a checkpoint directory (reported to Ray Train, which persists it), and the
MLflow tag that names a training run's latest checkpoint."""

from __future__ import annotations

import io
import os
import pickle
import random
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from imagenet_ray import storage
from imagenet_ray.errors import UserError

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
CHECKPOINT_TAG = "imagenet_ray.checkpoint"  # on a training run: the URL of its latest checkpoint directory


def rng_state() -> dict[str, Any]:
    """The global RNGs' states in types `torch.load(weights_only=True)` accepts: tensors, ints, tuples."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    return {
        "python": (version, torch.tensor(internal, dtype=torch.int64), gauss),
        "numpy": (name, torch.from_numpy(np.asarray(keys).astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def _load_state(source: Any, where: str) -> dict[str, Any]:
    """Checkpoints come from URLs an MLflow tag or the model registry names: never unpickle them.
    weights_only=True admits tensors, numbers, strings and containers, which is all the state holds."""
    try:
        return cast(dict[str, Any], torch.load(source, map_location="cpu", weights_only=True))
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{where}: not a checkpoint this project can load safely ({first})") from exc


def write_checkpoint_dir(
    directory: str | os.PathLike[str],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    step: int,
    mlflow_run_id: str | None,
    config_yaml: str,
    ema: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    mid_epoch: dict[str, Any] | None = None,
) -> None:
    """Write the state after `epoch` completed epochs into `directory`, with that epoch's `metrics`
    (logged from here if a failure kept them from MLflow); `mid_epoch` (mid_epoch.MidEpochState) when
    it was taken inside the next epoch.

    The LR schedule is a pure function of `step`, so the step is its whole state; bf16 autocast
    needs no gradient scaler, so there is none to save.
    """
    directory = Path(directory)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "ema": ema,
            "epoch": epoch,
            "step": step,
            "mlflow_run_id": mlflow_run_id,
            "rng": rng_state(),
            "config_yaml": config_yaml,
            "metrics": {k: float(v) for k, v in (metrics or {}).items()},
            "mid_epoch": mid_epoch,
        },
        directory / STATE_FILE,
    )
    (directory / CONFIG_FILE).write_text(config_yaml)


def read_checkpoint_dir(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    return _load_state(path, str(path))


def read_checkpoint_url(url: str) -> dict[str, Any]:
    """State dict of the checkpoint directory at `url` (local path or remote URL), on the CPU."""
    location = storage.resolve(url).child(STATE_FILE)
    return _load_state(io.BytesIO(storage.read_bytes(location)), location.url)


def load_checkpoint(checkpoint: Any) -> dict[str, Any]:
    """State dict from a `ray.train.Checkpoint`."""
    with checkpoint.as_directory() as d:
        return read_checkpoint_dir(d)
