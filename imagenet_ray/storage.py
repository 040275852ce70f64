"""URL (`s3://`, `gs://`, `file://`, plain path) → (pyarrow filesystem, path), plus the few file operations
the project needs. Prepare, Ray Data and Ray Train checkpoints all go through `resolve`; S3 endpoint and
credentials come only from the standard AWS environment (docs/architecture.md, "Decisions")."""

from __future__ import annotations

import contextlib
import math
import os
import posixpath
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlparse

import pyarrow.fs as pafs

from imagenet_ray.errors import UserError
from imagenet_ray.redact import redact_text

_REMOTE_SCHEMES = ("s3", "gs", "gcs")
TMP_MARKER = ".tmp-"  # infix of the temporary files behind write_bytes_atomic on local disks


@dataclass(frozen=True)
class Location:
    """A resolved URL: the filesystem to use and the path inside it."""

    url: str
    fs: pafs.FileSystem
    path: str

    def child(self, *parts: str) -> Location:
        return Location(join(self.url, *parts), self.fs, posixpath.join(self.path, *parts))


def is_remote(url: str) -> bool:
    return urlparse(url).scheme in _REMOTE_SCHEMES


def join(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/") if url not in ("/",) else url, *parts)


# Retries and timeouts of every S3 filesystem the project builds (prepare, Ray Data reads, Ray Train's
# checkpoint uploads, evaluate, predict). Before retry n (0-based) the AWS SDK's standard strategy waits
# rand[0, 1) s × 2**n, capped at 20 s: 10 attempts (9 retries) wait 84 s on average, over 50 s in 99% of
# cases (15 s for pyarrow's default of 3), so a storage server away for ~30 s costs a pause, not the job.
S3_MAX_ATTEMPTS_VAR = "IMAGENET_RAY_S3_MAX_ATTEMPTS"
S3_CONNECT_TIMEOUT_VAR = "IMAGENET_RAY_S3_CONNECT_TIMEOUT_S"
S3_REQUEST_TIMEOUT_VAR = "IMAGENET_RAY_S3_REQUEST_TIMEOUT_S"
DEFAULT_S3_MAX_ATTEMPTS = 10
DEFAULT_S3_CONNECT_TIMEOUT_S = 10.0  # the SDK's default is 1 s: a busy endpoint's slow accept is no outage
DEFAULT_S3_REQUEST_TIMEOUT_S = 60.0  # a large shard's part on a slow link (pyarrow applies it on macOS/Windows)


def _env_number(env: Mapping[str, str], name: str, default: float, *, integer: bool) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and (value >= 1 if integer else value > 0)):
        expected = "a whole number of attempts, at least 1" if integer else "a number of seconds above 0"
        raise UserError(f"{name}={raw!r}: expected {expected}")
    return value


def s3_options_from_env(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The `RetryingS3FileSystem` options from `env` (default: os.environ): endpoint, keys and region from
    the standard AWS variables, attempts and timeouts from the IMAGENET_RAY_S3_* ones (UserError if bad)."""
    env = os.environ if env is None else env
    kwargs: dict[str, Any] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs["access_key"] = key
        kwargs["secret_key"] = secret
        if env.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = env["AWS_SESSION_TOKEN"]
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    elif endpoint:
        # A custom endpoint (MinIO, SeaweedFS, ...) has no region to discover.
        kwargs["region"] = "us-east-1"
    kwargs["max_attempts"] = int(_env_number(env, S3_MAX_ATTEMPTS_VAR, DEFAULT_S3_MAX_ATTEMPTS, integer=True))
    kwargs["connect_timeout"] = _env_number(env, S3_CONNECT_TIMEOUT_VAR, DEFAULT_S3_CONNECT_TIMEOUT_S, integer=False)
    kwargs["request_timeout"] = _env_number(env, S3_REQUEST_TIMEOUT_VAR, DEFAULT_S3_REQUEST_TIMEOUT_S, integer=False)
    return kwargs


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem with the AWS standard retry strategy for `max_attempts` attempts, kept when
    pickled: pyarrow's own `__reduce__` drops the retry strategy, so a Ray worker's copy would be back to 3."""

    def __init__(self, *, max_attempts: int = DEFAULT_S3_MAX_ATTEMPTS, **kwargs: Any) -> None:
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts), **kwargs)
        self.max_attempts = max_attempts

    def __reduce__(self) -> tuple[Any, ...]:
        _, (kwargs,) = super().__reduce__()
        return _rebuild_s3, (kwargs, self.max_attempts)


def _rebuild_s3(kwargs: dict[str, Any], max_attempts: int) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(max_attempts=max_attempts, **kwargs)


def s3_filesystem_from_env() -> RetryingS3FileSystem:
    """An S3 filesystem configured from the environment (`s3_options_from_env`).

    With AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY set (a Secret), those keys are used. Without them
    no keys are passed and access is not anonymous, so the AWS SDK's default credential chain finds
    them: AWS_SHARED_CREDENTIALS_FILE / AWS_PROFILE, a web-identity token (AWS_WEB_IDENTITY_TOKEN_FILE
    + AWS_ROLE_ARN: IRSA, workload identity), container or instance metadata. A pickled filesystem
    (Ray workers) carries these options, retries and timeouts included, not resolved credentials: each
    process runs the chain itself.
    """
    return RetryingS3FileSystem(**s3_options_from_env())


