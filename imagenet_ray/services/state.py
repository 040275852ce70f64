"""A local stack's state: ports, process refs and credentials, as plain data saved to 0600 JSON.

Services read it (addresses, credentials, directories); `stack.LocalStack` adds starting and stopping.
Secrets (S3 secret key, Ray token, MLflow and PostgreSQL passwords) never appear in repr, logs or
command lines. Clients use 127.0.0.1:ports; servers listen on bind_host:bind_port(name), in `netns`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self, get_args

from imagenet_ray.errors import UserError
from imagenet_ray.services.ports import LOCALHOST
from imagenet_ray.services.process import ProcessRef

DEFAULT_BUCKETS = ("imagenet", "mlflow", "checkpoints")
DEFAULT_SERVICES = ("s3", "mlflow", "ray")
MlflowBackend = Literal["sqlite", "postgres"]
MLFLOW_BACKENDS: tuple[str, ...] = get_args(MlflowBackend)
STATE_VERSION = 2
_READABLE_VERSIONS = (1, STATE_VERSION)  # version 1 (before bind/auth/postgres) reads with defaults
_WILDCARDS = ("0.0.0.0", "")
# The user's own AWS login (a session token would be sent along with our keys and refused; a
# profile or ~/.aws/config could change addressing) and Ray address never reach the servers.
_SCRUBBED_ENV = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "RAY_ADDRESS")


def write_private(path: Path, text: str) -> None:
    """Write a file readable by the owner only (0600 from creation, replaced atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


@dataclass
class StackState:
    """A local S3 + MLflow (+ PostgreSQL) + Ray head, as data: where it lives and how to reach it."""

    root_dir: Path
    ports: dict[str, int]  # what clients connect to, on 127.0.0.1
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    ray_auth_token: str = field(repr=False)
    ray_num_cpus: int = 4
    region: str = "us-east-1"
    buckets: tuple[str, ...] = DEFAULT_BUCKETS
    processes: dict[str, ProcessRef] = field(default_factory=dict)
    service_names: tuple[str, ...] = DEFAULT_SERVICES  # the services this stack runs
    bind_host: str = LOCALHOST  # where the servers listen
    bind_ports: dict[str, int] = field(default_factory=dict)  # where they differ from `ports`
    netns: str | None = None  # servers run in this network namespace (`ip netns exec`)
    mlflow_backend: MlflowBackend = "sqlite"
    mlflow_auth: bool = False  # MLflow's basic-auth app, admin = mlflow_username/mlflow_password
    mlflow_username: str = field(default="", repr=False)
    mlflow_password: str = field(default="", repr=False)
    postgres_password: str = field(default="", repr=False)

    # -- addresses ------------------------------------------------------------------------------
    @property
    def s3_endpoint(self) -> str:
        return f"http://{LOCALHOST}:{self.ports['s3']}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{LOCALHOST}:{self.ports['mlflow']}"

    @property
    def ray_gcs_address(self) -> str:
        """For `ray.init(address=...)` in a process whose environment has `env()` from the start."""
        return f"{LOCALHOST}:{self.ports['gcs']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{LOCALHOST}:{self.ports['dashboard']}"

    def bind_port(self, name: str) -> int:
        """The port the server listens on for `name` (in its namespace): bind_ports, else ports."""
        return self.bind_ports.get(name, self.ports[name])

    @property
    def peer_host(self) -> str:
        """Where one server of the stack reaches another: bind_host, or loopback for a wildcard."""
        return LOCALHOST if self.bind_host in _WILDCARDS else self.bind_host

    @property
    def logs_dir(self) -> Path:
        return self.root_dir / "logs"

    def log_path(self, service: str) -> Path:
        return self.logs_dir / f"{service}.log"

    def env(self) -> dict[str, str]:
        """What a client (CLI, job submitter, test) needs: source-able as env.sh.

        RAY_AUTH_MODE/RAY_AUTH_TOKEN let `ray job submit` and JobSubmissionClient in a fresh process
        authenticate; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps a driver's `ray.init(address=
        ray_gcs_address)` on 127.0.0.1 (see ray_head.py); AWS_ENDPOINT_URL_S3 overrides a user's own
        S3 endpoint variable, which would otherwise win over AWS_ENDPOINT_URL in boto3 and storage.py.
        With mlflow_auth, MLflow clients log in with MLFLOW_TRACKING_USERNAME/PASSWORD."""
        return self._env(self.s3_endpoint, self.mlflow_uri)

    def server_env(self) -> dict[str, str]:
        """env() as the servers see the stack: at peer_host and the bind ports, inside their namespace
        (where 127.0.0.1:ports, forwarded from outside, is not reachable). The same as env() by default."""
        s3 = f"http://{self.peer_host}:{self.bind_port('s3')}"
        return self._env(s3, f"http://{self.peer_host}:{self.bind_port('mlflow')}")

    def _env(self, s3_endpoint: str, mlflow_uri: str) -> dict[str, str]:
        env = {
            "AWS_ENDPOINT_URL": s3_endpoint,
            "AWS_ENDPOINT_URL_S3": s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "MLFLOW_TRACKING_URI": mlflow_uri,
            "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
            "RAY_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.ray_auth_token,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }
        if self.mlflow_auth:
            env["MLFLOW_TRACKING_USERNAME"] = self.mlflow_username
            env["MLFLOW_TRACKING_PASSWORD"] = self.mlflow_password
        return env

    def ray_auth_headers(self) -> dict[str, str]:
        """For an in-process JobSubmissionClient: `JobSubmissionClient(url, headers=...)`.

        Needed because Ray caches its auth mode per process, so setting RAY_AUTH_* in os.environ
        after Ray was first used does not take effect."""
        return {"Authorization": f"Bearer {self.ray_auth_token}"}

    def service_env(self) -> dict[str, str]:
        """The base environment of the servers: ours minus variables that would confuse them."""
        base = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        base.update({k: v for k, v in self.server_env().items() if k != "RAY_ADDRESS"})
        base.update({"AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull})
        return base

    # -- persistence ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "root_dir": str(self.root_dir),
            "ports": dict(self.ports),
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "ray_auth_token": self.ray_auth_token,
            "ray_num_cpus": self.ray_num_cpus,
            "region": self.region,
            "buckets": list(self.buckets),
            "processes": {name: ref.to_dict() for name, ref in self.processes.items()},
            "service_names": list(self.service_names),
            "bind_host": self.bind_host,
            "bind_ports": dict(self.bind_ports),
            "netns": self.netns,
            "mlflow_backend": self.mlflow_backend,
            "mlflow_auth": self.mlflow_auth,
            "mlflow_username": self.mlflow_username,
            "mlflow_password": self.mlflow_password,
            "postgres_password": self.postgres_password,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        if data.get("version") not in _READABLE_VERSIONS:
            raise UserError(f"unsupported services state version {data.get('version')!r}")
        backend = data.get("mlflow_backend", "sqlite")
        if backend not in MLFLOW_BACKENDS:
            raise UserError(f"unknown mlflow_backend {backend!r} in services state")
        netns = data.get("netns")
        return cls(
            root_dir=Path(data["root_dir"]),
            ports={k: int(v) for k, v in data["ports"].items()},
            access_key=data["access_key"],
            secret_key=data["secret_key"],
            ray_auth_token=data["ray_auth_token"],
            ray_num_cpus=int(data["ray_num_cpus"]),
            region=data["region"],
            buckets=tuple(data["buckets"]),
            processes={name: ProcessRef.from_dict(ref) for name, ref in data["processes"].items()},
            # version 1 had no selection: the services it started are the ones with a process
            service_names=tuple(data.get("service_names", data["processes"])),
            bind_host=str(data.get("bind_host", LOCALHOST)),
            bind_ports={k: int(v) for k, v in data.get("bind_ports", {}).items()},
            netns=None if netns is None else str(netns),
            mlflow_backend=backend,
            mlflow_auth=bool(data.get("mlflow_auth", False)),
            mlflow_username=str(data.get("mlflow_username", "")),
            mlflow_password=str(data.get("mlflow_password", "")),
            postgres_password=str(data.get("postgres_password", "")),
        )

    def save(self, path: Path) -> None:
        write_private(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Self:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            return cls.from_dict(data)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path}: unreadable services state ({type(exc).__name__}: {exc})") from None
