"""The local services as one stack: start them together, check them, stop them.

`start_stack` picks every port first, starts each server in its own thread (once those it starts after are
healthy: MLflow after PostgreSQL) and waits for it; if any fails, everything already started is stopped
and a one-line UserError names the service and its log.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen

from imagenet_ray.errors import UserError, describe_error
from imagenet_ray.services import mlflow_server, postgres, process, ray_head, s3
from imagenet_ray.services.ports import LOCALHOST, free_ports
from imagenet_ray.services.protocol import Service
from imagenet_ray.services.state import (
    DEFAULT_BUCKETS,
    DEFAULT_SERVICES,
    MLFLOW_BACKENDS,
    MlflowBackend,
    StackState,
    write_private,
)

__all__ = ["DEFAULT_BUCKETS", "SERVICES", "LocalStack", "StackOptions", "start_stack"]

log = logging.getLogger(__name__)

# Only MLflow on PostgreSQL waits for another service (START_AFTER); MLflow and Ray need S3 only when
# used. Stop order does not matter.
SERVICES: tuple[Service, ...] = (s3, postgres, mlflow_server, ray_head)
_BY_NAME = {svc.NAME: svc for svc in SERVICES}


class LocalStack(StackState):
    """A running (or stopped) stack: its state plus checking and stopping its services."""

    def members(self) -> tuple[Service, ...]:
        """The services this stack runs, in SERVICES order."""
        return tuple(svc for svc in SERVICES if svc.NAME in self.service_names)

    def alive(self) -> dict[str, bool]:
        """Whether each service's process still runs (no network check)."""
        refs = {svc.NAME: self.processes.get(svc.NAME) for svc in self.members()}
        return {name: ref is not None and process.is_alive(ref) for name, ref in refs.items()}

    def health(self) -> dict[str, bool]:
        """Whether each service runs *and* answers its health check, checked concurrently."""
        alive = self.alive()
        with ThreadPoolExecutor(max(1, len(self.members()))) as pool:
            checks = {svc.NAME: pool.submit(svc.healthy, self) for svc in self.members() if alive[svc.NAME]}
            return {svc.NAME: svc.NAME in checks and bool(checks[svc.NAME].result()) for svc in self.members()}

    def stop(self) -> None:
        """Stop all services (first signal, then SIGKILL after each one's grace) and wait until every
        process of theirs is gone; then remove what they leave outside root_dir."""
        started = [(ref, _BY_NAME[name]) for name, ref in self.processes.items() if name in _BY_NAME]
        refs = [(ref, svc.STOP_GRACE_S) for ref, svc in started]
        first = {ref: svc.STOP_SIGNAL for ref, svc in started if svc.STOP_SIGNAL is not None}
        left = process.stop_trees(refs, leader_signals=first)
        for svc in self.members():
            svc.cleanup(self)
        if left:
            raise UserError(f"services did not stop: pids {', '.join(map(str, left))} still running")

    def stop_service(self, name: str) -> None:
        """Stop one service (an outage, in the reliability tests); `start_service` brings it back on
        the same ports with the same data."""
        svc, ref = _BY_NAME[name], self.processes.pop(name)
        first = {ref: svc.STOP_SIGNAL} if svc.STOP_SIGNAL is not None else {}
        left = process.stop_trees([(ref, svc.STOP_GRACE_S)], leader_signals=first)
        if left:
            raise UserError(f"{svc.TITLE} did not stop: pids {', '.join(map(str, left))} still running")

    def start_service(self, name: str) -> None:
        """Start a service stopped with `stop_service` again and wait until it is healthy."""
        _start_once(self, (_BY_NAME[name],))


def _pick_ports(given: Mapping[str, int]) -> dict[str, int]:
    """Every service's ports: the caller's where given, the rest freshly picked."""
    names = [name for svc in SERVICES for name in svc.PORTS if name not in given]
    taken = set(given.values())
    picked = [port for port in free_ports(len(names) + len(taken)) if port not in taken][: len(names)]
    return {**dict(zip(names, picked, strict=True)), **given}


@dataclass(frozen=True)
class StackOptions:
    """Where the servers listen and which MLflow: clients always use 127.0.0.1:`ports`.

    `ports`: client ports the caller chose (e.g. its forwarder's), the rest are picked free.
    `bind_host`/`bind_ports`: where servers listen (default 127.0.0.1 and the client ports), inside
    network namespace `netns` when set. `mlflow_backend="postgres"` adds PostgreSQL to the stack."""

    ports: Mapping[str, int] | None = None
    bind_host: str = LOCALHOST
    bind_ports: Mapping[str, int] = field(default_factory=dict)
    netns: str | None = None
    mlflow_backend: MlflowBackend = "sqlite"
    mlflow_auth: bool = False


