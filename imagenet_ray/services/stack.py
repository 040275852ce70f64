"""The three local services as one stack: start them together, check them, stop them.

`start_stack` picks every port first, launches all servers at once and waits for each in its own thread;
if any fails, everything already started is stopped and a one-line UserError names the service and its log.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from subprocess import Popen

from imagenet_ray.errors import UserError, describe_error
from imagenet_ray.services import mlflow_server, process, ray_head, s3
from imagenet_ray.services.ports import free_ports
from imagenet_ray.services.protocol import Service
from imagenet_ray.services.state import DEFAULT_BUCKETS, StackState

__all__ = ["DEFAULT_BUCKETS", "SERVICES", "LocalStack", "start_stack"]

# Start order does not matter (MLflow and Ray only need S3 when used); stop order neither.
SERVICES: tuple[Service, ...] = (s3, mlflow_server, ray_head)


class LocalStack(StackState):
    """A running (or stopped) stack: its state plus checking and stopping its services."""

    def alive(self) -> dict[str, bool]:
        """Whether each service's process still runs (no network check)."""
        return {svc.NAME: svc.NAME in self.processes and process.is_alive(self.processes[svc.NAME]) for svc in SERVICES}

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
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    return LocalStack(
        root_dir=root_dir,
        ports=ports,
        # Not AWS-shaped on purpose: random per stack, only ever valid for this server.
        access_key=secrets.token_hex(10),
        secret_key=secrets.token_hex(20),
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


def start_stack(
    root_dir: Path,
    ray_num_cpus: int | None = None,
    buckets: tuple[str, ...] | list[str] = DEFAULT_BUCKETS,
    only: tuple[str, ...] | None = None,
) -> LocalStack:
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
        raise UserError(
            f"unknown service(s) {', '.join(sorted(unknown))}; known: {', '.join(svc.NAME for svc in SERVICES)}"
        )
    for attempt in range(1, _START_ATTEMPTS + 1):
        try:
            return _start_once(_new_stack(root_dir, ray_num_cpus, tuple(buckets)), services)
        except _PortConflict as exc:
            if attempt == _START_ATTEMPTS:
                raise UserError(f"{exc} (port conflicts in {attempt} attempts)") from None
    raise AssertionError("unreachable")


def _start_once(stack: LocalStack, services: tuple[Service, ...] = SERVICES) -> LocalStack:
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
            popen, stack.processes[svc.NAME] = process.spawn(
                commands[svc.NAME], env=svc.environ(stack, base), cwd=svc.cwd(stack), log_path=log
            )
            waiters.append((svc, popen, offset))
        futures = [pool.submit(_wait_healthy, stack, svc, popen, offset, t0, cancel) for svc, popen, offset in waiters]
        for fut in as_completed(futures):
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
