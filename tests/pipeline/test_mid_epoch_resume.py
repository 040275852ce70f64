"""A preemption mid-epoch costs minutes, not the epoch. The driver SIGKILLed (its pod lost) after a mid-epoch
checkpoint of epoch 2 and the job resubmitted, then a worker SIGKILLed after a later one: each resumes inside
the epoch, every sample of it is trained once (audited per sample), the weights are an uninterrupted run's
(deterministic mode), and the same MLflow run continues, each epoch logged once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from imagenet_ray.config import load_config
from imagenet_ray.runtime import LOOPBACK_ENV
from imagenet_ray.tracking import RUN_NAME_TAG, RunSink
from imagenet_ray.train.checkpoint import read_checkpoint_dir
from imagenet_ray.train.sample_audit import AUDIT_ENV, read_audit
from ray_processes import train_workers

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]

COMMON = (
    "data.deterministic=true",
    "data.decode_on=gpu",
    "train.num_workers=2",
    "train.epochs=2",
    "seed=5",
    "data.batch_size=2",  # 9 batches per rank per epoch: room for checkpoints inside one
    "data.train_crop=32",
    "eval.resize=40",
    "eval.crop=32",
    "eval.batch_size=8",
    "data.local_shuffle_buffer=8",
    "mlflow.log_every_steps=1",
    # Small (10 MB checkpoints, a fast all-reduce on 2 cores), with batch norm (DDP broadcasts its buffers)
    # and dropout (each rank's torch RNG must continue where it was).
    "model.name=mobilenet_v3_small",
)


def _overrides(root, tmp_path, *extra) -> list[str]:
    return [
        f"data.url={root}",
        f"train.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        *COMMON,
        *extra,
    ]


def _cfg(root, tmp_path, *extra):
    return load_config("configs/smoke.yaml", _overrides(root, tmp_path, *extra))


def _registered_mid_epoch(run_dir: Path, epoch: int) -> dict | None:
    """The metrics of the latest checkpoint Ray Train's controller registered, if it is a mid-epoch one of
    0-based `epoch` (a checkpoint counts once the controller collected it, within its 2 s poll)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return None
    metrics = (snapshot.get("latest_checkpoint_result") or {}).get("metrics", {})
    if "train/mid_epoch_images" in metrics and metrics["epoch"] == epoch:
        return metrics
    return None


def _per_rank(rows, epoch):
    """{rank file: [(batch, digest)]} for `epoch`."""
    out: dict[str, list[tuple[int, str]]] = {}
    for name, e, batch, digest in rows:
        if e == epoch:
            out.setdefault(name, []).append((batch, digest))
    return out


def _stitched(attempts: list[list[tuple[int, str]]]) -> tuple[list[int], list[tuple[int, str]]]:
    """One rank's attempts at an epoch, ordered by the batch each started at: every attempt's batches up to
    the next one's start (a killed attempt may have trained more that its successor trained again)."""
    attempts = sorted(attempts, key=lambda a: min(b for b, _ in a))
    starts = [min(b for b, _ in a) for a in attempts]
    seen = []
    for attempt, end in zip(attempts, [*starts[1:], None], strict=True):
        seen += [r for r in attempt if end is None or r[0] < end]
    return starts, seen