DEFAULT_OPTIONS = StackOptions()


CREDENTIALS_FILE = "credentials.json"
_KEPT_CREDENTIALS = ("mlflow_username", "mlflow_password", "postgres_password")


def _kept_credentials(root_dir: Path) -> dict[str, str]:
    """Passwords that live on in the data (PostgreSQL's superuser, MLflow's admin): made on the first
    start in `root_dir`, then read back from its 0600 credentials.json, so `down` then `up` logs in."""
    path = root_dir / CREDENTIALS_FILE
    try:
        kept = json.loads(path.read_text())
        if isinstance(kept, dict) and all(isinstance(kept.get(k), str) and kept[k] for k in _KEPT_CREDENTIALS):
            return {k: kept[k] for k in _KEPT_CREDENTIALS}
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({type(exc).__name__}); it holds this data's passwords") from None
    made = {
        "mlflow_username": f"admin-{secrets.token_hex(4)}",
        # Hex: nothing to escape in a libpq password file or an ini value.
        "mlflow_password": secrets.token_hex(20),
        "postgres_password": secrets.token_hex(20),
    }
    write_private(path, json.dumps(made) + "\n")
    return made


def _new_stack(
    root_dir: Path,
    ray_num_cpus: int | None,
    buckets: tuple[str, ...],
    service_names: tuple[str, ...] = DEFAULT_SERVICES,
    options: StackOptions = DEFAULT_OPTIONS,
) -> LocalStack:
    kept = _kept_credentials(root_dir)
    return LocalStack(
        root_dir=root_dir,
        ports=_pick_ports(options.ports or {}),
        # Not AWS-shaped on purpose: random per stack, only ever valid for this server.
        access_key=secrets.token_hex(10),
        secret_key=secrets.token_hex(20),
        ray_auth_token=secrets.token_hex(32),
        ray_num_cpus=ray_num_cpus or ray_head.default_num_cpus(),
        buckets=tuple(buckets),
        service_names=service_names,
        bind_host=options.bind_host,
        bind_ports=dict(options.bind_ports),
        netns=options.netns,
        mlflow_backend=options.mlflow_backend,
        mlflow_auth=options.mlflow_auth,
        mlflow_username=kept["mlflow_username"],
        mlflow_password=kept["mlflow_password"],
        postgres_password=kept["postgres_password"],
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


def _failure(stack: LocalStack, svc: Service, log_offset: int, message: str) -> UserError:
    text = (_log_since(stack.log_path(svc.NAME), log_offset) + svc.diagnostics(stack)).lower()
    cls = _PortConflict if any(m in text for m in _CONFLICT_MARKERS) else UserError
    return cls(f"{message}; see {stack.log_path(svc.NAME)}")


def _wait_healthy(
    stack: LocalStack, svc: Service, popen: Popen[bytes], log_offset: int, started: float, cancel: threading.Event
) -> float:
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
                raise UserError(
                    f"{svc.TITLE} started but setting it up failed ({type(exc).__name__}: "
                    f"{describe_error(exc, 200)}); see {stack.log_path(svc.NAME)}"
                ) from None
            return time.monotonic() - started
        if time.monotonic() > deadline:
            raise _failure(
                stack, svc, log_offset, f"{svc.TITLE} did not become healthy within {svc.STARTUP_TIMEOUT_S:.0f} s"
            )
        time.sleep(0.25)
    raise UserError(f"{svc.TITLE}: start cancelled")


def _select(only: Sequence[str] | None, mlflow_backend: str) -> tuple[str, ...]:
    """The services to start: `only` (default s3, mlflow, ray), plus PostgreSQL under MLflow on it."""
    if mlflow_backend not in MLFLOW_BACKENDS:
        raise UserError(f"unknown mlflow_backend {mlflow_backend!r}; known: {', '.join(MLFLOW_BACKENDS)}")
    names = set(DEFAULT_SERVICES if only is None else only)
    unknown = names - set(_BY_NAME)
    if unknown:
        raise UserError(f"unknown service(s) {', '.join(sorted(unknown))}; known: {', '.join(_BY_NAME)}")
    if mlflow_backend == "postgres" and "mlflow" in names:
        names.add("postgres")
    if "postgres" in names and mlflow_backend != "postgres":
        raise UserError("PostgreSQL is MLflow's database here: start it with mlflow_backend='postgres'")
    if not names:
        raise UserError("no services to start (only=())")
    return tuple(svc.NAME for svc in SERVICES if svc.NAME in names)


def _check_options(options: StackOptions) -> None:
    known = {name for svc in SERVICES for name in svc.PORTS}
    for what, given in (("ports", options.ports or {}), ("bind_ports", options.bind_ports)):
        unknown = set(given) - known
        if unknown:
            raise UserError(f"unknown port name(s) in {what}: {', '.join(sorted(unknown))}")
        bad = [f"{name}={port}" for name, port in given.items() if not 0 < int(port) < 65536]
        if bad:
            raise UserError(f"{what} out of range: {', '.join(bad)}")
    try:
        ipaddress.IPv4Address(options.bind_host)
    except ValueError:
        raise UserError(f"bind_host must be an IPv4 address, got {options.bind_host!r}") from None


def start_stack(
    root_dir: Path,
    ray_num_cpus: int | None = None,
    buckets: Sequence[str] = DEFAULT_BUCKETS,
    only: Sequence[str] | None = None,
    *,
    options: StackOptions = DEFAULT_OPTIONS,
) -> LocalStack:
    """Start S3, MLflow and a Ray head (or `only` some; PostgreSQL comes with mlflow_backend="postgres")
    with data under `root_dir`. The `mlflow` bucket (MLflow's artifacts) is always created.

    With `options.netns`, the caller forwards 127.0.0.1:ports to the servers before calling (health
    checks go through them). A port taken in the meantime restarts everything on newly picked ports (up
    to 3 attempts); any other failure stops everything and raises a one-line UserError."""
    root_dir = Path(root_dir).resolve()
    root_dir.mkdir(parents=True, exist_ok=True)
    if mlflow_server.ARTIFACTS_BUCKET not in buckets:
        buckets = (*buckets, mlflow_server.ARTIFACTS_BUCKET)
    names = _select(only, options.mlflow_backend)
    _check_options(options)
    for attempt in range(1, _START_ATTEMPTS + 1):
        stack = _new_stack(root_dir, ray_num_cpus, tuple(buckets), names, options)
        try:
            return _start_once(stack, stack.members())
        except _PortConflict as exc:
            if attempt == _START_ATTEMPTS:
                raise UserError(f"{exc} (port conflicts in {attempt} attempts)") from None
    raise AssertionError("unreachable")


def _launch(stack: LocalStack, svc: Service, cmd: list[str], base: dict[str, str]) -> tuple[Popen[bytes], int]:
    log_path = stack.log_path(svc.NAME)
    offset = log_path.stat().st_size if log_path.exists() else 0
    popen, stack.processes[svc.NAME] = process.spawn(
        cmd, env=svc.environ(stack, base), cwd=svc.cwd(stack), log_path=log_path, netns=stack.netns
    )
    return popen, offset


def _wait_for(event: threading.Event, cancel: threading.Event, title: str) -> None:
    while not event.wait(0.25):
        if cancel.is_set():
            raise UserError(f"{title}: start cancelled")


def _start_once(stack: LocalStack, services: tuple[Service, ...]) -> LocalStack:
    stack.logs_dir.mkdir(parents=True, exist_ok=True)
    commands = {}
    for svc in services:  # fail on a missing binary before anything runs
        svc.prepare(stack)
        commands[svc.NAME] = svc.command(stack)
    healthy = {svc.NAME: threading.Event() for svc in services}
    cancel = threading.Event()
    base = stack.service_env()
    t0 = time.monotonic()

    def start(svc: Service) -> None:
        for name in svc.START_AFTER:
            if name in healthy:
                _wait_for(healthy[name], cancel, svc.TITLE)
        if cancel.is_set():  # never spawn after a failure elsewhere: the stop below would miss it
            raise UserError(f"{svc.TITLE}: start cancelled")
        popen, offset = _launch(stack, svc, commands[svc.NAME], base)
        took = _wait_healthy(stack, svc, popen, offset, time.monotonic(), cancel)
        healthy[svc.NAME].set()
        log.info("%s healthy in %.1f s (%.1f s after the stack's start)", svc.TITLE, took, time.monotonic() - t0)

    pool = ThreadPoolExecutor(len(services), thread_name_prefix="services-start")
    try:
        for fut in as_completed([pool.submit(start, svc) for svc in services]):
            fut.result()  # the first failure (in time) propagates; the others are cancelled below
        return stack
    except BaseException:
        cancel.set()
        pool.shutdown(wait=True)  # each waiter notices `cancel` within one health-check timeout
        with contextlib.suppress(UserError):
            stack.stop()
        raise
    finally:
        cancel.set()
        pool.shutdown(wait=True)
