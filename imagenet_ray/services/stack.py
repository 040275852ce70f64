"""The three local services as one stack: start them together, describe them, stop them.

`start_stack` picks every port first, launches all three servers at once, then waits for each to be
healthy in its own thread, so the total startup is about the slowest one (MLflow). If any of them
fails, everything already started is stopped and a one-line UserError names the service and its log.

A LocalStack is plain data (root dir, ports, pids with start times, credentials), saved as JSON so
that a later process (`imagenet-ray services down`) can stop what an earlier one started. Secrets
(S3 secret key, Ray token) are never printed, logged or shown in repr; files holding them are 0600.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from imagenet_ray.errors import UserError
from imagenet_ray.services import mlflow_server, process, ray_head, s3
from imagenet_ray.services.ports import LOCALHOST, free_ports

# Start order does not matter (MLflow and Ray only need S3 when used); stop order neither.
SERVICES: tuple[ModuleType, ...] = (s3, mlflow_server, ray_head)
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
class LocalStack:
    """A running (or stopped) local S3 + MLflow + Ray head, all on 127.0.0.1."""

    root_dir: Path
    ports: dict[str, int]
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    ray_auth_token: str = field(repr=False)
    ray_num_cpus: int = 4
    region: str = "us-east-1"
    buckets: tuple[str, ...] = DEFAULT_BUCKETS
    processes: dict[str, process.ProcessRef] = field(default_factory=dict)

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

    # -- state ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
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
    def from_dict(cls, data: dict) -> "LocalStack":
        if data.get("version") != STATE_VERSION:
            raise UserError(f"unsupported services state version {data.get('version')!r}")
        return cls(
            root_dir=Path(data["root_dir"]),
            ports={k: int(v) for k, v in data["ports"].items()},
            access_key=data["access_key"], secret_key=data["secret_key"], ray_auth_token=data["ray_auth_token"],
            ray_num_cpus=int(data["ray_num_cpus"]), region=data["region"], buckets=tuple(data["buckets"]),
            processes={name: process.ProcessRef.from_dict(ref) for name, ref in data["processes"].items()},
        )

    def save(self, path: Path) -> None:
        write_private(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "LocalStack":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            return cls.from_dict(data)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path}: unreadable services state ({type(exc).__name__}: {exc})") from None

    # -- lifecycle ------------------------------------------------------------------------------
    def alive(self) -> dict[str, bool]:
        """Whether each service's process still runs (no network check)."""
        return {svc.NAME: svc.NAME in self.processes and process.is_alive(self.processes[svc.NAME])
                for svc in SERVICES}

    def health(self) -> dict[str, bool]:
        """Whether each service runs *and* answers its health check, checked concurrently."""
        alive = self.alive()
        with ThreadPoolExecutor(len(SERVICES)) as pool:
            checks = {svc.NAME: pool.submit(svc.healthy, self) for svc in SERVICES if alive[svc.NAME]}
            return {svc.NAME: svc.NAME in checks and bool(checks[svc.NAME].result()) for svc in SERVICES}

    def stop(self) -> None:
        """Stop all services (SIGTERM, then SIGKILL after each one's grace) and wait until every
        process of theirs is gone; then remove what they leave outside root_dir."""
        by_name = {svc.NAME: svc for svc in SERVICES}
        refs = [(ref, by_name[name].STOP_GRACE_S) for name, ref in self.processes.items() if name in by_name]
        left = process.stop_trees(refs)
        for svc in SERVICES:
            svc.cleanup(self)
        if left:
            raise UserError(f"services did not stop: pids {', '.join(map(str, left))} still running")


def _new_stack(root_dir: Path, ray_num_cpus: int | None, buckets: tuple[str, ...]) -> LocalStack:
    names = [name for svc in SERVICES for name in svc.PORTS]
    ports = dict(zip(names, free_ports(len(names))))
    return LocalStack(
        root_dir=root_dir, ports=ports,
        # Not AWS-shaped on purpose: random per stack, only ever valid for this server.
        access_key=secrets.token_hex(10), secret_key=secrets.token_hex(20),
        ray_auth_token=secrets.token_hex(32),
        ray_num_cpus=ray_num_cpus or ray_head.default_num_cpus(),
        buckets=tuple(buckets),
    )


class _PortConflict(UserError):
    """A service could not bind one of its ports: another process took it after it was picked."""


_START_ATTEMPTS = 3
_CONFLICT_MARKERS = ("address already in use", "errno 98", "eaddrinuse")


