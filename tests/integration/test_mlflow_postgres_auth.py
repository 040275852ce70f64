"""MLflow as in the k8s deployment: on the stack's real PostgreSQL, basic auth, artifacts in S3.

One stack for the module (s3 + postgres + mlflow on 127.0.0.1), started once. Clients run in
subprocesses with the stack's environment, so MLflow reads MLFLOW_TRACKING_USERNAME/PASSWORD fresh.
The root dir comes from tempfile: as root, PostgreSQL runs as `postgres`, which cannot enter pytest's
0700 base temp dir.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from imagenet_ray.services import StackOptions, mlflow_server, postgres, process, s3, start_stack

pytestmark = pytest.mark.integration

OPTIONS = StackOptions(mlflow_backend="postgres", mlflow_auth=True)
ONLY = ("s3", "postgres", "mlflow")

# A client as a training job would be: the tracking URI and the credentials only from the environment.
_CLIENT = r"""
import json, pathlib, sys, mlflow
mlflow.set_experiment(sys.argv[1])
with mlflow.start_run() as run:
    mlflow.log_param("lr", "0.1")
    mlflow.log_metric("loss", 0.25, step=3)
    note = pathlib.Path(sys.argv[2])
    note.write_text("artifact through the tracking server\n")
    mlflow.log_artifact(str(note), artifact_path="docs")
