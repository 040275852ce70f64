"""What every service module (s3, postgres, mlflow_server, ray_head) provides, so the stack runs them alike."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from imagenet_ray.services.state import StackState


@runtime_checkable
class Service(Protocol):
    """One server of the stack: its command line, environment and health check (a module satisfies it)."""

    NAME: str  # key in StackState.processes and the log file's name
    TITLE: str  # shown to people
    PORTS: tuple[str, ...]  # names of the ports it needs in StackState.ports
    STARTUP_TIMEOUT_S: float
    STOP_GRACE_S: float  # first signal → SIGKILL
    STOP_SIGNAL: int | None  # sent to the leader alone (it stops its children); None: SIGTERM to the tree
    START_AFTER: tuple[str, ...]  # services (where part of the stack) that must be healthy before it starts

    def prepare(self, stack: StackState) -> None:
        """Create directories and files it needs; fail early (e.g. on a missing binary)."""

    def command(self, stack: StackState) -> list[str]: ...

    def environ(self, stack: StackState, base: dict[str, str]) -> dict[str, str]: ...

    def cwd(self, stack: StackState) -> Path: ...

    def healthy(self, stack: StackState) -> bool: ...

    def after_start(self, stack: StackState) -> None:
        """One-time setup once healthy (e.g. buckets)."""

    def diagnostics(self, stack: StackState) -> str:
        """Text beyond its own log that may say why it failed to start."""

    def url(self, stack: StackState) -> str: ...

    def cleanup(self, stack: StackState) -> None:
        """Remove what it leaves outside root_dir after it stopped."""
