"""Errors no retry can heal, and how a run stops on them at once instead of spending its retries.

A worker that meets one writes its reason beside the run's checkpoints (`FATAL_FILE`; in Ray's cluster
store when that storage is what failed); a restarted group finds it and ends before any collective, and
the driver raises it as the job's one-line error. Why Ray Train's retries cannot tell: docs/reliability.md.
"""

from __future__ import annotations

import errno
import logging
import posixpath
import sys
from typing import Any

from imagenet_ray import storage
from imagenet_ray.errors import UserError, describe_error

log = logging.getLogger(__name__)

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


# A full volume or an exhausted quota: a retry seconds later meets the same disk (ENOSPC, EDQUOT).
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_MARKERS = ("no space left on device", "disk quota exceeded", "[errno 28]", "[errno 122]")
KV_NAMESPACE = "imagenet_ray.fatal"  # Ray's cluster key-value store: the record when the storage cannot hold it


class PermanentError(Exception):
    """A failure that would repeat on every retry (the message says why, in one line)."""


def is_permanent_data_error(exc: BaseException) -> bool:
    """Whether an error raised while reading the dataset names a corrupt or missing shard."""
    text = " ".join(str(e) for e in _chain(exc)).lower()
    return any(marker in text for marker in _PERMANENT_DATA_MARKERS)


def is_no_space_error(exc: BaseException) -> bool:
    """Whether `exc` (or a cause, or a Ray task's remote cause) says the disk is full or the quota spent."""
    chain = _chain(exc)
    if any(isinstance(e, OSError) and e.errno in _NO_SPACE_ERRNOS for e in chain):
        return True
    text = " ".join(str(e) for e in chain).lower()
    return any(marker in text for marker in _NO_SPACE_MARKERS)


def run_storage_url(fatal_error_url: str) -> str:
    """The run's checkpoint directory (`<train.storage_path>/<name>`), from its fatal-error URL."""
    return posixpath.dirname(fatal_error_url.rstrip("/"))


def checkpoint_storage_error(
    exc: BaseException, fatal_error_url: str, what: str = "a checkpoint"
) -> PermanentError | None:
    """A PermanentError when writing `what` failed because the checkpoint storage is full (one line naming
    it), else None: `ray.train.report` raises the upload's OSError on rank 0 and Ray Train would retry it
    `train.max_failures` times, each attempt retraining up to an epoch only to meet the same full disk."""
    if not is_no_space_error(exc):
        return None
    where = run_storage_url(fatal_error_url) or fatal_error_url
    return PermanentError(
        f"{where}: no space left on device writing {what} (train.storage_path); the checkpoints before it are "
        f"intact: free space there or grow the volume, then resubmit with the same name to continue from the "
        f"last checkpoint ({describe_error(exc, 160)})"
    )


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


def _cluster_kv() -> Any:
    """Ray's internal key-value store (in the GCS, shared by the driver and every worker of the cluster)
    when this process is connected to Ray, else None. Ray is never imported or started here."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    from ray.experimental import internal_kv

    return internal_kv if internal_kv._internal_kv_initialized() else None


def record_fatal(url: str, reason: str) -> None:
    """Write the reason beside the checkpoints; when that storage cannot take it (full, unreachable), into
    Ray's cluster store under the same URL, which a restarted group and the driver read as well."""
    line = " ".join(reason.split())
    try:
        storage.write_bytes_atomic(storage.resolve(url), line.encode())
    except UserError as exc:
        kv = _cluster_kv()
        if kv is None:
            raise
        kv._internal_kv_put(url, line.encode(), overwrite=True, namespace=KV_NAMESPACE)
        log.warning("%s (recorded in the Ray cluster instead)", exc)


def read_fatal(url: str) -> str | None:
    kv = _cluster_kv()
    kept = kv._internal_kv_get(url, namespace=KV_NAMESPACE) if kv is not None else None
    if kept:
        return bytes(kept).decode()
    loc = storage.resolve(url)
    return storage.read_bytes(loc).decode() if storage.exists(loc) else None


def clear_fatal(url: str) -> None:
    """A resubmission starts clean (the data may have been fixed since)."""
    kv = _cluster_kv()
    if kv is not None:
        kv._internal_kv_del(url, namespace=KV_NAMESPACE)
    loc = storage.resolve(url)
    try:
        loc.fs.delete_file(loc.path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if storage.exists(loc):
            raise UserError(storage.describe_os_error(loc.url, exc)) from None