print("RESULT=" + json.dumps({"run_id": run.info.run_id, "experiment_id": run.info.experiment_id}))
"""


def _started(root: Path) -> tuple[object, float]:
    t0 = time.monotonic()
    stack = start_stack(root, only=ONLY, options=OPTIONS)
    return stack, time.monotonic() - t0


@pytest.fixture(scope="module")
def pg_stack():
    root = Path(tempfile.mkdtemp(prefix="irray-pg-auth-"))
    stack, took = _started(root)
    print(f"\npg_stack: s3 + postgres + mlflow (basic auth) started in {took:.1f} s (logs in {stack.logs_dir})")
    try:
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)


def _client_env(stack, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(stack.env())
    # No S3 access for the client: artifacts go through the tracking server.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(name)
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", **overrides})
    return env


def _run_client(stack, tmp_path: Path, experiment: str, **env_overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _CLIENT, experiment, str(tmp_path / "notes.txt")],
        env=_client_env(stack, **env_overrides),
        capture_output=True,
        text=True,
        timeout=180,
    )


def _result(done: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT=")][-1]
    return dict(json.loads(line[len("RESULT=") :]))


def _status(url: str, auth: tuple[str, str] | None = None) -> int:
    headers = {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def _search_url(stack) -> str:
    return f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=10"


def test_a_client_with_credentials_in_its_environment_logs_runs_into_postgres_and_s3(pg_stack, tmp_path):
    experiment = f"pg-auth-{uuid.uuid4().hex[:8]}"
    ids = _result(_run_client(pg_stack, tmp_path, experiment))

    # The run is in PostgreSQL's tracking database, not in a sqlite file.
    with postgres.connect(pg_stack, "mlflow") as conn:
        status = conn.execute("SELECT status FROM runs WHERE run_uuid = %s", (ids["run_id"],)).fetchall()
        params = conn.execute("SELECT key, value FROM params WHERE run_uuid = %s", (ids["run_id"],)).fetchall()
        metrics = conn.execute("SELECT key, value, step FROM metrics WHERE run_uuid = %s", (ids["run_id"],)).fetchall()
        names = [row[0] for row in conn.execute("SELECT name FROM experiments")]
    assert status == [("FINISHED",)] and params == [("lr", "0.1")] and metrics == [("loss", 0.25, 3)]
    assert experiment in names
    assert not list((pg_stack.root_dir / "mlflow").glob("*.db"))
    # The auth app's users are in their own database of the same server.
    with postgres.connect(pg_stack, "mlflow_auth") as conn:
        users = conn.execute("SELECT username, is_admin FROM users").fetchall()
    assert users == [(pg_stack.mlflow_username, True)]

    # The artifact is in the S3 bucket, written by the server with the stack's keys.
    listed = s3.client(pg_stack).list_objects_v2(Bucket=mlflow_server.ARTIFACTS_BUCKET, Prefix="artifacts/")
    keys = [o["Key"] for o in listed.get("Contents", []) if ids["run_id"] in o["Key"]]
    assert len(keys) == 1 and keys[0].endswith("docs/notes.txt"), keys
    body = s3.client(pg_stack).get_object(Bucket=mlflow_server.ARTIFACTS_BUCKET, Key=keys[0])["Body"].read()
    assert body == b"artifact through the tracking server\n"


def test_wrong_passwords_and_anonymous_requests_are_refused(pg_stack, tmp_path):
    admin = (pg_stack.mlflow_username, pg_stack.mlflow_password)
    assert _status(_search_url(pg_stack), admin) == 200
    assert _status(_search_url(pg_stack)) == 401  # anonymous
    assert _status(_search_url(pg_stack), (admin[0], "not-the-password")) == 401
    assert _status(_search_url(pg_stack), ("intruder", admin[1])) == 401
    assert _status(f"{pg_stack.mlflow_uri}/", None) == 401  # the UI too
    assert _status(f"{pg_stack.mlflow_uri}/health") == 200  # the only public route: health checks

    done = _run_client(pg_stack, tmp_path, "never-created", MLFLOW_TRACKING_PASSWORD="not-the-password")
    assert done.returncode != 0 and "401" in done.stderr, done.stderr[-3000:]
    with postgres.connect(pg_stack, "mlflow") as conn:
        assert not conn.execute("SELECT 1 FROM experiments WHERE name = 'never-created'").fetchall()


def test_postgres_refuses_a_wrong_password(pg_stack):
    import psycopg

    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(
            host="127.0.0.1", port=pg_stack.ports["postgres"], user="mlflow", password="wrong", dbname="mlflow"
        )


def _tree(ref: process.ProcessRef) -> list[int]:
    """A server and every process of its (PostgreSQL's backends each start a session of their own)."""
    return sorted(process._family(ref, process._proc_table(), {}))


def _stack_pids(stack) -> list[int]:
    return sorted(pid for ref in stack.processes.values() for pid in _tree(ref))


def _secrets(stack) -> dict[str, str]:
    return {
        "S3 secret key": stack.secret_key,
        "MLflow password": stack.mlflow_password,
        "PostgreSQL password": stack.postgres_password,
    }


def test_secrets_stay_out_of_logs_and_command_lines(pg_stack):
    logs = [p for p in pg_stack.logs_dir.rglob("*") if p.is_file()]
    assert {p.name for p in logs} >= {"s3.log", "postgres.log", "mlflow.log"}
    for path in logs:
        text = path.read_text(errors="replace")
        leaked = [what for what, secret in _secrets(pg_stack).items() if secret in text]
        assert not leaked, (path, leaked)

    pids = _stack_pids(pg_stack)
    assert len(pids) >= 5  # weed, postgres and its workers, mlflow and uvicorn
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        leaked = [what for what, secret in _secrets(pg_stack).items() if secret in cmdline]
        assert not leaked, (pid, cmdline[:200], leaked)

    # The files that do hold them are private; PostgreSQL's own does not survive initdb.
    for path in (mlflow_server.pgpass_path(pg_stack), mlflow_server.auth_config_path(pg_stack)):
        assert path.stat().st_mode & 0o077 == 0, path
    assert not (postgres.home(pg_stack) / ".initdb-password").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root has to hand PostgreSQL to another user")
def test_postgres_does_not_run_as_root(pg_stack):
    postgres_pids = _tree(pg_stack.processes["postgres"])
    assert len(postgres_pids) >= 4  # postmaster, checkpointer, walwriter, autovacuum, ...
    for pid in postgres_pids:
        uids = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:"))
        assert set(uids.split()[1:]) != {"0"}, (pid, uids)


@pytest.mark.slow
def test_stop_leaves_no_process_and_a_restart_keeps_runs_and_logins(pg_stack, tmp_path):
    experiment = f"kept-{uuid.uuid4().hex[:8]}"
    _result(_run_client(pg_stack, tmp_path, experiment))
    pids = _stack_pids(pg_stack)
    t0 = time.monotonic()
    pg_stack.stop()
    print(f"\npg_stack: stopped in {time.monotonic() - t0:.1f} s")
    table = process._proc_table()
    assert not [pid for pid in pids if pid in table and table[pid].state != "Z"]
    assert not any(pg_stack.alive().values())

    # As `services down` then `up`: same root dir, new processes, same database and admin login.
    again, took = _started(pg_stack.root_dir)
    print(f"pg_stack: restarted on the kept data in {took:.1f} s")
    try:
        assert again.mlflow_password == pg_stack.mlflow_password
        admin = (again.mlflow_username, again.mlflow_password)
        assert _status(_search_url(again), admin) == 200
        with urllib.request.urlopen(
            urllib.request.Request(
                _search_url(again),
                headers={"Authorization": "Basic " + base64.b64encode(":".join(admin).encode()).decode()},
            ),
            timeout=10,
        ) as resp:
            names = [e["name"] for e in json.loads(resp.read())["experiments"]]
        assert experiment in names
    finally:
        again_pids = _stack_pids(again)
        again.stop()
    table = process._proc_table()
    assert not [pid for pid in again_pids if pid in table and table[pid].state != "Z"]
