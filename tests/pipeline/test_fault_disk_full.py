"""The checkpoint volume filling up, on a local Ray: `train.storage_path` on a tmpfs that holds one checkpoint
but not the next. The run stops at once with one line naming the storage and "no space left" (retries
unspent), the checkpoint before is intact, the MLflow run FAILED; once the volume has grown, a resubmission
with the same name continues the same run from that checkpoint. Figures: docs/reliability.md."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from imagenet_ray.config import ExperimentConfig, load_config, to_yaml
from imagenet_ray.train.checkpoint import read_checkpoint_url, write_checkpoint_dir
from imagenet_ray.train.models import build_model
from imagenet_ray.train.optim import build_sgd

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NAME = "diskfull"
PAGE = 4096


def _cfg(data: Path, storage: Path, tracking: str, *overrides: str) -> ExperimentConfig:
    return load_config(
        "configs/smoke.yaml",
        [
            f"data.url={data}",
            f"train.storage_path={storage}",
            f"mlflow.tracking_uri={tracking}",
            f"name={NAME}",
            "train.epochs=2",
            "train.max_failures=2",  # would be spent on a disk that is still full
            "data.batch_size=4",
            "eval.batch_size=8",
            "data.train_crop=32",
            "eval.resize=40",
            "eval.crop=32",
            "data.local_shuffle_buffer=8",
            *overrides,
        ],
    )


def measured_checkpoint_bytes(cfg: ExperimentConfig, num_classes: int) -> int:
    """The size of one checkpoint of this config, written by the project's own writer: the model and an SGD
    optimizer after one step (its momentum buffers exist from then on)."""
    model = build_model(cfg.model.name, num_classes, cfg.model.zero_init_residual, cfg.model.blurpool)
    o = cfg.optim
    optimizer = build_sgd(model, o.lr, o.momentum, o.weight_decay, o.nesterov, o.no_decay_norm_and_bias)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint_dir(
            tmp,
            model=model,
            optimizer=optimizer,
            epoch=1,
            step=10,
            mlflow_run_id="0" * 32,
            config_yaml=to_yaml(cfg),
            metrics={f"metric/{i}": 0.0 for i in range(40)},
        )
        return sum(p.stat().st_size for p in Path(tmp).iterdir())


@contextlib.contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of `size_bytes` at `path`, unmounted afterwards whatever happened (we run as root)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes // 1024}k", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        for _ in range(20):  # a worker that has just exited may still hold a file open for a moment
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.5)
        else:
            subprocess.run(["umount", "-l", str(path)], check=False)


def grow(path: Path, size_bytes: int) -> None:
    """Give the volume more room, its files kept (as a PVC expansion would)."""
    subprocess.run(["mount", "-o", f"remount,size={size_bytes // 1024}k", str(path)], check=True)


class Watch:
    """In a thread: when the volume first has no room left."""

    def __init__(self, volume: Path) -> None:
        self.volume, self.full_at = volume, None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.1):
            if self.full_at is None and os.statvfs(self.volume).f_bavail == 0:
                self.full_at = time.time()

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)


def train_worker_logs(since: float) -> list[str]:
    """The stdout of each Ray Train worker actor of this process's Ray written to since `since`: one per rank
    of every worker group started (the runner's "restored from" / "not retrying" lines are in them)."""
    import ray._private.worker as ray_worker

    logs = Path(ray_worker._global_node.get_logs_dir_path())
    texts = [p.read_text(errors="replace") for p in logs.glob("worker-*.out") if p.stat().st_mtime >= since]
    return [t for t in texts if ":actor_name:RayTrainWorker" in t]


def checkpoints(run_dir: Path) -> dict[str, int | None]:
    """Each checkpoint directory → the epoch its state loads as, None when it does not load (cut short)."""
    found: dict[str, int | None] = {}
    for d in sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir()):
        try:
            found[d.name] = int(read_checkpoint_url(str(d))["epoch"])
        except Exception:
            found[d.name] = None
    return found


def test_a_full_checkpoint_disk_stops_the_run_at_once_and_a_resubmission_continues(
    local_ray, prepared, tmp_path, fault_figures
):
    from imagenet_ray.train.trainer import run_training

    data, manifest = prepared
    num_val = manifest["splits"]["val"]["num_images"]
    volume = tmp_path / "volume"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _cfg(data, volume / "runs", tracking)
    one = measured_checkpoint_bytes(cfg, len(manifest["classes"]))
    # Room for one checkpoint and half of the next (Ray removes none before the next is written).
    size = math.ceil(1.5 * one / PAGE) * PAGE + 64 * 1024
    figures: dict[str, object] = {"checkpoint_bytes": one, "volume_bytes": size, "max_failures": 2}
    run_dir = volume / "runs" / NAME
    client = MlflowClient(tracking)
    with tmpfs(volume, size):
        watch = Watch(volume)
        t0 = time.time()
        try:
            with pytest.raises(Exception) as failed:
                run_training(cfg)
            t_error = time.time()
        finally:
            watch.stop()
        message = str(failed.value)
        groups = train_worker_logs(t0)
        kept = checkpoints(run_dir)
        (run,) = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
        figures.update(
            first_run_s=round(t_error - t0, 1),
            s_from_disk_full_to_error=round(t_error - watch.full_at, 1) if watch.full_at else None,
            worker_groups_started=len(groups) / cfg.train.max_workers,
            groups_that_retrained=sum("restored from the checkpoint" in t for t in groups) / cfg.train.max_workers,
            groups_that_ended_at_once=sum("not retrying" in t for t in groups) / cfg.train.max_workers,
            checkpoint_dirs=kept,
            mlflow_status_after_error=run.info.status,
            error=message[:400],
        )
        fault_figures.record("the checkpoint disk full", **figures)
        assert type(failed.value).__name__ == "UserError", message[-2000:]
        assert "\n" not in message and "no space left" in message.lower(), message
        assert str(run_dir) in message, message
        # The epoch-1 checkpoint is intact; the one cut short by the full disk is the only other (no retry
        # wrote another), and nothing was retrained: the one restart Ray Train makes ended before training.
        assert sorted(e for e in kept.values() if e is not None) == [1], kept
        assert list(kept.values()).count(None) == 1, kept
        assert figures["groups_that_retrained"] == 0 and figures["groups_that_ended_at_once"] <= 1, figures
        assert run.info.status == "FAILED"
        assert [int(m.value) for m in client.get_metric_history(run.info.run_id, "epoch")] == [1]

        grow(volume, 4 * size)
        t1 = time.time()
        done = run_training(cfg)
        resumed = [t for t in train_worker_logs(t1) if "restored from the checkpoint of epoch 1" in t]
        figures2 = {"resubmission_s": round(time.time() - t1, 1), "ranks_restored_from_epoch_1": len(resumed)}
        fault_figures.record("the checkpoint disk full: resubmitted after growing the volume", **figures2)
        assert done["epoch"] == 2 and done["mlflow_run_id"] == run.info.run_id
        assert len(resumed) == cfg.train.max_workers, "every rank continues from the epoch-1 checkpoint"
        assert int(read_checkpoint_url(done["checkpoint_url"])["epoch"]) == 2
    runs = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [run.info.run_id], "the resubmission continues the same MLflow run"
    assert runs[0].info.status == "FINISHED"
    assert [int(m.value) for m in client.get_metric_history(run.info.run_id, "epoch")] == [1, 2]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val/images")] == [num_val, num_val]
