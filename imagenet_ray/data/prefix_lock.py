"""`<out>/_prepare.lock`: one prepare at a time per output prefix. Created only if absent (local: a hard link
of a finished temporary file; s3://: a PUT with If-None-Match: *), refreshed by a heartbeat thread, taken over
once its heartbeat is older than the lease or its pid is gone on this host, deleted only by its holder
(compare-and-swap: the content's digest under a flock locally, the ETag with If-Match on S3).
Why and what it promises: docs/reliability.md ("Two prepares on one prefix")."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import math
import os
import socket
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlparse

import pyarrow.fs as pafs

from imagenet_ray import storage
from imagenet_ray.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = "_prepare.lock"
LEASE_VAR = "IMAGENET_RAY_PREPARE_LOCK_LEASE_S"
DEFAULT_LEASE_S = 60.0
MAX_HEARTBEAT_S = 15.0
ATTEMPTS = 5  # create / take over tries before giving up (each lost only to another prepare's progress)
_REFUSED = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409", "404"})

Record = dict[str, Any]


def lease_from_env(env: Mapping[str, str] | None = None) -> float:
    """Seconds without a heartbeat after which a lock is stale (IMAGENET_RAY_PREPARE_LOCK_LEASE_S, default 60)."""
    raw = (os.environ if env is None else env).get(LEASE_VAR, "").strip()
    if not raw:
        return DEFAULT_LEASE_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{LEASE_VAR}={raw!r}: expected a number of seconds above 0")
    return value


def heartbeat_interval(lease_s: float) -> float:
    """A quarter of the lease, at most 15 s: a holder misses three beats before it can be taken over."""
    return min(MAX_HEARTBEAT_S, lease_s / 4)


@dataclass(frozen=True)
class PidSpace:
    """Where a pid means a process: host name, boot and pid namespace (containers may share a host name)."""

    host: str
    boot_id: str
    pid_ns: str


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def this_pid_space() -> PidSpace:
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    return PidSpace(socket.gethostname(), _read_text("/proc/sys/kernel/random/boot_id"), pid_ns)


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on; None when there is no such process."""
    raw = _read_text(f"/proc/{pid}/stat")
    return raw[raw.rfind(")") + 2 :].split() if raw else None


def process_start(pid: int) -> int | None:
    """Start time of `pid` (clock ticks since boot), None without /proc: pids get reused."""
    stat = _proc_stat(pid)
    return int(stat[19]) if stat else None


