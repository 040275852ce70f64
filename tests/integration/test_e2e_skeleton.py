"""End to end on the real services: synth into s3:// → prepare and train through `ray job submit` → MLflow.

The services (SeaweedFS S3 with credentials, mlflow server with S3 artifacts, a Ray head) come from
the session fixture `local_stack`; jobs run on that Ray head exactly as a user would submit them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 60, 10


def _cli(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "imagenet_ray", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _submit(stack, entrypoint_args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """`ray job submit` from the repo, as in the README, waiting for the job to finish."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    cmd = [
        ray_cli,
        "job",
        "submit",
        "--address",
        stack.dashboard_url,
        "--working-dir",
        str(REPO),
        "--",
        "python",
        *entrypoint_args,
    ]
    env = {**os.environ, **stack.env()}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def stack_env(local_stack):
    return {**os.environ, **local_stack.env()}


@pytest.fixture(scope="module")
def raw_url(local_stack, stack_env):
    url = f"s3://imagenet/raw-{uuid.uuid4().hex[:8]}"
    done = _cli(
        [
            "synth",
            "--out",
            url,
            "--classes",
            str(CLASSES),
            "--train-per-class",
            str(TRAIN_PER_CLASS),
            "--val-per-class",
            str(VAL_PER_CLASS),
            "--seed",
            "7",
        ],
        stack_env,
    )
    assert done.returncode == 0, done.stderr
    return url


def test_prepare_and_train_through_ray_jobs(local_stack, raw_url):
    prepared_url = raw_url.replace("raw-", "prepared-")
    prep = _submit(local_stack, ["jobs/prepare.py", "--source", raw_url, "--out", prepared_url, "--shard-mb", "8"])
    assert prep.returncode == 0, prep.stdout[-3000:] + prep.stderr[-3000:]

    s3 = boto3.client(
        "s3",
        endpoint_url=local_stack.s3_endpoint,
        aws_access_key_id=local_stack.access_key,
        aws_secret_access_key=local_stack.secret_key,
        region_name=local_stack.region,
    )
    bucket, prefix = prepared_url[len("s3://") :].split("/", 1)
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/_manifest.json")["Body"].read())
    assert manifest["splits"]["train"]["num_images"] == CLASSES * TRAIN_PER_CLASS
    assert manifest["splits"]["val"]["num_images"] == CLASSES * VAL_PER_CLASS

    run_name = f"smoke-{uuid.uuid4().hex[:8]}"
    train = _submit(
        local_stack,
        [
            "jobs/train.py",
            "--config",
            "configs/smoke.yaml",
            f"name={run_name}",
            f"data.url={prepared_url}",
            "train.storage_path=s3://checkpoints/runs",
            f"mlflow.tracking_uri={local_stack.mlflow_uri}",
            "mlflow.experiment=integration",
        ],
    )
    assert train.returncode == 0, train.stdout[-5000:] + train.stderr[-3000:]
    assert "final: val/top1=" in train.stdout
    assert f"checkpoint: s3://checkpoints/runs/{run_name}/checkpoint_" in train.stdout  # a URL to paste

    client = MlflowClient(local_stack.mlflow_uri)
    exp = client.get_experiment_by_name("integration")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's model-training view
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`imagenet_ray.run_name` = '{run_name}'")
    assert len(runs) == 1, "exactly one MLflow run per training run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "2"
    # The job ran from an uploaded copy of the sources (`--working-dir`), which leaves built files out:
    # the compiled crop decoder must still be found (it is a top-level module for that reason).
    assert run.data.tags["imagenet_ray.crop_decoder"].endswith("(crop decode)"), run.data.tags
    for key in ("val/top1", "val/top5", "val/images", "train/loss", "perf/images_per_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    top1 = run.data.metrics["val/top1"]
    assert top1 >= 0.3, f"val/top1 {top1} is not well above chance (0.1)"
    assert run.data.metrics["val/top5"] >= top1
    assert run.data.metrics["val/images"] == CLASSES * VAL_PER_CLASS
    # The resolved config travels with the run, as an artifact in the S3-backed artifact store.
    assert "config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]

    listed = s3.list_objects_v2(Bucket="checkpoints", Prefix=f"runs/{run_name}/")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    checkpoint_states = [k for k in keys if k.endswith("/state.pt") and "/checkpoint_" in k]
    assert len(checkpoint_states) == 2, keys  # one per epoch, both kept (checkpoints_to_keep=2)


def test_wrong_credentials_give_one_clear_line(local_stack, stack_env, raw_url):
    env = {**stack_env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    done = _cli(["prepare", "--source", raw_url, "--out", "s3://imagenet/never"], env, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "access denied" in lines[0] and raw_url in lines[0]
    assert "not-the-secret" not in done.stderr + done.stdout


def test_missing_source_prefix_is_named(local_stack, stack_env):
    done = _cli(
        ["prepare", "--source", "s3://imagenet/no-such-prefix", "--out", "s3://imagenet/never"], stack_env, timeout=120
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "s3://imagenet/no-such-prefix" in lines[0] and "nothing found" in lines[0], done.stderr
