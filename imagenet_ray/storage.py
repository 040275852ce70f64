"""URL (`s3://`, `gs://`, `file://`, plain path) → (pyarrow filesystem, path), plus the few file operations
the project needs. Prepare, Ray Data and Ray Train checkpoints all go through `resolve`; S3 endpoint and
credentials come only from the standard AWS environment (docs/architecture.md, "Decisions")."""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlparse

import pyarrow.fs as pafs

from imagenet_ray.errors import UserError

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


def s3_filesystem_from_env() -> pafs.S3FileSystem:
    """An S3 filesystem configured from the standard AWS environment variables.

    With AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY set (a Secret), those keys are used. Without them
    no keys are passed and access is not anonymous, so the AWS SDK's default credential chain finds
    them: AWS_SHARED_CREDENTIALS_FILE / AWS_PROFILE, a web-identity token (AWS_WEB_IDENTITY_TOKEN_FILE
    + AWS_ROLE_ARN: IRSA, workload identity), container or instance metadata. A pickled filesystem
    (Ray workers) carries these options, not resolved credentials: each process runs the chain itself.
    """
    kwargs: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs["access_key"] = key
        kwargs["secret_key"] = secret
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    elif endpoint:
        # A custom endpoint (MinIO, SeaweedFS, ...) has no region to discover.
        kwargs["region"] = "us-east-1"
    return pafs.S3FileSystem(**kwargs)


def resolve(url: str) -> Location:
    """Map a URL or path to a pyarrow filesystem and a path within it."""
    if not url:
        raise UserError("empty URL")
    parsed = urlparse(url)
    scheme = parsed.scheme
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
    """Turn a pyarrow/OS error into one readable line naming the URL."""
    text = " ".join(str(exc).split())
    # Match error codes, not bare numbers: the text includes object keys like ILSVRC2012_val_00000403.JPEG.
    lowered = text.lower().replace(url.lower(), "")
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
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, loc.path)
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
