"""`mlflow server` on sqlite or the stack's PostgreSQL, optionally with basic auth; artifacts proxied into S3.

Clients log artifacts over HTTP to the server, which writes them to S3 with the stack's credentials,
so training workers need no S3 access for MLflow. Passwords reach it through 0600 files (libpq's
PGPASSFILE, the auth ini), never argv. Why each flag is set: docs/architecture.md.
"""

from __future__ import annotations

import secrets
import shutil
import sys
from pathlib import Path

from imagenet_ray.services import postgres
from imagenet_ray.services.ports import LOCALHOST
from imagenet_ray.services.state import StackState, write_private

NAME = "mlflow"
TITLE = "MLflow"
PORTS: tuple[str, ...] = ("mlflow",)
# Imports plus, on a new PostgreSQL, every schema migration of the tracking and auth stores.
STARTUP_TIMEOUT_S = 240.0
STOP_GRACE_S = 10.0
STOP_SIGNAL: int | None = None  # SIGTERM to the tree (server and uvicorn)
START_AFTER: tuple[str, ...] = ("postgres",)  # MLflow exits when its database is unreachable
ARTIFACTS_BUCKET = "mlflow"
# Variables of ours or the user's that would change what the server reads; it gets its own below.
_SERVER_SCRUBBED = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_BACKEND_STORE_URI",
    "MLFLOW_AUTH_CONFIG_PATH",
    "MLFLOW_AUTH_ADMIN_USERNAME",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSERVICEFILE",
)


def _cli() -> list[str]:
    beside = Path(sys.executable).with_name("mlflow")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("mlflow")
    return [found] if found else [sys.executable, "-m", "mlflow"]


def data_dir(stack: StackState) -> Path:
    return stack.root_dir / "mlflow"


def pgpass_path(stack: StackState) -> Path:
    return data_dir(stack) / "pgpass"


def auth_config_path(stack: StackState) -> Path:
    return data_dir(stack) / "basic_auth.ini"


def backend_store_uri(stack: StackState) -> str:
    if stack.mlflow_backend == "postgres":
        return postgres.sqlalchemy_uri(stack, postgres.TRACKING_DATABASE)
    return f"sqlite:///{data_dir(stack) / 'mlflow.db'}"


def auth_database_uri(stack: StackState) -> str:
    """The auth app's users and permissions: beside the tracking store (its own database on PostgreSQL,
    as in the k8s deployment; a second sqlite file otherwise)."""
    if stack.mlflow_backend == "postgres":
        return postgres.sqlalchemy_uri(stack, postgres.AUTH_DATABASE)
    return f"sqlite:///{data_dir(stack) / 'basic_auth.db'}"


def auth_config(stack: StackState) -> str:
    """The basic-auth app's ini. The admin is created from it on the first start only (later starts
    keep the user store as it is); default_permission READ as in the k8s deployment. configparser
    interpolates `%`, hence the doubling."""

    def value(text: str) -> str:
        return text.replace("%", "%%")

    return (
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {value(auth_database_uri(stack))}\n"
        f"admin_username = {value(stack.mlflow_username)}\n"
        f"admin_password = {value(stack.mlflow_password)}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\n"
    )


def allowed_hosts(stack: StackState) -> list[str]:
    """Host headers the server accepts (DNS-rebinding guard): loopback and the bind address, and
    `mlflow`, the name the local cluster's hosts resolve; each bare and with the client and bind port."""
    names = dict.fromkeys([LOCALHOST, "localhost", stack.peer_host, "mlflow"])
    ports = dict.fromkeys([stack.ports["mlflow"], stack.bind_port("mlflow")])
    return [entry for name in names for entry in (name, *(f"{name}:{port}" for port in ports))]


def prepare(stack: StackState) -> None:
    """The data directory and the 0600 files that carry the passwords (PGPASSFILE, auth ini)."""
    data_dir(stack).mkdir(parents=True, exist_ok=True)
    if stack.mlflow_backend == "postgres":
        write_private(pgpass_path(stack), postgres.pgpass_line(stack))
    if stack.mlflow_auth:
        write_private(auth_config_path(stack), auth_config(stack))


def command(stack: StackState) -> list[str]:
    # --workers 1: one uvicorn worker is plenty for a handful of runs on a small machine.
    auth = ["--app-name", "basic-auth"] if stack.mlflow_auth else []
    return [
        *_cli(),
        "server",
        "--backend-store-uri",
        backend_store_uri(stack),
        "--artifacts-destination",
        f"s3://{ARTIFACTS_BUCKET}/artifacts",
        "--host",
        stack.bind_host,
        "--port",
        str(stack.bind_port("mlflow")),
        "--workers",
        "1",
        "--allowed-hosts",
        ",".join(allowed_hosts(stack)),
        *auth,
    ]


def environ(stack: StackState, base: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in _SERVER_SCRUBBED}  # the server must not point at itself
    env.update(
        {
            # MLflow 3 otherwise starts GenAI job consumers we do not use (and leaves a temp dir per start).
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
        }
    )
    if stack.mlflow_backend == "postgres":
        env["PGPASSFILE"] = str(pgpass_path(stack))
    if stack.mlflow_auth:
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config_path(stack))
        # Signs the auth app's CSRF tokens (sign-up form only); one worker, so one random key per start.
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(32)
    return env


def cwd(stack: StackState) -> Path:
    return data_dir(stack)


def _get_ok(url: str, headers: dict[str, str]) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=3) as resp:
            return bool(resp.status == 200)
    except Exception:
        return False


def basic_auth_headers(stack: StackState) -> dict[str, str]:
    """The admin's basic-auth header (empty without mlflow_auth)."""
    import base64

    if not stack.mlflow_auth:
        return {}
    token = base64.b64encode(f"{stack.mlflow_username}:{stack.mlflow_password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def healthy(stack: StackState) -> bool:
    """/health answers; with auth (where /health is public) the admin can also search experiments,
    i.e. the tracking store, the auth store and the admin user are there."""
    if not _get_ok(f"{stack.mlflow_uri}/health", {}):
        return False
    search = f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    return not stack.mlflow_auth or _get_ok(search, basic_auth_headers(stack))


def after_start(stack: StackState) -> None:
    pass


def diagnostics(stack: StackState) -> str:
    return ""  # everything is in the service's own log


def url(stack: StackState) -> str:
    return stack.mlflow_uri


def cleanup(stack: StackState) -> None:
    pass
