"""The local services themselves, against the real servers of the session's `local_stack`."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from imagenet_ray import storage
from imagenet_ray.services import process

pytestmark = pytest.mark.integration

RAY_CLI = str(Path(sys.executable).with_name("ray"))


def _client(stack, access_key=None, secret_key=None, unsigned=False):
    cfg = Config(
        retries={"max_attempts": 1},
        s3={"addressing_style": "path"},
        **({"signature_version": UNSIGNED} if unsigned else {}),
    )
    kwargs = (
        {}
        if unsigned
        else {
            "aws_access_key_id": access_key or stack.access_key,
            "aws_secret_access_key": secret_key or stack.secret_key,
        }
    )
    return boto3.client("s3", endpoint_url=stack.s3_endpoint, region_name=stack.region, config=cfg, **kwargs)


def _refused(call) -> str:
    with pytest.raises(ClientError) as info:
        call()
    err = info.value.response["Error"]
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403, err
    return err["Code"]


def test_s3_refuses_anonymous_and_wrong_credentials(local_stack):
    good = _client(local_stack)
    key = f"refusals/{uuid.uuid4().hex}"
    good.put_object(Bucket="imagenet", Key=key, Body=b"private")

    wrong_secret = _client(local_stack, secret_key="0" * 40)
    wrong_key = _client(local_stack, access_key="AKIANOTTHISSTACK0000")
    anonymous = _client(local_stack, unsigned=True)
    for client in (wrong_secret, wrong_key, anonymous):
        _refused(lambda c=client: c.get_object(Bucket="imagenet", Key=key))
        _refused(lambda c=client: c.list_objects_v2(Bucket="imagenet"))
        _refused(lambda c=client: c.put_object(Bucket="imagenet", Key=f"{key}-intruder", Body=b"x"))
    assert _refused(lambda: wrong_secret.get_object(Bucket="imagenet", Key=key)) == "SignatureDoesNotMatch"
    assert _refused(lambda: anonymous.get_object(Bucket="imagenet", Key=key)) == "AccessDenied"

    # A plain unsigned HTTP request, as curl would send it.
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{local_stack.s3_endpoint}/imagenet/{key}", timeout=10)
    assert info.value.code == 403

    # None of the refused writes happened.
    with pytest.raises(ClientError) as info:
        good.head_object(Bucket="imagenet", Key=f"{key}-intruder")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


def test_s3_accepts_the_stack_credentials(local_stack, monkeypatch):
    good = _client(local_stack)
    assert {"imagenet", "mlflow", "checkpoints"} <= {b["Name"] for b in good.list_buckets()["Buckets"]}
    key = f"accept/{uuid.uuid4().hex}"
    good.put_object(Bucket="checkpoints", Key=key, Body=b"hello")
    assert good.get_object(Bucket="checkpoints", Key=key)["Body"].read() == b"hello"

    # The project's own storage layer, configured only through the stack's environment.
    for name, value in local_stack.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    payload = os.urandom(3 * 1024 * 1024 + 17)
    loc = storage.resolve(f"s3://imagenet/x-{uuid.uuid4().hex}/blob.bin")
    storage.write_bytes_atomic(loc, payload)
    assert storage.read_bytes(storage.resolve(loc.url)) == payload
    assert [f.size for f in storage.list_files(storage.resolve(loc.url.rsplit("/", 1)[0]))] == [len(payload)]
    assert good.get_object(Bucket="imagenet", Key=loc.path.split("/", 1)[1])["Body"].read() == payload


def test_mlflow_server_stores_runs_and_proxies_artifacts_into_s3(local_stack, tmp_path):
    from mlflow.tracking import MlflowClient

    with urllib.request.urlopen(f"{local_stack.mlflow_uri}/health", timeout=10) as resp:
        assert resp.status == 200

    client = MlflowClient(local_stack.mlflow_uri)
    exp_id = client.create_experiment(f"services-{uuid.uuid4().hex[:8]}")
    run = client.create_run(exp_id)
    run_id = run.info.run_id
    client.log_metric(run_id, "loss", 0.25, step=3)
    artifact = tmp_path / "notes.txt"
    artifact.write_text("artifact via the tracking server\n")
    client.log_artifact(run_id, str(artifact), artifact_path="docs")
    client.set_terminated(run_id)

    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(3, 0.25)]
    assert [a.path for a in client.list_artifacts(run_id, "docs")] == ["docs/notes.txt"]
    # The artifact is in the S3 bucket, written by the server (the client has no S3 credentials).
    listed = _client(local_stack).list_objects_v2(Bucket="mlflow", Prefix="artifacts/")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    matching = [k for k in keys if run_id in k and k.endswith("docs/notes.txt")]
    assert len(matching) == 1, keys
    body = _client(local_stack).get_object(Bucket="mlflow", Key=matching[0])["Body"].read()
    assert body == artifact.read_bytes()


def _wait_job(client, job_id, timeout=180):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {status} after {timeout} s")


def test_ray_head_runs_jobs_with_the_stack_environment(local_stack):
    from ray.job_submission import JobStatus, JobSubmissionClient

    # The job API requires the stack's token.
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{local_stack.dashboard_url}/api/jobs/", timeout=10)
    assert info.value.code in (401, 403)

    client = JobSubmissionClient(local_stack.dashboard_url, headers=local_stack.ray_auth_headers())
    job_id = client.submit_job(
        entrypoint="""python -c "import os; print('endpoint=' + os.environ['AWS_ENDPOINT_URL'])" """
    )
    status = _wait_job(client, job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs
    assert f"endpoint={local_stack.s3_endpoint}" in logs
    assert local_stack.secret_key not in logs


def test_ray_job_submit_cli_with_the_stack_env(local_stack):
    """As in the README: `source .services/env.sh; ray job submit -- python ...` (env.sh == env())."""
    env = {**os.environ, **local_stack.env()}
    done = subprocess.run(
        [
            RAY_CLI,
            "job",
            "submit",
            "--",
            "python",
            "-c",
            "import os, sys; print('mlflow=' + os.environ['MLFLOW_TRACKING_URI']); print('python=' + sys.executable)",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"mlflow={local_stack.mlflow_uri}" in done.stdout
    # A job's `python` is this environment's, even without an activated venv.
    assert f"python={Path(sys.executable).parent}" in done.stdout


def test_unrelated_ray_init_does_not_attach_to_the_stack(local_stack):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    code = (
        "import ray; ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False); "
        "print('GCS=' + ray.get_runtime_context().gcs_address); ray.shutdown()"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    gcs = [line for line in done.stdout.splitlines() if line.startswith("GCS=")][-1][len("GCS=") :]
    assert gcs != local_stack.ray_gcs_address
    assert gcs.rsplit(":", 1)[1] != str(local_stack.ports["gcs"])


@pytest.mark.slow
def test_up_status_down_through_the_cli_functions(tmp_path, capsys):
    from imagenet_ray.errors import UserError
    from imagenet_ray.services import down, status, up

    state_dir = tmp_path / "svc"
    assert up(state_dir) == 0
    try:
        out = capsys.readouterr().out
        state = json.loads((state_dir / "state.json").read_text())
        env_sh = (state_dir / "env.sh").read_text()
        for name in ("state.json", "env.sh"):
            assert stat.S_IMODE((state_dir / name).stat().st_mode) == 0o600, name
        assert state["secret_key"] not in out and state["ray_auth_token"] not in out
        assert f"export AWS_SECRET_ACCESS_KEY={state['secret_key']}" in env_sh
        assert f"http://127.0.0.1:{state['ports']['s3']}" in out and "env.sh" in out

        # Sourcing env.sh gives a shell what env() gives Python.
        shown = subprocess.run(
            ["bash", "-c", f"source {state_dir / 'env.sh'} && env"], capture_output=True, text=True, check=True
        ).stdout
        assert f"AWS_ENDPOINT_URL=http://127.0.0.1:{state['ports']['s3']}" in shown.splitlines()

        assert status(state_dir) == 0
        assert "down" not in capsys.readouterr().out
        with pytest.raises(UserError, match="already running"):
            up(state_dir)
    finally:
        assert down(state_dir) == 0

    refs = [process.ProcessRef.from_dict(ref) for ref in state["processes"].values()]
    assert len(refs) == 3
    assert not any(process.is_alive(ref) for ref in refs)
    table = process._proc_table()
    assert not [pid for pid, st in table.items() if st.sid in {r.pid for r in refs} and st.state != "Z"]
    assert not (state_dir / "state.json").exists() and not (state_dir / "env.sh").exists()
    assert status(state_dir) != 0
    assert not Path(f"/tmp/irray-{state['ports']['gcs']}").exists()
    assert not list(Path("/tmp").glob(f"seaweedfs-*-{state['ports']['s3']}.sock"))
