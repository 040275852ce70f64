"""End to end on the real services: synth into s3:// → prepare and train through `ray job submit` → MLflow.

The services (SeaweedFS S3 with credentials, mlflow server with S3 artifacts, a Ray head) come from
the session fixture `local_stack`; jobs run on that Ray head exactly as a user would submit them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from mlflow.tracking import MlflowClient

from imagenet_ray.tracking import RunSink

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 60, 10
MODEL_NAME = "smoke-resnet18"


def check_dashboard(stack, client: MlflowClient, experiment_id: str, run) -> None:
    """What the UI reads: step curves through its REST API, the overview charts, pictures, system metrics."""
    import requests

    history = requests.get(
        f"{stack.mlflow_uri}/api/2.0/mlflow/metrics/get-history",
        params={"run_id": run.info.run_id, "metric_key": "train/loss"},
        timeout=30,
    ).json()["metrics"]
    steps = [int(m["step"]) for m in history]
    assert len(steps) >= 4 and steps == sorted(set(steps)), steps
    # The charts a user looks at first: copies under the section the UI sorts first (dashboard.py).
    assert run.data.metrics["0 overview/1 val top1"] == run.data.metrics["val/top1"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"per_class_top1.png", "confused_pairs.png", "augmented_inputs.png", "confused_pairs.json"} <= artifacts
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert any(k.endswith("/cpu_utilization_percentage") for k in system), sorted(system)
    assert "system/ray/object_store_used_mb" in system, sorted(system)


def check_model_life(stack, client: MlflowClient, run, s3, prepared_url: str, job_log: str) -> None:
    """The logged model: registered as champion, loads as a pyfunc that predicts the val set with the
    run's val/top1, and the predict job writes one row per val image."""
    import io

    import mlflow.pyfunc
    import pandas as pd
    import pyarrow.parquet as pq

    from imagenet_ray.lifecycle import promote_if_better, register, resolve_model_reference

    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert champion.tags["imagenet_ray.training_run"] == run.info.run_id
    assert float(champion.tags["val/top1"]) == pytest.approx(run.data.metrics["val/top1"])
    assert "model: models:/m-" in job_log and f"models:/{MODEL_NAME}/{champion.version}" in job_log
    # The same model registered again is not better: the alias stays where it is.
    ref = resolve_model_reference(f"models:/{MODEL_NAME}@champion", stack.mlflow_uri)
    again = register(
        ref.model_uri,
        MODEL_NAME,
        tracking_uri=stack.mlflow_uri,
        run_id=run.info.run_id,
        val_top1=ref.val_top1 or 0.0,
        val_top5=ref.val_top5 or 0.0,
        dataset_digest=ref.dataset_digest,
    )
    decision = promote_if_better(MODEL_NAME, again, tracking_uri=stack.mlflow_uri)
    assert not decision.moved and decision.previous_version == champion.version, decision

    # The val set, as bytes and labels, from the prepared shards.
    bucket, prefix = prepared_url[len("s3://") :].split("/", 1)
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/_manifest.json")["Body"].read())
    rows = []
    for shard in manifest["splits"]["val"]["shards"]:
        body = s3.get_object(Bucket=bucket, Key=f"{prefix}/{shard['path']}")["Body"].read()
        rows += pq.read_table(io.BytesIO(body), columns=["key", "image", "label"]).to_pylist()
    assert len(rows) == CLASSES * VAL_PER_CLASS
    os.environ.setdefault("MLFLOW_TRACKING_URI", stack.mlflow_uri)
    model = mlflow.pyfunc.load_model(ref.model_uri)
    out = model.predict(pd.DataFrame({"image": [r["image"] for r in rows]}))
    hits = sum(int(p) == r["label"] for p, r in zip(out["top1_index"], rows, strict=True))
    # Run's final val/top1 is the champion's here (2 epochs, the last is best or equal): same preset, same count.
    assert abs(hits - round(float(champion.tags["val/top1"]) * len(rows))) <= 1, (hits, champion.tags)

    # Batch inference as a Ray job: one row per val image, top-1 as the pyfunc's.
    out_url = f"s3://checkpoints/predictions-{uuid.uuid4().hex[:6]}"
    predict = _submit(
        stack,
        [
            "jobs/predict.py",
            "--model",
            f"models:/{MODEL_NAME}@champion",
            "--images",
            prepared_url,
            "--out",
            out_url,
            "--mlflow-uri",
            stack.mlflow_uri,
        ],
    )
    assert predict.returncode == 0, predict.stdout[-4000:] + predict.stderr[-3000:]
    assert f"predicted {len(rows)} of {len(rows)} images, 0 broken" in predict.stdout + predict.stderr
    out_bucket, out_prefix = out_url[len("s3://") :].split("/", 1)
    listed = s3.list_objects_v2(Bucket=out_bucket, Prefix=f"{out_prefix}/")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    assert f"{out_prefix}/_SUCCESS" in keys, keys
    predicted = []
    for key in keys:
        if key.endswith(".parquet"):
            body = s3.get_object(Bucket=out_bucket, Key=key)["Body"].read()
            predicted += pq.read_table(io.BytesIO(body), columns=["key", "top5_index"]).to_pylist()
    assert sorted(p["key"] for p in predicted) == sorted(r["key"] for r in rows)  # every image once
    by_key = {r["key"]: r["label"] for r in rows}
    job_hits = sum(p["top5_index"][0] == by_key[p["key"]] for p in predicted)
    assert abs(job_hits - hits) <= 1, (job_hits, hits)


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


