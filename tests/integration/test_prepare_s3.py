"""prepare against the real S3 server: the original tarballs read by byte ranges from s3://, verify,
and the report + manifest logged to the MLflow server as a dataset."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
import layout_fixtures as lf

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_tarballs_on_s3_prepare_verify_and_mlflow_dataset(local_stack, tmp_path, monkeypatch):
    from imagenet_ray import storage

    env = {**os.environ, **local_stack.env()}
    for key, value in local_stack.env().items():
        monkeypatch.setenv(key, value)
    local = lf.write_tars(tmp_path / "tars", lf.mini_imagenet())
    prefix = f"s3://imagenet/tars-{uuid.uuid4().hex[:8]}"
    for path in Path(local).rglob("*"):
        if path.is_file():
            storage.write_bytes_atomic(
                storage.resolve(f"{prefix}/{path.relative_to(local).as_posix()}"), path.read_bytes()
            )
    out = f"{prefix}-prepared"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "imagenet_ray",
            "prepare",
            "--source",
            prefix,
            "--out",
            out,
            "--shard-mb",
            "0.01",
            "--mlflow-uri",
            local_stack.mlflow_uri,
        ],
        env={**env, "RAY_ADDRESS": ""},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tars layout" in done.stdout
    checked = subprocess.run(
        [sys.executable, "-m", "imagenet_ray", "verify", out],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0 and "match the manifest" in checked.stdout, checked.stderr

    client = MlflowClient(local_stack.mlflow_uri)
    exp = client.get_experiment_by_name("imagenet-ray-datasets")
    runs = client.search_runs([exp.experiment_id], filter_string=f"params.out = '{out}'")
    assert len(runs) == 1
    inputs = runs[0].inputs.dataset_inputs
    assert inputs and inputs[0].dataset.name == out
    assert runs[0].data.metrics["train/written"] == 13 and runs[0].data.metrics["train/quarantined"] == 0
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} >= {"_report.json", "_manifest.json"}