def pid_alive(pid: int, start: int | None) -> bool:
    """Whether `pid` is a running process started at `start` (when known), in this pid namespace."""
    if pid <= 0:
        return False
    if os.path.exists("/proc/self/stat"):
        stat = _proc_stat(pid)
        return stat is not None and stat[0] not in ("Z", "X") and (start is None or int(stat[19]) == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _stamp(t: dt.datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_stamp(value: object) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def new_record(prefix: str, token: str, space: PidSpace, now: dt.datetime) -> Record:
    pid = os.getpid()
    return {
        "token": token,
        "prefix": prefix,
        "host": space.host,
        "boot_id": space.boot_id,
        "pid_ns": space.pid_ns,
        "pid": pid,
        "pid_start": process_start(pid),
        "started": _stamp(now),
        "heartbeat": _stamp(now),
    }


def encode(record: Record) -> bytes:
    return json.dumps(record, indent=1).encode()


def decode(data: bytes) -> Record | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def heartbeat_age(record: Mapping[str, Any], now: dt.datetime) -> float | None:
    beat = _parse_stamp(record.get("heartbeat"))
    return None if beat is None else (now - beat).total_seconds()


def _same_pid_space(record: Mapping[str, Any], space: PidSpace) -> bool:
    return (record.get("host"), record.get("boot_id"), record.get("pid_ns")) == (
        space.host,
        space.boot_id,
        space.pid_ns,
    )


def takeover_reason(record: Mapping[str, Any] | None, now: dt.datetime, lease_s: float, space: PidSpace) -> str | None:
    """Why the lock holding `record` may be taken over; None while its holder is live."""
    if record is None:
        return "its content is not a lock record"
    age = heartbeat_age(record, now)
    if age is None:
        return "it has no heartbeat time"
    if age > lease_s:
        return f"no heartbeat for {age:.0f} s (lease {lease_s:g} s, {LEASE_VAR})"
    pid, start = record.get("pid"), record.get("pid_start")
    start = start if isinstance(start, int) else None
    if isinstance(pid, int) and _same_pid_space(record, space) and not pid_alive(pid, start):
        return f"its pid {pid} is gone on this host"
    return None


def refusal_message(prefix: str, lock_url: str, record: Mapping[str, Any], now: dt.datetime, lease_s: float) -> str:
    """The one line a second prepare fails with: the prefix, the holder and what to do."""
    age = heartbeat_age(record, now)
    beat = "unknown" if age is None else f"{max(age, 0.0):.0f} s ago"
    return (
        f"{prefix} is being prepared by another prepare (host {record.get('host')}, pid {record.get('pid')}, "
        f"since {record.get('started')}, last heartbeat {beat}): wait for it to finish; if it died, its lock is "
        f"taken over after {lease_s:g} s without a heartbeat ({LEASE_VAR}), at once from host {record.get('host')}; "
        f"or delete {lock_url} if no prepare runs there"
    )


class Store(Protocol):
    """The lock object: atomic create-if-absent and compare-and-swap by version (returned by every write)."""

    url: str

    def create(self, data: bytes) -> str | None: ...  # the new version, None if the object exists

    def read(self) -> tuple[bytes, str] | None: ...  # (content, version), None if absent

    def replace(self, data: bytes, version: str) -> str | None: ...  # None if not at `version` any more

    def delete(self, version: str) -> bool: ...  # False if not at `version` any more


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FsStore:
    """Any other pyarrow filesystem (gs:// today): no conditional create, so check-then-write (best effort)."""

    def __init__(self, loc: storage.Location) -> None:
        self.loc, self.url = loc, loc.url

    def create(self, data: bytes) -> str | None:
        if storage.exists(self.loc):
            return None
        storage.write_bytes_atomic(self.loc, data)
        return _digest(data)

    def read(self) -> tuple[bytes, str] | None:
        try:
            with self.loc.fs.open_input_stream(self.loc.path) as stream:
                data = bytes(stream.read())
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UserError(storage.describe_os_error(self.url, exc)) from None
        return data, _digest(data)

    def replace(self, data: bytes, version: str) -> str | None:
        with self._guard():
            current = self.read()
            if current is None or current[1] != version:
                return None
            storage.write_bytes_atomic(self.loc, data)
            return _digest(data)

    def delete(self, version: str) -> bool:
        with self._guard():
            current = self.read()
            if current is None or current[1] != version:
                return False
            self.loc.fs.delete_file(self.loc.path)
            return True

    def _guard(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class LocalStore(FsStore):
    """A local (or NFS) directory: create = hard link of a complete temporary file (fails if the lock exists,
    never shows a partial one); compare-and-swap steps serialised by a flock on the directory."""

    def create(self, data: bytes) -> str | None:
        tmp = f"{self.loc.path}{storage.TMP_MARKER}{uuid.uuid4().hex}"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, self.loc.path)
        except FileExistsError:
            return None
        except FileNotFoundError:  # the holder's start removed our temporary file: look at its lock
            return None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return _digest(data)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        fd = os.open(os.path.dirname(self.loc.path), os.O_RDONLY)
        try:
            with contextlib.suppress(OSError):  # no flock on this filesystem: check-then-act, as FsStore
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock (also when this process dies)


def _s3_client() -> Any:  # a boto3 S3 client configured like the project's pyarrow S3 filesystems
    import boto3.session
    from botocore.config import Config

    opts = storage.s3_options_from_env()
    kwargs: dict[str, Any] = {"region_name": opts.get("region")}
    if "endpoint_override" in opts:
        kwargs["endpoint_url"] = f"{opts['scheme']}://{opts['endpoint_override']}"
    if "access_key" in opts:
        kwargs["aws_access_key_id"], kwargs["aws_secret_access_key"] = opts["access_key"], opts["secret_key"]
        kwargs["aws_session_token"] = opts.get("session_token")
    config = Config(
        connect_timeout=opts["connect_timeout"],
        read_timeout=opts["request_timeout"],
        retries={"mode": "standard", "max_attempts": opts["max_attempts"]},
        s3={"addressing_style": "path" if "endpoint_override" in opts else "auto"},
    )
    # A session per client: boto3's default session is not safe to use from several threads.
    return boto3.session.Session().client("s3", config=config, **kwargs)


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class S3Store:
    """An S3 object written with boto3's conditional requests (pyarrow's S3FileSystem sends no If-None-Match):
    create with If-None-Match: *, heartbeat and takeover with If-Match: <ETag>, delete with If-Match."""

    def __init__(self, loc: storage.Location, client: Any | None = None) -> None:
        self.loc, self.url = loc, loc.url
        self.bucket, _, self.key = loc.path.partition("/")
        self.client = _s3_client() if client is None else client

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def read(self) -> tuple[bytes, str] | None:
        try:
            got = self._call("get_object")
        except _Refused:
            return None
        return bytes(got["Body"].read()), str(got["ETag"])

    def replace(self, data: bytes, version: str) -> str | None:
        return self._put(data, IfMatch=version)

    def delete(self, version: str) -> bool:
        try:
            self._call("delete_object", IfMatch=version)
        except _Refused:
            return False
        except _Unsupported:  # a server without conditional deletes: compare, then delete
            current = self.read()
            if current is None or current[1] != version:
                return False
            self._call("delete_object")
        return True

    def _put(self, data: bytes, **condition: str) -> str | None:
        try:
            return str(self._call("put_object", Body=data, **condition)["ETag"])
        except _Refused:
            return None

    def _call(self, method: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, method)(Bucket=self.bucket, Key=self.key, **kwargs)
        except ClientError as exc:
            if _error_code(exc) in _REFUSED:
                raise _Refused from None
            if _error_code(exc) in ("NotImplemented", "501"):
                raise _Unsupported from None
            raise UserError(storage.describe_os_error(self.url, exc)) from None
        except BotoCoreError as exc:
            raise UserError(storage.describe_os_error(self.url, exc)) from None


class _Refused(Exception):
    """A condition did not hold (412, 409) or the object is absent (404)."""


class _Unsupported(Exception):
    """The server does not implement the request's condition (501)."""


def store_for(loc: storage.Location) -> Store:
    if isinstance(loc.fs, pafs.LocalFileSystem):
        return LocalStore(loc)
    if urlparse(loc.url).scheme == "s3":
        return S3Store(loc)
    log.warning("%s: this storage has no conditional create here: the prepare lock is best effort", loc.url)
    return FsStore(loc)


class PrefixLock:
    """A held lock: `start_heartbeat` refreshes it from a daemon thread; `release` deletes it only while ours."""

    def __init__(self, prefix: str, store: Store, record: Record, version: str, lease_s: float) -> None:
        self.prefix, self.store, self.record, self.version, self.lease_s = prefix, store, record, version, lease_s
        self.lost: str | None = None
        self._stop, self._mutex = threading.Event(), threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def token(self) -> str:
        return str(self.record["token"])

    def start_heartbeat(self, every_s: float) -> None:
        self._thread = threading.Thread(target=self._beat, args=(every_s,), name="prepare-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                if not self.refresh():
                    return
            except Exception as exc:  # a storage hiccup: the lease outlasts a few missed beats
                log.warning("prepare lock %s: heartbeat failed (%s), next try in %.0f s", self.store.url, exc, every_s)

    def refresh(self) -> bool:
        """Write a new heartbeat while the lock is ours; False (and `lost` set) once another prepare holds it."""
        with self._mutex:
            record = {**self.record, "heartbeat": _stamp(_utc_now())}
            version = self.store.replace(encode(record), self.version)
            if version is None:
                return self._reread_own()  # e.g. a retried write whose first attempt had landed
            self.record, self.version = record, version
            return True

    def _reread_own(self) -> bool:
        current = self.store.read()
        held = decode(current[0]) if current else None
        if current is None or held is None or held.get("token") != self.token:
            who = "nobody" if held is None else f"host {held.get('host')}, pid {held.get('pid')}"
            self.lost = f"{self.store.url} is now held by {who}"
            log.error("prepare lock lost: %s; this prepare will not write its manifest", self.lost)
            return False
        self.record, self.version = held, current[1]
        return True

    def ensure_held(self) -> None:
        """UserError unless the lock is still ours (checked before the report and manifest are written)."""
        with self._mutex:
            if self.lost is None:
                self._reread_own()
        if self.lost is not None:
            raise UserError(
                f"{self.prefix}: this prepare lost its lock ({self.lost}), so it leaves the output unfinished; "
                "run it again once no other prepare writes there"
            )

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still ours (never raises: runs in `finally`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.lost is not None:
            return
        try:
            with self._mutex:
                deleted = self.store.delete(self.version)
            if not deleted:
                log.warning("prepare lock %s changed hands before release: left in place", self.store.url)
        except Exception as exc:
            log.warning("prepare lock %s not deleted (%s): taken over after %g s", self.store.url, exc, self.lease_s)


def _take_over(out_url: str, store: Store, current: tuple[bytes, str], mine: Record, lease_s: float) -> str | None:
    """The new version if the lock at `current` is ours or may be taken over and we did; UserError if live."""
    data, version = current
    held, now = decode(data), _utc_now()
    if held is not None and held.get("token") == mine["token"]:
        return version  # our create had landed (a retried request saw its own object)
    reason = takeover_reason(held, now, lease_s, this_pid_space())
    if reason is None:
        raise UserError(refusal_message(out_url, store.url, held or {}, now, lease_s))
    who = "unknown" if held is None else f"host {held.get('host')}, pid {held.get('pid')}"
    log.warning("taking over the prepare lock %s (%s): %s", store.url, who, reason)
    return store.replace(encode(mine), version)


def acquire(out: storage.Location, lease_s: float | None = None, store: Store | None = None) -> PrefixLock:
    """Take `<out>/_prepare.lock`: create it, or take over a stale or dead holder's; UserError if one is live."""
    lease = lease_from_env() if lease_s is None else lease_s
    store = store_for(out.child(LOCK_NAME)) if store is None else store
    record = new_record(out.url, uuid.uuid4().hex, this_pid_space(), _utc_now())
    for _ in range(ATTEMPTS):
        version = store.create(encode(record))
        current = None if version is not None else store.read()
        if current is not None:
            version = _take_over(out.url, store, current, record, lease)
        if version is not None:
            log.info("holding the prepare lock %s (lease %g s)", store.url, lease)
            return PrefixLock(out.url, store, record, version, lease)
    raise UserError(f"{out.url}: could not take the prepare lock {store.url} in {ATTEMPTS} tries; try again")


@contextlib.contextmanager
def hold(out: storage.Location, lease_s: float | None = None) -> Iterator[PrefixLock]:
    """`acquire`, heartbeat while the body runs, `release` afterwards (success or failure)."""
    lock = acquire(out, lease_s)
    lock.start_heartbeat(heartbeat_interval(lock.lease_s))
    try:
        yield lock
    finally:
        lock.release()


@contextlib.contextmanager
def hold_output(out_url: str, lease_s: float | None = None) -> Iterator[PrefixLock]:
    """`hold` the prefix `out_url`; a local directory made for the lock is removed again if it stays empty."""
    out = storage.resolve(out_url)
    local = not storage.is_remote(out.url)
    created = local and not storage.exists(out)
    if local:
        storage.ensure_dir(out)
    try:
        with hold(out, lease_s) as lock:
            yield lock
    finally:
        if created:
            with contextlib.suppress(OSError):  # not empty: something was prepared there
                os.rmdir(out.path)
