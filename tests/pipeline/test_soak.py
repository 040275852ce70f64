"""Soak: many short epochs with train workers SIGKILLed at random times (seeded), elastic [1, 2], with
mid-epoch checkpoints in the default (approximate) mode; bounded in time, it must end as one consistent
run: every epoch logged once with every val image and the epoch's training count, FINISHED."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter

import pytest
from mlflow.tracking import MlflowClient

from imagenet_ray.config import load_config
from imagenet_ray.tracking import RunSink
from imagenet_ray.train.checkpoint import read_checkpoint_dir
from imagenet_ray.train.sample_audit import AUDIT_ENV, read_audit
from ray_processes import train_workers

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EPOCHS, KILLS, SOAK_S = 6, 3, 420  # the kills come within the first half of the run; SOAK_S bounds it


def test_soak_random_worker_kills_end_in_one_consistent_run(local_ray, prepared, tmp_path, monkeypatch, fault_figures):
    from imagenet_ray.train.trainer import run_training

    root, manifest = prepared
    num_train, num_val = manifest["splits"]["train"]["num_images"], manifest["splits"]["val"]["num_images"]
    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        "configs/smoke.yaml",
        [
            f"data.url={root}",
            f"train.storage_path={tmp_path / 'runs'}",
            f"mlflow.tracking_uri={uri}",
            "name=soak",
            f"train.epochs={EPOCHS}",
            "train.num_workers=[1,2]",  # a restart may come back with either size
            f"train.max_failures={KILLS + 2}",
            "train.checkpoint_every_minutes=0.03",  # ~2 s of training
            "train.throttle_images_per_s=8",  # per worker: ~2-4 s an epoch
            "data.decode_on=gpu",  # JPEG bytes reach the worker: the audit names each sample
            "data.batch_size=4",
            "data.train_crop=32",
            "eval.resize=40",
            "eval.crop=32",
            "eval.batch_size=8",
            "data.local_shuffle_buffer=8",
            "mlflow.log_every_steps=1",
        ],
    )
    rng = random.Random(13)
    kills: list[float] = []
    done = threading.Event()

    def training_pids() -> list[int]:
        """Workers that audited a batch in the last 2 s: a group past its start-up, training."""
        now, pids = time.time(), []
        for path in (tmp_path / "audit").glob("rank*-pid*.tsv"):
            pid = int(path.stem.split("-pid")[1])
            if now - path.stat().st_mtime < 2.0 and pid in train_workers():
                pids.append(pid)
        return sorted(pids)

    def kill_at_random() -> None:
        # Each kill lands at a random moment of training (a step, validation, a checkpoint), once the
        # group restarted after the one before has trained a batch.
        while len(kills) < KILLS and not done.is_set():
            while not training_pids() and not done.wait(0.2):
                pass
            if done.wait(rng.uniform(0.5, 6.0)):
                return
            pids = training_pids()
            if pids:
                victim = rng.choice(pids)
                os.kill(victim, signal.SIGKILL)
                kills.append(time.monotonic())
                while victim in train_workers() and not done.wait(0.2):
                    pass

    killer = threading.Thread(target=kill_at_random, daemon=True)
    t0 = time.monotonic()
    killer.start()
    try:
        result = run_training(cfg)
    finally:
        done.set()
        killer.join(timeout=5)
    wall_s = time.monotonic() - t0
    assert wall_s < SOAK_S, f"the soak took {wall_s:.0f} s"
    assert len(kills) >= 2, f"only {len(kills)} kills landed during the run"
    assert result["epoch"] == EPOCHS

    client = MlflowClient(uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("imagenet-ray-smoke").experiment_id],
        filter_string="tags.`imagenet_ray.run_name` = 'soak'",
    )
    assert run.info.status == "FINISHED"
    sink = RunSink(uri, run.info.run_id)
    assert [e for e, _ in sink.epoch_history("val/top1")] == list(range(1, EPOCHS + 1))
    assert [v for _, v in sink.epoch_history("val/images")] == [num_val] * EPOCHS
    # Each epoch trained its count once (36 divides among 1 or 2 workers), whichever attempts it took.
    assert [v for _, v in sink.epoch_history("train/images")] == [num_train] * EPOCHS
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == sorted(set(steps)), steps
    assert read_checkpoint_dir(result["checkpoint_path"])["epoch"] == EPOCHS

    audited = Counter(e for _, e, _, _ in read_audit(tmp_path / "audit"))
    trained_twice = sum(audited.values()) - num_train * EPOCHS  # by attempts that were lost
    fault_figures.record(
        "soak: random train-worker kills",
        epochs=EPOCHS,
        kills=len(kills),
        job_s=round(wall_s),
        images_trained_again=trained_twice,
        images_per_epoch=num_train,
    )
