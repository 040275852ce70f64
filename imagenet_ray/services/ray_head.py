"""A Ray head node (`ray start --head --block`) on bind_host (default 127.0.0.1) that jobs are submitted to.

Every port explicit, its own short temp dir (an unrelated `ray.init()` never attaches to it), token auth
with a per-stack token, and the stack's AWS_*/MLFLOW_* variables in every job's environment. Why each
choice: docs/architecture.md ("Local services").
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

from imagenet_ray.services.state import StackState

NAME = "ray"
TITLE = "Ray head"
PORTS: tuple[str, ...] = (
    "gcs",
    "dashboard",
    "client_server",
    "dashboard_agent_http",
    "dashboard_agent_grpc",
    "runtime_env_agent",
    "metrics_export",
    "object_manager",
    "node_manager",
    "autoscaler_metrics",
    "dashboard_metrics",
)
STARTUP_TIMEOUT_S = 60.0
# Ray keeps no durable state here, and a graceful GCS stop waits for an agent that is already gone.
STOP_GRACE_S = 5.0
STOP_SIGNAL: int | None = None  # SIGTERM to the tree
START_AFTER: tuple[str, ...] = ()


def default_num_cpus() -> int:
    # More logical CPUs than cores: jobs are small and mostly wait on I/O (and 2-core CI needs
    # room for a job's driver, Ray Data tasks and 2 training workers at once).
    return max(4, 2 * (os.cpu_count() or 1))


def temp_dir(stack: StackState) -> Path:
    """Short on purpose: Ray's unix sockets live below it (path limit 107 bytes)."""
    base = Path("/tmp") if Path("/tmp").is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))
    return base / f"irray-{stack.ports['gcs']}"


def _cli() -> list[str]:
    beside = Path(sys.executable).with_name("ray")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("ray")
    return [found] if found else [sys.executable, "-m", "ray.scripts.scripts"]


def prepare(stack: StackState) -> None:
    # A directory left by a crashed head on the same (now free) port is stale.
    shutil.rmtree(temp_dir(stack), ignore_errors=True)


def command(stack: StackState) -> list[str]:
    p = stack.bind_port
    # --block as our child in its own session: stopping is signalling its tree, never `ray stop`
    # (which stops every Ray on the machine). Worker ports 0/0: the OS picks one per worker.
    return [
        *_cli(),
        "start",
        "--head",
        "--block",
        f"--node-ip-address={stack.peer_host}",
        f"--port={p('gcs')}",
        "--include-dashboard=true",
        f"--dashboard-host={stack.bind_host}",
        f"--dashboard-port={p('dashboard')}",
        f"--ray-client-server-port={p('client_server')}",
        f"--dashboard-agent-listen-port={p('dashboard_agent_http')}",
        f"--dashboard-agent-grpc-port={p('dashboard_agent_grpc')}",
        f"--runtime-env-agent-port={p('runtime_env_agent')}",
        f"--metrics-export-port={p('metrics_export')}",
        f"--object-manager-port={p('object_manager')}",
        f"--node-manager-port={p('node_manager')}",
        "--min-worker-port=0",
        "--max-worker-port=0",
        f"--num-cpus={stack.ray_num_cpus}",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir(stack)}",
    ]


def environ(stack: StackState, base: dict[str, str]) -> dict[str, str]:
    env = {**base, **stack.server_env()}
    env.pop("RAY_ADDRESS")  # the job supervisor sets it (to the GCS) for each job's driver
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, *(d for d in env.get("PATH", "").split(os.pathsep) if d and d != bin_dir)])
    env.update(
        {
            # Keeps --node-ip-address=127.0.0.1 (Ray would otherwise listen on the machine's address).
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "AUTOSCALER_METRIC_PORT": str(stack.bind_port("autoscaler_metrics")),
            "DASHBOARD_METRIC_PORT": str(stack.bind_port("dashboard_metrics")),
        }
    )
    return env


def cwd(stack: StackState) -> Path:
    return stack.root_dir


def healthy(stack: StackState) -> bool:
    """The job API answers (authenticated) and the head node is ALIVE in the GCS.

    The node check matters: the dashboard answers before the raylet is up, and a raylet whose agent
    fails exits only after it registered."""
    import json
    import urllib.request

    def get(path: str) -> tuple[int, bytes]:
        req = urllib.request.Request(f"{stack.dashboard_url}{path}", headers=stack.ray_auth_headers())
        with urllib.request.urlopen(req, timeout=3) as resp:
            return int(resp.status), bytes(resp.read())

    try:
        status, _ = get("/api/jobs/")
        if status != 200:
            return False
        status, body = get("/api/v0/nodes")
        nodes = json.loads(body)["data"]["result"]["result"]
        return status == 200 and any(n.get("state") == "ALIVE" for n in nodes)
    except Exception:
        return False


def after_start(stack: StackState) -> None:
    pass


def diagnostics(stack: StackState) -> str:
    """Tails of the session's error logs (agents, raylet): why a head died is rarely in ray.log."""
    logs = temp_dir(stack) / "session_latest" / "logs"
    parts = []
    for path in sorted(logs.glob("*.err")) + sorted(logs.glob("*agent*.log")):
        with contextlib.suppress(OSError):
            parts.append(path.read_bytes()[-16384:].decode(errors="replace"))
    return "\n".join(parts)


def url(stack: StackState) -> str:
    return f"{stack.dashboard_url} (GCS {stack.ray_gcs_address})"


def cleanup(stack: StackState) -> None:
    """Keep the session's logs (job drivers, raylet, agents) under root_dir/logs/ray-session, replacing
    the previous copy, then remove the temp dir."""
    keep_session_logs(temp_dir(stack), stack.logs_dir / "ray-session")
    shutil.rmtree(temp_dir(stack), ignore_errors=True)


def keep_session_logs(ray_temp_dir: Path, dest: Path) -> None:
    """Copy a Ray temp dir's latest session logs to `dest` (replacing it), without sockets or events."""
    session_logs = ray_temp_dir / "session_latest" / "logs"
    if session_logs.is_dir():
        shutil.rmtree(dest, ignore_errors=True)
        with contextlib.suppress(OSError, shutil.Error):  # best effort: logs must never keep a stop from finishing
            shutil.copytree(
                session_logs,
                dest,
                symlinks=True,
                ignore_dangling_symlinks=True,
                ignore=shutil.ignore_patterns("*.sock", "events", "export_events"),
            )