def _log_since(path: Path, offset: int, limit: int = 256 * 1024) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(offset, f.seek(0, os.SEEK_END) - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _failure(stack: LocalStack, svc: ModuleType, log_offset: int, message: str) -> UserError:
    text = (_log_since(stack.log_path(svc.NAME), log_offset) + svc.diagnostics(stack)).lower()
    cls = _PortConflict if any(m in text for m in _CONFLICT_MARKERS) else UserError
    return cls(f"{message}; see {stack.log_path(svc.NAME)}")


def _wait_healthy(stack: LocalStack, svc: ModuleType, popen, log_offset: int, started: float,
                  cancel: threading.Event) -> float:
    """Poll one service until healthy (then run its after_start); raise UserError on exit/timeout."""
    deadline = started + svc.STARTUP_TIMEOUT_S
    while not cancel.is_set():
        code = popen.poll()
        if code is not None:
            raise _failure(stack, svc, log_offset, f"{svc.TITLE} exited with code {code} while starting")
        if svc.healthy(stack):
            try:
                svc.after_start(stack)
            except Exception as exc:
                raise UserError(f"{svc.TITLE} started but setting it up failed ({type(exc).__name__}: "
                                f"{' '.join(str(exc).split())[:200]}); see {stack.log_path(svc.NAME)}") from None
            return time.monotonic() - started
        if time.monotonic() > deadline:
            raise _failure(stack, svc, log_offset,
                           f"{svc.TITLE} did not become healthy within {svc.STARTUP_TIMEOUT_S:.0f} s")
        time.sleep(0.25)
    raise UserError(f"{svc.TITLE}: start cancelled")


def start_stack(root_dir: Path, ray_num_cpus: int | None = None,
                buckets: tuple[str, ...] | list[str] = DEFAULT_BUCKETS,
                only: tuple[str, ...] | None = None) -> LocalStack:
    """Start S3, MLflow and a Ray head on fresh free ports with data under `root_dir`.

    `only`: names of the services to start (e.g. ("s3",) for a benchmark that needs storage only);
    default all three. The `mlflow` bucket (MLflow's artifact store) is always created. If a service
    fails because a picked port was taken in the meantime, everything is stopped and started again on
    new ports (up to 3 attempts); any other failure stops everything and raises a one-line UserError."""
    root_dir = Path(root_dir).resolve()
    root_dir.mkdir(parents=True, exist_ok=True)
    if mlflow_server.ARTIFACTS_BUCKET not in buckets:
        buckets = (*buckets, mlflow_server.ARTIFACTS_BUCKET)
    services = SERVICES if only is None else tuple(svc for svc in SERVICES if svc.NAME in only)
    unknown = set(only or ()) - {svc.NAME for svc in SERVICES}
    if unknown:
        raise UserError(f"unknown service(s) {', '.join(sorted(unknown))}; known: "
                        f"{', '.join(svc.NAME for svc in SERVICES)}")
    for attempt in range(1, _START_ATTEMPTS + 1):
        try:
            return _start_once(_new_stack(root_dir, ray_num_cpus, tuple(buckets)), services)
        except _PortConflict as exc:
            if attempt == _START_ATTEMPTS:
                raise UserError(f"{exc} (port conflicts in {attempt} attempts)") from None
    raise AssertionError("unreachable")


def _start_once(stack: LocalStack, services: tuple[ModuleType, ...] = SERVICES) -> LocalStack:
    stack.logs_dir.mkdir(parents=True, exist_ok=True)
    commands = {}
    for svc in services:  # fail on a missing binary before anything runs
        svc.prepare(stack)
        commands[svc.NAME] = svc.command(stack)

    cancel = threading.Event()
    pool = ThreadPoolExecutor(len(services), thread_name_prefix="services-start")
    try:
        base = stack.service_env()
        t0 = time.monotonic()
        waiters = []
        for svc in services:
            log = stack.log_path(svc.NAME)
            offset = log.stat().st_size if log.exists() else 0
            popen, stack.processes[svc.NAME] = process.spawn(commands[svc.NAME], env=svc.environ(stack, base),
                                                             cwd=svc.cwd(stack), log_path=log)
            waiters.append((svc, popen, offset))
        futures = [pool.submit(_wait_healthy, stack, svc, popen, offset, t0, cancel) for svc, popen, offset in waiters]
        for fut in as_completed(futures):
            fut.result()  # the first failure (in time) propagates; the others are cancelled below
        return stack
    except BaseException:
        cancel.set()
        pool.shutdown(wait=True)  # each waiter notices `cancel` within one health-check timeout
        try:
            stack.stop()
        except UserError:
            pass
        raise
    finally:
        cancel.set()
        pool.shutdown(wait=True)
