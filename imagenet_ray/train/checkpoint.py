"""Full training state ↔ a checkpoint directory (reported to Ray Train, which persists it), and the
MLflow tag that names a training run's latest checkpoint."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from imagenet_ray import storage

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
CHECKPOINT_TAG = "imagenet_ray.checkpoint"  # on a training run: the URL of its latest checkpoint directory


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


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
) -> None:
    """Write the state after `epoch` completed epochs into `directory`.

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
        },
        directory / STATE_FILE,
    )
    (directory / CONFIG_FILE).write_text(config_yaml)


def read_checkpoint_dir(directory: str | os.PathLike[str]) -> dict[str, Any]:
    # weights_only=False: the state holds RNG states (numpy arrays, tuples) we wrote ourselves.
    return cast(dict[str, Any], torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False))


def read_checkpoint_url(url: str) -> dict[str, Any]:
    """State dict of the checkpoint directory at `url` (local path or remote URL), on the CPU."""
    data = storage.read_bytes(storage.resolve(url).child(STATE_FILE))
    return cast(dict[str, Any], torch.load(io.BytesIO(data), map_location="cpu", weights_only=False))


def load_checkpoint(checkpoint: Any) -> dict[str, Any]:
    """State dict from a `ray.train.Checkpoint`."""
    with checkpoint.as_directory() as d:
        return read_checkpoint_dir(d)
