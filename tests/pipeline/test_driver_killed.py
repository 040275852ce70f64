"""The driver SIGKILLed mid-run (its pod lost) and the job resubmitted: the same MLflow run continues from
the latest checkpoint, every epoch logged once, the run FINISHED."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from imagenet_ray.tracking import RunSink

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def test_driver_killed_mid_run_and_resubmitted_continues_the_same_run(prepared, tmp_path):
    root, _ = prepared
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "imagenet_ray", "train", "--config", "configs/smoke.yaml"]
    cmd += [f"data.url={root}", f"train.storage_path={tmp_path / 'runs'}", f"mlflow.tracking_uri={db}"]
    cmd += ["name=driver-kill", "train.epochs=2", "train.num_workers=1", "data.batch_size=4", "eval.batch_size=8"]
    cmd += ["data.train_crop=32", "eval.resize=40", "eval.crop=32", "train.throttle_images_per_s=4"]
    env = {**os.environ, "RAY_ADDRESS": ""}  # the driver's own local Ray, killed with it
    driver = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    run_dir = tmp_path / "runs" / "driver-kill"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:
        if run_dir.exists() and any(p.name.startswith("checkpoint_") for p in run_dir.iterdir()):
            break
        time.sleep(0.2)
    assert driver.poll() is None, "the driver ended before epoch 1's checkpoint"
    time.sleep(2.0)  # into epoch 2 (36 images at 4 img/s: 9 s)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and every process of its group: a lost pod
    driver.wait(timeout=30)
    client = MlflowClient(db)
    (killed_run,) = client.search_runs([client.get_experiment_by_name("imagenet-ray-smoke").experiment_id])
    assert killed_run.info.status == "RUNNING"  # nobody could end it
    logged = RunSink(db, killed_run.info.run_id)
    assert [e for e, _ in logged.epoch_history("val/top1")] == [1], "killed too late: epoch 2 was done"

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resuming MLflow run {killed_run.info.run_id}" in again.stdout + again.stderr
    (run,) = client.search_runs([client.get_experiment_by_name("imagenet-ray-smoke").experiment_id])
    assert run.info.run_id == killed_run.info.run_id and run.info.status == "FINISHED"
    assert [e for e, _ in logged.epoch_history("val/top1")] == [1, 2]  # each epoch once
    assert "restored from the checkpoint of epoch 1" in again.stdout + again.stderr
