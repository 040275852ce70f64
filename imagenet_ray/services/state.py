"""A local stack's state: ports, process refs and credentials, as plain data saved to 0600 JSON.

Services read it (addresses, credentials, directories); `stack.LocalStack` adds starting and stopping.
Secrets (S3 secret key, Ray token) never appear in repr, logs or command lines.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from imagenet_ray.errors import UserError
from imagenet_ray.services.ports import LOCALHOST
from imagenet_ray.services.process import ProcessRef

DEFAULT_BUCKETS = ("imagenet", "mlflow", "checkpoints")
STATE_VERSION = 1
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
    """A local S3 + MLflow + Ray head on 127.0.0.1, as data: where it lives and how to reach it."""

    root_dir: Path
    ports: dict[str, int]
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    ray_auth_token: str = field(repr=False)
    ray_num_cpus: int = 4
    region: str = "us-east-1"
    buckets: tuple[str, ...] = DEFAULT_BUCKETS
    processes: dict[str, ProcessRef] = field(default_factory=dict)

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
        S3 endpoint variable, which would otherwise win over AWS_ENDPOINT_URL in boto3 and storage.py."""
        return {
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "RAY_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.ray_auth_token,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }

    def ray_auth_headers(self) -> dict[str, str]:
        """For an in-process JobSubmissionClient: `JobSubmissionClient(url, headers=...)`.

        Needed because Ray caches its auth mode per process, so setting RAY_AUTH_* in os.environ
        after Ray was first used does not take effect."""
        return {"Authorization": f"Bearer {self.ray_auth_token}"}

    def service_env(self) -> dict[str, str]:
        """The base environment of the servers: ours minus variables that would confuse them."""
        base = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        base.update({k: v for k, v in self.env().items() if k != "RAY_ADDRESS"})
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
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        if data.get("version") != STATE_VERSION:
            raise UserError(f"unsupported services state version {data.get('version')!r}")
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
