"""Checkpoints that survive failures, on a local Ray: exact resume at epoch boundaries, job-level
resume by run name, and a worker killed mid-run (restart from the latest checkpoint, same MLflow run,
no epoch logged twice)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from imagenet_ray.config import load_config
from imagenet_ray.tracking import RunSink
from imagenet_ray.train.checkpoint import read_checkpoint_dir

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _cfg(root, tmp_path, *overrides):
    return load_config(
        "configs/smoke.yaml",
        [
            f"data.url={root}",
            f"train.storage_path={tmp_path / 'runs'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "data.batch_size=4",
            "eval.batch_size=8",
            "data.train_crop=32",
            "eval.resize=40",
            "eval.crop=32",
            "data.local_shuffle_buffer=8",
            *overrides,
        ],
    )


def test_resume_is_exact_at_epoch_boundaries(local_ray, prepared, tmp_path):
    """2 epochs straight == 1 epoch, stop, resubmit with the same name, 1 more epoch."""
    from imagenet_ray.train.trainer import run_training

    root, _ = prepared
    common = ("data.deterministic=true", "data.decode_on=gpu", "train.num_workers=1", "train.epochs=2", "seed=3")
    straight = run_training(_cfg(root, tmp_path, *common, "name=straight"))
    first = run_training(_cfg(root, tmp_path, *common, "name=resumed", "train.stop_after_epochs=1"))
    assert first["epoch"] == 1
    resumed = run_training(_cfg(root, tmp_path, *common, "name=resumed"))
    assert resumed["epoch"] == 2 and resumed["mlflow_run_id"] == first["mlflow_run_id"]

    a = read_checkpoint_dir(straight["checkpoint_path"])
    b = read_checkpoint_dir(resumed["checkpoint_path"])
    assert a["step"] == b["step"]
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), atol=1e-5, rtol=1e-4), key
    assert straight["val/top1"] == resumed["val/top1"]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(resumed["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert [
        e for e, _ in RunSink(f"sqlite:///{tmp_path / 'mlflow.db'}", run.info.run_id).epoch_history("val/top1")
    ] == [1, 2]


def _descendants(root_pid: int) -> list[int]:
    """Pids below `root_pid`, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [root_pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _train_workers() -> list[int]:
    """Ray Train worker processes started under this test process (our own local Ray only)."""
    pids = []
    for pid in _descendants(os.getpid()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "RayTrainWorker" in cmd:
            pids.append(pid)
    return pids


def test_killed_worker_restarts_from_checkpoint_same_mlflow_run(local_ray, prepared, tmp_path):
    from imagenet_ray.train.trainer import run_training

    root, _ = prepared
    # Elastic [1, 2]: the restarted group may come back with either size (Ray 2.60 supports (min, max)).
    cfg = _cfg(root, tmp_path, "name=killed", "train.num_workers=[1,2]", "train.epochs=2", "train.max_failures=1")
    run_dir = Path(tmp_path / "runs" / "killed")
    killed: list[int] = []

    def kill_after_first_checkpoint():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if run_dir.exists() and any(p.name.startswith("checkpoint_") for p in run_dir.iterdir()):
                workers = _train_workers()
                if workers:
                    time.sleep(1.0)  # well into epoch 2
                    os.kill(workers[-1], signal.SIGKILL)
                    killed.append(workers[-1])
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    metrics = run_training(cfg)
    killer.join(timeout=5)
    assert killed, "no training worker was killed"
    assert metrics["epoch"] == 2
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("imagenet-ray-smoke").experiment_id],
        filter_string="tags.`imagenet_ray.run_name` = 'killed'",
    )
    assert len(runs) == 1, "the restart must continue the same MLflow run"
    epochs = [
        e for e, _ in RunSink(f"sqlite:///{tmp_path / 'mlflow.db'}", runs[0].info.run_id).epoch_history("val/top1")
    ]
    assert epochs == [1, 2], f"each epoch logged exactly once, got {epochs}"
    assert runs[0].info.status == "FINISHED"