def mlflow_outage_after_epoch_1(stack, client: MlflowClient, experiment: str, name: str) -> dict[str, Any]:
    """A thread that stops the MLflow server once run `name` has logged epoch 1 and starts it 20 s later;
    the returned dict gets the times and holds the thread."""
    import threading
    import time

    outage: dict[str, Any] = {}

    def epochs_logged() -> list[int]:
        exp = client.get_experiment_by_name(experiment)
        runs = (
            client.search_runs([exp.experiment_id], filter_string=f"tags.`imagenet_ray.run_name` = '{name}'")
            if exp
            else []
        )
        return [int(m.value) for m in client.get_metric_history(runs[0].info.run_id, "epoch")] if runs else []

    def stop_after_epoch_1() -> None:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and not epochs_logged():
            time.sleep(0.5)
        outage["stopped"] = time.time()  # from the moment it is being stopped
        stack.stop_service("mlflow")
        time.sleep(20)
        stack.start_service("mlflow")
        outage["started"] = time.time()

    outage["thread"] = threading.Thread(target=stop_after_epoch_1, daemon=True)
    outage["thread"].start()
    return outage


def test_prepare_and_train_through_ray_jobs(local_stack, raw_url):
    """Prepare and train as Ray jobs from S3 into MLflow, with MLflow stopped for 20 s mid-run: every epoch
    and step point arrives once, the model is logged and registered, the dashboard and the model's life hold."""
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
    # The node-local shard cache (the Ray head is this machine): epoch 1 copies the shards, epoch 2 reads them.
    shard_cache = Path(tempfile.mkdtemp(prefix="irray-shard-cache-"))
    client = MlflowClient(local_stack.mlflow_uri)
    # MLflow is stopped once epoch 1 is logged and started again 20 s later: the job trains on (rank 0's
    # queue holds its writes) and everything checked below arrives, each epoch once.
    outage = mlflow_outage_after_epoch_1(local_stack, client, "integration", run_name)
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
            f"mlflow.register_model_name={MODEL_NAME}",
            "mlflow.log_model=true",
            "mlflow.system_metrics=true",
            "train.throttle_images_per_s=20",  # per worker: epoch 2 trains ≥ 15 s, into the outage
            f"data.shard_cache_dir={shard_cache}",
        ],
    )
    cached = {p.relative_to(p.parents[1]).as_posix() for p in shard_cache.glob("*/*/*.parquet")}
    shutil.rmtree(shard_cache, ignore_errors=True)
    listed_shards = {sh["path"] for split in ("train", "val") for sh in manifest["splits"][split]["shards"]}
    assert cached == listed_shards, (cached, listed_shards)  # every shard once, under one manifest key
    outage["thread"].join(timeout=120)
    assert {"stopped", "started"} <= set(outage), outage
    assert train.returncode == 0, train.stdout[-5000:] + train.stderr[-3000:]
    assert "final: val/top1=" in train.stdout
    log_text = train.stdout + train.stderr
    for epoch in (1, 2):  # once each in the job's log (Ray Train's print patch would double a print)
        assert log_text.count(f"[epoch {epoch}/2] train/loss=") == 1, log_text[-5000:]
    assert "[epoch 1/2] step " in log_text, log_text[-5000:]  # a progress line during the epoch
    assert "Reporting training result" not in log_text  # Ray Train's per-report dumps are quieted
    assert "exclude_resources" not in log_text  # no deprecation warning from our ingest options
    assert "A new progress UI is available" not in log_text  # Ray Data logs plain progress lines instead
    assert f"checkpoint: s3://checkpoints/runs/{run_name}/checkpoint_" in train.stdout  # a URL to paste

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
    logged = RunSink(local_stack.mlflow_uri, run.info.run_id)
    for key in ("val/top1", "val/top5", "val/images", "train/epoch_loss", "perf/epoch_images_per_s"):
        assert [e for e, _ in logged.epoch_history(key)] == [1, 2], key
    # Step curves: a point every mlflow.log_every_steps optimizer steps, on the global step axis.
    epoch_steps = [m.step for m in client.get_metric_history(run.info.run_id, "epoch")]
    for key in ("train/loss", "train/lr", "perf/images_per_s", "perf/data_wait_frac"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) >= 4 and steps == sorted(set(steps)), (key, steps)
        assert steps[-1] <= epoch_steps[-1] and all(s % 5 == 0 for s in steps), (key, steps, epoch_steps)
    # Training went on while MLflow was away: step-curve points were queued during the outage.
    queued_at = [m.timestamp / 1000 for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert any(outage["stopped"] < t < outage["started"] for t in queued_at), (queued_at, outage)
    top1 = run.data.metrics["val/top1"]
    assert top1 >= 0.3, f"val/top1 {top1} is not well above chance (0.1)"
    assert run.data.metrics["val/top5"] >= top1
    assert run.data.metrics["val/images"] == CLASSES * VAL_PER_CLASS
    # Lineage: the prepared dataset is the run's input for train and val, the same dataset (name, digest)
    # the prepare run logged, and the run names that prepare run.
    (prepare_run,) = client.search_runs(
        [client.get_experiment_by_name("imagenet-ray-datasets").experiment_id],
        filter_string=f"params.out = '{prepared_url}'",
    )
    prepared_input = {(d.dataset.name, d.dataset.digest) for d in prepare_run.inputs.dataset_inputs}
    train_inputs = {
        t.value: d.dataset
        for d in client.get_run(run.info.run_id).inputs.dataset_inputs
        for t in d.tags
        if t.key == "mlflow.data.context"
    }
    assert sorted(train_inputs) == ["train", "val"]
    assert {(train_inputs["train"].name, train_inputs["train"].digest)} == prepared_input
    assert train_inputs["val"].name == f"{prepared_url}#val"
    assert json.loads(train_inputs["val"].profile)["val_images"] == CLASSES * VAL_PER_CLASS
    assert run.data.tags["imagenet_ray.prepare_run"] == prepare_run.info.run_id
    # Reproducibility: versions and the cluster's shape.
    assert run.data.tags["imagenet_ray.versions.torch"].startswith("2.14.1")
    assert run.data.tags["imagenet_ray.train.workers"] == "2"
    assert int(run.data.tags["imagenet_ray.cluster.nodes"]) >= 1
    # The resolved config travels with the run, as an artifact in the S3-backed artifact store.
    assert "config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]

    check_dashboard(local_stack, client, exp.experiment_id, run)
    check_model_life(local_stack, client, run, s3, prepared_url, train.stdout)

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
    # The first S3 request is the output's prepare lock (taken before the source is listed): it is named.
    assert "access denied" in lines[0] and "s3://imagenet/never" in lines[0]
    assert "not-the-secret" not in done.stderr + done.stdout


def test_missing_source_prefix_is_named(local_stack, stack_env):
    done = _cli(
        ["prepare", "--source", "s3://imagenet/no-such-prefix", "--out", "s3://imagenet/never"], stack_env, timeout=120
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "s3://imagenet/no-such-prefix" in lines[0] and "nothing found" in lines[0], done.stderr
