"""Errors no retry can heal, and how a run stops on them at once instead of spending its retries.

A worker that meets one writes its reason beside the run's checkpoints (`FATAL_FILE`); a restarted worker
group finds it and ends before any collective (every rank reads the same file), and the driver raises it
as the job's one-line error. Why Ray Train's own retries cannot tell: docs/reliability.md.
"""

from __future__ import annotations

from imagenet_ray import storage
from imagenet_ray.errors import UserError

FATAL_FILE = "_fatal_error.txt"

# How a corrupt or missing shard shows in pyarrow's and Ray Data's errors: the same on every attempt.
_PERMANENT_DATA_MARKERS = (
    "checksum",
    "parquet magic bytes not found",
    "couldn't deserialize thrift",
    "invalid parquet file",
    "corrupt",
    "no such file",
    "path does not exist",
)


class PermanentError(Exception):
    """A failure that would repeat on every retry (the message says why, in one line)."""


def is_permanent_data_error(exc: BaseException) -> bool:
    """Whether an error raised while reading the dataset names a corrupt or missing shard."""
    text = " ".join(str(e) for e in _chain(exc)).lower()
    return any(marker in text for marker in _PERMANENT_DATA_MARKERS)


def permanent_reason(exc: BaseException) -> str:
    """One line for a permanent error: the project's own message when the chain holds one (a Ray task
    error's `cause` is the remote exception, its `str` a traceback), else the first error's."""
    for e in _chain(exc):
        if isinstance(e, UserError):
            return str(e).splitlines()[0]
    return " ".join(str(exc).split())[:300]


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc`, its causes and contexts, and a Ray task error's remote `cause`."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 10:
        seen.append(current)
        remote = getattr(current, "cause", None)
        current = remote if isinstance(remote, BaseException) else (current.__cause__ or current.__context__)
    return seen


def fatal_url(storage_url: str, run_name: str) -> str:
    """Where a run's permanent error is written: beside its checkpoints."""
    return storage.join(storage_url, run_name, FATAL_FILE)


def record_fatal(url: str, reason: str) -> None:
    storage.write_bytes_atomic(storage.resolve(url), " ".join(reason.split()).encode())


def read_fatal(url: str) -> str | None:
    loc = storage.resolve(url)
    return storage.read_bytes(loc).decode() if storage.exists(loc) else None


def clear_fatal(url: str) -> None:
    """A resubmission starts clean (the data may have been fixed since)."""
    loc = storage.resolve(url)
    try:
        loc.fs.delete_file(loc.path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if storage.exists(loc):
            raise UserError(storage.describe_os_error(loc.url, exc)) from None