def _wait_and_kill(run_dir: Path, after_images: int, pids, deadline_s: float = 300) -> dict:
    """SIGKILL `pids()`'s processes once Ray Train registered a mid-epoch checkpoint of epoch 2 holding more
    than `after_images`; what was killed, when, and that checkpoint's image count."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        mid = _registered_mid_epoch(run_dir, epoch=1)
        victims = pids()
        if mid is not None and mid["train/mid_epoch_images"] > after_images and victims:
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            return {"at": time.monotonic(), "images": int(mid["train/mid_epoch_images"]), "pids": victims}
        time.sleep(0.1)
    return {}


def test_driver_then_worker_killed_after_mid_epoch_checkpoints_resume_inside_the_epoch_exactly(
    local_ray, prepared, tmp_path, monkeypatch, fault_figures
):
    from imagenet_ray.train.trainer import run_training

    root, manifest = prepared
    num_train = manifest["splits"]["train"]["num_images"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit-straight"))
    straight = run_training(_cfg(root, tmp_path, "name=straight"))

    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit-killed"))
    run_dir = tmp_path / "runs" / "killed"
    mid_epoch = ("train.checkpoint_every_minutes=0.02", "train.max_failures=1")  # 1.2 s of training

    # Job 1: a CLI driver on this Ray (as `ray job submit` runs one on the head), SIGKILLed with its whole
    # process group once a mid-epoch checkpoint of epoch 2 is registered; Ray ends its workers with it.
    cmd = [sys.executable, "-m", "imagenet_ray", "train", "--config", "configs/smoke.yaml"]
    cmd += _overrides(root, tmp_path, "name=killed", *mid_epoch, "train.throttle_images_per_s=2")  # 1 s a step
    # Our Ray listens on loopback only: the driver connects there, with the same switch (runtime.py).
    port = ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]
    env = {**os.environ, **LOOPBACK_ENV, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    with open(tmp_path / "driver.log", "wb") as log:
        driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        driver_killed = _wait_and_kill(run_dir, 0, lambda: _alive(driver, tmp_path))
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    assert driver_killed, "the driver ended before a mid-epoch checkpoint of epoch 2: " + _tail(tmp_path)
    experiment_id = client.get_experiment_by_name("imagenet-ray-smoke").experiment_id
    (killed_run,) = client.search_runs([experiment_id], f"tags.`{RUN_NAME_TAG}` = 'killed'")
    assert killed_run.info.status == "RUNNING"  # nobody could end it
    assert [e for e, _ in RunSink(uri, killed_run.info.run_id).epoch_history("val/top1")] == [1]
    while train_workers():  # Ray ends the dead driver's workers (its job's actors)
        assert time.monotonic() - driver_killed["at"] < 60, "the dead driver's workers live on"
        time.sleep(0.2)

    # Job 2, resubmitted: resumes at that checkpoint; a worker is killed after a later one.
    worker_killed: dict = {}

    def kill_a_worker():
        worker_killed.update(_wait_and_kill(run_dir, driver_killed["images"], lambda: train_workers()[-1:]))

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    t0 = time.monotonic()
    resumed = run_training(_cfg(root, tmp_path, "name=killed", *mid_epoch, "train.throttle_images_per_s=3"))
    wall_s = time.monotonic() - t0
    killer.join(timeout=5)
    assert worker_killed, "no worker was killed after a second mid-epoch checkpoint"
    assert resumed["epoch"] == 2 and resumed["mlflow_run_id"] == killed_run.info.run_id

    # Per sample: on every rank, the three attempts at epoch 2, each cut where the next one resumed, are the
    # uninterrupted run's batches in the same order; every training image once.
    reference = _per_rank(read_audit(tmp_path / "audit-straight"), epoch=1)
    epoch_2 = _per_rank(read_audit(tmp_path / "audit-killed"), epoch=1)
    assert len(reference) == 2 and len(epoch_2) == 6, (sorted(reference), sorted(epoch_2))
    combined, starts_per_rank = [], []
    for rank in (0, 1):
        starts, seen = _stitched([v for f, v in epoch_2.items() if f.startswith(f"rank{rank}-")])
        ref = next(v for f, v in reference.items() if f.startswith(f"rank{rank}-"))
        assert seen == ref, f"rank {rank}: resumed epoch differs from the uninterrupted one"
        combined += [d for _, d in seen]
        starts_per_rank.append(starts)
    assert starts_per_rank[0] == starts_per_rank[1], starts_per_rank
    _, after_driver, after_worker = starts_per_rank[0]
    assert 0 < after_driver < after_worker, starts_per_rank
    assert after_driver * 2 * 2 >= driver_killed["images"] > 0  # 2 ranks, batches of 2
    assert after_worker * 2 * 2 >= worker_killed["images"] > driver_killed["images"]
    counts = Counter(combined)
    assert len(counts) == num_train and set(counts.values()) == {1}

    # The same weights as the uninterrupted run: data order, augmentation RNGs and EMA all continued.
    a = read_checkpoint_dir(straight["checkpoint_path"])
    b = read_checkpoint_dir(resumed["checkpoint_path"])
    assert a["step"] == b["step"]
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), atol=1e-5, rtol=1e-4), key
    assert straight["val/top1"] == resumed["val/top1"]
    assert resumed["train/images"] == num_train
    assert resumed["train/epoch_loss"] == pytest.approx(straight["train/epoch_loss"], rel=1e-5)

    # One MLflow run, FINISHED, each epoch once, no step-curve point twice.
    run = client.get_run(resumed["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert [e for e, _ in RunSink(uri, run.info.run_id).epoch_history("val/top1")] == [1, 2]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == sorted(set(steps)), steps
    assert client.get_metric_history(run.info.run_id, "perf/checkpoint_s"), "mid-epoch checkpoints are timed"
    batches_per_rank = -(-num_train // 2 // 2)
    fault_figures.record(
        "the driver SIGKILLed after a mid-epoch checkpoint, the job resubmitted",
        resumed_at_batch=f"{after_driver}/{batches_per_rank}",
        images_in_the_checkpoint=driver_killed["images"],
        run_status_until_resubmitted="RUNNING",
        weights_equal_uninterrupted=True,
    )
    fault_figures.record(
        "a train worker SIGKILLed after a mid-epoch checkpoint",
        resumed_at_batch=f"{after_worker}/{batches_per_rank}",
        images_in_the_checkpoint=worker_killed["images"],
        resubmitted_job_s=round(wall_s),
        weights_equal_uninterrupted=True,
    )


def _alive(driver: subprocess.Popen, tmp_path: Path) -> list[int]:
    assert driver.poll() is None, f"the driver ended (code {driver.returncode}) before it was killed: " + _tail(
        tmp_path
    )
    return [driver.pid]


def _tail(tmp_path: Path) -> str:
    return (tmp_path / "driver.log").read_text(errors="replace")[-3000:]
