"""A Ray head node (`ray start --head --block`) that jobs are submitted to.

Choices, and why:
- `--block` as our child in its own session: the process lives as long as the cluster, so stopping is
  signalling its tree (see process.py), never `ray stop` (which would stop every Ray on the machine).
- a dedicated short `--temp-dir` (/tmp/irray-<gcs port>): Ray records "the current cluster" in
  <temp dir>/ray_current_cluster, and a plain `ray.init()` elsewhere looks in /tmp/ray; with our own
  temp dir an unrelated `ray.init()` starts its own instance instead of attaching to this one. It
  must be short because Ray's unix sockets live below it (path limit 107 bytes).
- every port explicit (GCS, dashboard, client server, dashboard agent http/grpc, runtime-env agent,
  metrics export, object manager, node manager, and the autoscaler/dashboard Prometheus ports that
  only have env overrides): Ray's defaults are fixed numbers that a second cluster would collide on.
  Worker ports: `--min-worker-port=0 --max-worker-port=0` lets the OS pick a free port per worker.
- RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray use 127.0.0.1 as the node address (otherwise it
  replaces `--node-ip-address=127.0.0.1` with the machine's address, and GCS/raylet/workers listen
  on all interfaces). It only also disables adding more nodes, which a local head never does.
- token authentication with a per-stack token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN): Ray 2.60 turns
  token auth on by itself whenever ~/.ray/auth_token exists, so the mode is set explicitly either
  way; the token goes to clients through `LocalStack.env()` (env.sh) or `LocalStack.ray_auth_headers()`.
- the stack's AWS_* / MLFLOW_* variables are in the head's environment, so every job and worker can
  reach S3 and MLflow without secrets in a runtime_env; PATH starts with this Python's bin directory
  so a job's `python` is this environment's.
- `--disable-usage-stats` (and RAY_USAGE_STATS_ENABLED=0): no reporting.
Ray has no durable state here, so after STOP_GRACE_S the tree is SIGKILLed (a graceful GCS stop
waits ~30 s for a metrics agent that is already gone). The session's logs are copied to
root_dir/logs/ray-session before the temp dir is removed.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from imagenet_ray.services.ports import LOCALHOST

if TYPE_CHECKING:
    from imagenet_ray.services.stack import LocalStack

NAME = "ray"
TITLE = "Ray head"
PORTS = ("gcs", "dashboard", "client_server", "dashboard_agent_http", "dashboard_agent_grpc",
         "runtime_env_agent", "metrics_export", "object_manager", "node_manager",
         "autoscaler_metrics", "dashboard_metrics")
STARTUP_TIMEOUT_S = 60.0
STOP_GRACE_S = 5.0


def default_num_cpus() -> int:
    # More logical CPUs than cores: jobs are small and mostly wait on I/O (and 2-core CI needs
    # room for a job's driver, Ray Data tasks and 2 training workers at once).
    return max(4, 2 * (os.cpu_count() or 1))


def temp_dir(stack: "LocalStack") -> Path:
    base = Path("/tmp") if Path("/tmp").is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))
    return base / f"irray-{stack.ports['gcs']}"


def _cli() -> list[str]:
    beside = Path(sys.executable).with_name("ray")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("ray")
    return [found] if found else [sys.executable, "-m", "ray.scripts.scripts"]


def prepare(stack: "LocalStack") -> None:
    # A directory left by a crashed head on the same (now free) port is stale.
    shutil.rmtree(temp_dir(stack), ignore_errors=True)


def command(stack: "LocalStack") -> list[str]:
    p = stack.ports
    return [
        *_cli(), "start", "--head", "--block",
        f"--node-ip-address={LOCALHOST}", f"--port={p['gcs']}",
        "--include-dashboard=true", f"--dashboard-host={LOCALHOST}", f"--dashboard-port={p['dashboard']}",
        f"--ray-client-server-port={p['client_server']}",
        f"--dashboard-agent-listen-port={p['dashboard_agent_http']}",
        f"--dashboard-agent-grpc-port={p['dashboard_agent_grpc']}",
        f"--runtime-env-agent-port={p['runtime_env_agent']}",
        f"--metrics-export-port={p['metrics_export']}",
        f"--object-manager-port={p['object_manager']}", f"--node-manager-port={p['node_manager']}",
        "--min-worker-port=0", "--max-worker-port=0",
        f"--num-cpus={stack.ray_num_cpus}",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir(stack)}",
    ]


def environ(stack: "LocalStack", base: dict[str, str]) -> dict[str, str]:
    env = {**base, **stack.env()}
    env.pop("RAY_ADDRESS")  # the job supervisor sets it (to the GCS) for each job's driver
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, *(d for d in env.get("PATH", "").split(os.pathsep) if d and d != bin_dir)])
    env.update({
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "AUTOSCALER_METRIC_PORT": str(stack.ports["autoscaler_metrics"]),
        "DASHBOARD_METRIC_PORT": str(stack.ports["dashboard_metrics"]),
    })
    return env


def cwd(stack: "LocalStack") -> Path:
    return stack.root_dir


def healthy(stack: "LocalStack") -> bool:
    """The job API answers (authenticated) and the head node is ALIVE in the GCS.

    The node check matters: the dashboard answers before the raylet is up, and a raylet whose agent
    fails exits only after it registered."""
    import json
    import urllib.request

    def get(path: str):
        req = urllib.request.Request(f"{stack.dashboard_url}{path}", headers=stack.ray_auth_headers())
        with urllib.request.urlopen(req, timeout=3) as resp:
            return resp.status, resp.read()

    try:
        status, _ = get("/api/jobs/")
        if status != 200:
            return False
        status, body = get("/api/v0/nodes")
        nodes = json.loads(body)["data"]["result"]["result"]
        return status == 200 and any(n.get("state") == "ALIVE" for n in nodes)
    except Exception:
        return False


def after_start(stack: "LocalStack") -> None:
    pass


def diagnostics(stack: "LocalStack") -> str:
    """Tails of the session's error logs (agents, raylet): why a head died is rarely in ray.log."""
    logs = temp_dir(stack) / "session_latest" / "logs"
    parts = []
    for path in sorted(logs.glob("*.err")) + sorted(logs.glob("*agent*.log")):
        try:
            parts.append(path.read_bytes()[-16384:].decode(errors="replace"))
        except OSError:
            pass
    return "\n".join(parts)


def url(stack: "LocalStack") -> str:
    return f"{stack.dashboard_url} (GCS {stack.ray_gcs_address})"


def cleanup(stack: "LocalStack") -> None:
    """Keep the session's logs (job drivers, raylet, agents) under root_dir/logs/ray-session, replacing
    the previous copy, then remove the temp dir."""
    session_logs = temp_dir(stack) / "session_latest" / "logs"
    if session_logs.is_dir():
        dest = stack.logs_dir / "ray-session"
        shutil.rmtree(dest, ignore_errors=True)
        try:
            shutil.copytree(session_logs, dest, symlinks=True, ignore_dangling_symlinks=True,
                            ignore=shutil.ignore_patterns("*.sock", "events", "export_events"))
        except (OSError, shutil.Error):
            pass  # best effort: logs must never keep a stop from finishing
    shutil.rmtree(temp_dir(stack), ignore_errors=True)
