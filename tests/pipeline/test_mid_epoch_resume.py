"""A preemption mid-epoch costs minutes, not the epoch: a job time-boxed after epoch 1, resubmitted, and
a worker SIGKILLed after a mid-epoch checkpoint of epoch 2 resumes inside the epoch, trains every sample
of it once (audited per sample), ends with an uninterrupted run's weights (deterministic mode), and the
same MLflow run continues."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from imagenet_ray.config import load_config
from imagenet_ray.tracking import RunSink
from imagenet_ray.train.checkpoint import read_checkpoint_dir
from imagenet_ray.train.sample_audit import AUDIT_ENV, read_audit
from ray_processes import train_workers

pytestmark = [pytest.mark.ray, pytest.mark.slow]

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


def _cfg(root, tmp_path, *overrides):
    return load_config(
        "configs/smoke.yaml",
        [
            f"data.url={root}",
            f"train.storage_path={tmp_path / 'runs'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            *COMMON,
            *overrides,
        ],
    )


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


def test_killed_after_a_mid_epoch_checkpoint_resumes_inside_the_epoch_exactly(
    local_ray, prepared, tmp_path, monkeypatch, fault_figures
):
    from imagenet_ray.train.trainer import run_training

    root, manifest = prepared
    num_train = manifest["splits"]["train"]["num_images"]
    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit-straight"))
    straight = run_training(_cfg(root, tmp_path, "name=straight"))

    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit-killed"))
    run_dir = tmp_path / "runs" / "killed"
    killed: dict = {}

    def kill_after_a_mid_epoch_checkpoint_in_epoch_2():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            mid = _registered_mid_epoch(run_dir, epoch=1)
            workers = train_workers()
            if mid is not None and workers:
                os.kill(workers[-1], signal.SIGKILL)
                killed.update(at=time.monotonic(), images=mid["train/mid_epoch_images"], pid=workers[-1])
                return
            time.sleep(0.1)

    # Job 1 stops after epoch 1 (a time box); job 2, resubmitted, resumes at the epoch boundary, and a
    # worker is killed once a mid-epoch checkpoint of epoch 2 is registered.
    first = run_training(_cfg(root, tmp_path, "name=killed", "train.stop_after_epochs=1"))
    assert first["epoch"] == 1
    killer = threading.Thread(target=kill_after_a_mid_epoch_checkpoint_in_epoch_2, daemon=True)
    killer.start()
    t0 = time.monotonic()
    resumed = run_training(
        _cfg(
            root,
            tmp_path,
            "name=killed",
            "train.max_failures=1",
            "train.checkpoint_every_minutes=0.02",  # 1.2 s of training
            "train.throttle_images_per_s=3",  # per worker: 0.67 s a step, 6 s an epoch
        )
    )
    wall_s = time.monotonic() - t0
    killer.join(timeout=5)
    assert killed, "no worker was killed after a mid-epoch checkpoint"
    assert resumed["epoch"] == 2 and resumed["mlflow_run_id"] == first["mlflow_run_id"]

    # Per sample: the killed attempt's batches up to the checkpoint plus the resumed attempt's are, on
    # every rank, the uninterrupted run's batches in the same order; every training image once.
    reference = _per_rank(read_audit(tmp_path / "audit-straight"), epoch=1)
    rows = read_audit(tmp_path / "audit-killed")
    epoch_2 = _per_rank(rows, epoch=1)
    starts = {name: min(b for b, _ in batches) for name, batches in epoch_2.items()}
    first_attempt = {name for name, start in starts.items() if start == 0}  # job 2 before the kill
    resumed_files = sorted(set(epoch_2) - first_attempt)
    assert len(resumed_files) == 2 and len(reference) == 2, (sorted(epoch_2), sorted(reference))
    resumed_at = {min(b for b, _ in epoch_2[f]) for f in resumed_files}
    assert len(resumed_at) == 1, resumed_at
    (skip,) = resumed_at
    assert skip * 2 * 2 >= killed["images"] > 0, (skip, killed)  # 2 ranks, batches of 2
    combined = []
    for rank in (0, 1):
        before = next(f for f in first_attempt if f.startswith(f"rank{rank}-"))
        after = next(f for f in resumed_files if f.startswith(f"rank{rank}-"))
        seen = [r for r in epoch_2.get(before, []) if r[0] < skip] + epoch_2[after]
        ref = next(v for f, v in reference.items() if f.startswith(f"rank{rank}-"))
        assert seen == ref, f"rank {rank}: resumed epoch differs from the uninterrupted one"
        combined += [d for _, d in seen]
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

    # One MLflow run, each epoch once, no step-curve point twice.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.get_run(resumed["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert [e for e, _ in RunSink(uri, run.info.run_id).epoch_history("val/top1")] == [1, 2]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == sorted(set(steps)), steps
    assert client.get_metric_history(run.info.run_id, "perf/checkpoint_s"), "mid-epoch checkpoints are timed"
    batches_per_rank = -(-num_train // 2 // 2)
    fault_figures.record(
        "a train worker SIGKILLed after a mid-epoch checkpoint",
        resumed_at_batch=f"{skip}/{batches_per_rank}",
        images_in_the_checkpoint=int(killed["images"]),
        batches_trained_again_per_rank=max(len({b for b, _ in epoch_2[f] if b >= skip}) for f in first_attempt),
        resubmitted_job_s=round(wall_s),
        weights_equal_uninterrupted=True,
    )