def resolve(url: str) -> Location:
    """Map a URL or path to a pyarrow filesystem and a path within it."""
    if not url:
        raise UserError("empty URL")
    parsed = urlparse(url)
    scheme = parsed.scheme
    if scheme in _REMOTE_SCHEMES and "@" in parsed.netloc:  # no bucket name has an '@'
        raise UserError(
            f"{url}: credentials in the URL are not supported; they come from the environment "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the AWS credential chain; Google's for gs://)"
        )
    if scheme == "s3":
        if not parsed.netloc:
            raise UserError(f"{url}: missing bucket name")
        return Location(url, s3_filesystem_from_env(), f"{parsed.netloc}{parsed.path}".rstrip("/"))
    if scheme in ("gs", "gcs"):
        if not parsed.netloc:
            raise UserError(f"{url}: missing bucket name")
        return Location(url, pafs.GcsFileSystem(), f"{parsed.netloc}{parsed.path}".rstrip("/"))
    if scheme == "file":
        path = os.path.abspath(parsed.path)
    elif scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        path = os.path.abspath(url)
    else:
        raise UserError(f"{url}: unsupported URL scheme {scheme!r} (use s3://, gs://, file:// or a path)")
    return Location(path if scheme == "" else url, pafs.LocalFileSystem(), path)


_DENIED_MARKERS = (
    "access_denied",
    "accessdenied",
    "access denied",
    "invalidaccesskeyid",
    "signaturedoesnotmatch",
    "signature_does_not_match",  # the SDK's error-code spelling, e.g. on a write (CreateMultipartUpload)
    "signature we calculated does not match",
    "invalid_access_key_id",
    "http status 403",
    "status code: 403",
    "status code 403",
    "forbidden",
)
_UNREACHABLE_MARKERS = (
    "curlcode: 7",
    "couldn't connect",
    "connection refused",
    "could not connect",
    "failed to connect",
    "network_connection",
)


def _credentials_hint() -> str:
    """Where this process's S3 credentials come from, for an access-denied message (names, never values).

    Follows the SDK chain's order: keys in the environment, then the shared credentials file, then web identity."""
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
    if os.environ.get("AWS_SHARED_CREDENTIALS_FILE"):
        profile = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE") or "default"
        return f"profile {profile!r} in AWS_SHARED_CREDENTIALS_FILE"
    if os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        return "the web identity (AWS_WEB_IDENTITY_TOKEN_FILE / AWS_ROLE_ARN)"
    return "the credentials of the AWS default chain (AWS_ACCESS_KEY_ID, AWS_PROFILE, web identity, instance role)"


def describe_os_error(url: str, exc: BaseException) -> str:
    """Turn a pyarrow/OS error into one readable line naming the URL (URL passwords masked before the cut)."""
    text = " ".join(redact_text(str(exc)).split())
    # Match error codes, not bare numbers: the text includes object keys like ILSVRC2012_val_00000403.JPEG.
    lowered = text.lower().replace(redact_text(url).lower(), "")
    if any(m in lowered for m in _DENIED_MARKERS):
        return f"{url}: access denied by the storage server (check {_credentials_hint()} and the endpoint)"
    if "nosuchbucket" in lowered or "bucket does not exist" in lowered:
        return f"{url}: bucket does not exist"
    if any(m in lowered for m in _UNREACHABLE_MARKERS):
        return f"{url}: cannot connect to the storage endpoint ({text[:160]})"
    return f"{url}: {text[:300]}"


def list_files(loc: Location) -> list[pafs.FileInfo]:
    """All files below `loc` (recursive). Empty list when nothing is there."""
    try:
        info = loc.fs.get_file_info(loc.path)
        if info.type == pafs.FileType.File:
            return [info]
        if info.type == pafs.FileType.NotFound and not is_remote(loc.url):
            return []
        selector = pafs.FileSelector(loc.path, recursive=True, allow_not_found=True)
        return [i for i in loc.fs.get_file_info(selector) if i.type == pafs.FileType.File]
    except OSError as exc:
        raise UserError(describe_os_error(loc.url, exc)) from None


def read_bytes(loc: Location) -> bytes:
    try:
        with loc.fs.open_input_stream(loc.path) as stream:
            return cast(bytes, stream.read())
    except FileNotFoundError:
        raise UserError(f"{loc.url}: not found") from None
    except OSError as exc:
        raise UserError(describe_os_error(loc.url, exc)) from None


def exists(loc: Location) -> bool:
    try:
        return cast(bool, loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound)
    except OSError as exc:
        raise UserError(describe_os_error(loc.url, exc)) from None


def write_bytes_atomic(loc: Location, data: bytes) -> None:
    """Write a whole object so that readers never see a partial one.

    Object stores publish a PUT only once complete; on local disks write a temporary sibling and
    rename it into place.
    """
    try:
        if isinstance(loc.fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(loc.path) or ".", exist_ok=True)
            tmp = f"{loc.path}{TMP_MARKER}{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, loc.path)
            except OSError:
                # A full disk (ENOSPC) leaves the temporary sibling behind, holding what was written.
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
        else:
            with loc.fs.open_output_stream(loc.path) as out:
                out.write(data)
    except OSError as exc:
        raise UserError(describe_os_error(loc.url, exc)) from None


def ensure_dir(loc: Location) -> None:
    """Create a local directory (object stores need none); creates an S3 bucket if missing."""
    try:
        loc.fs.create_dir(loc.path, recursive=True)
    except OSError as exc:
        raise UserError(describe_os_error(loc.url, exc)) from None
