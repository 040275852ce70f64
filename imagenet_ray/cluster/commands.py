"""`imagenet-ray cluster up | down | status | kill-node | drain-node | limit-cpu`: the local multi-host cluster."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from imagenet_ray.cluster import local
from imagenet_ray.errors import UserError

log = logging.getLogger(__name__)


def parse_assignments(items: list[str], what: str) -> dict[str, float]:
    """["decode=2", "train=1"] → {"decode": 2.0, "train": 1.0}; a malformed item is a one-line error."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = float(value)
        except ValueError:
            raise UserError(f"{what} {item!r}: expected GROUP=NUMBER, e.g. decode=2") from None
    return out


def _print_status(state: local.ClusterState) -> bool:
    rows = local.status(state)
    for row in rows:
        labels = ",".join(f"{k}={v}" for k, v in sorted(row["labels"].items()) if not k.startswith("ray.io/"))
        shown = {k: v for k, v in row["resources"].items() if ":" not in k and "memory" not in k}
        resources = ",".join(f"{k}={v:g}" for k, v in sorted(shown.items()))
        where = row["netns"] or "this machine's network"
        limit = "" if row["cpu_limit"] is None else f"  cpu-limit={row['cpu_limit']:g}"
        print(f"{row['host']:<10} {row['address']:<12} {row['ray']:<6} {labels}  {resources}{limit}  ({where})")
    print(f"job API   {state.dashboard_url}   (source {state.root_dir / local.ENV_FILE})")
    return all(r["ray"] == "ALIVE" and r["running"] for r in rows)


def up(
    root: Path,
    manifest: Path,
    replicas: list[str],
    cpus: list[str],
    object_store_mb: int,
    loopback: bool,
    cpu_limit: list[str] | None = None,
) -> int:
    counts = {k: int(v) for k, v in parse_assignments(replicas, "--replicas").items()}
    state = local.up(
        root,
        manifest,
        replicas=counts,
        cpus=parse_assignments(cpus, "--cpus"),
        object_store_bytes=object_store_mb * 2**20,
        use_namespaces=not loopback,
        cpu_limits_by_group=parse_assignments(cpu_limit or [], "--cpu-limit"),
    )
    _print_status(state)
    return 0


def down(root: Path) -> int:
    if not (Path(root) / local.STATE_FILE).exists():
        log.info("no local cluster in %s", root)
        return 0
    local.down(local.ClusterState.load(root))
    log.info("cluster stopped; hosts, namespaces and links removed (logs kept in %s)", Path(root) / "logs")
    return 0


def status(root: Path, as_json: bool) -> int:
    state = local.ClusterState.load(root)
    if as_json:
        rows = local.status(state)
        print(json.dumps(rows, indent=2))
        return 0 if all(r["ray"] == "ALIVE" for r in rows) else 1
    return 0 if _print_status(state) else 1


def kill_node(root: Path, host: str, restart: bool) -> int:
    state = local.ClusterState.load(root)
    left = local.stop_node(state, host)
    if left:
        raise UserError(f"node {host}: pids {', '.join(map(str, left))} survived SIGKILL")
    log.info("killed every process on %s", host)
    if restart:
        local.start_node(state, state.stack(), host)
        log.info("%s restarted and joined the cluster", host)
    state.save()
    return 0


def drain_node(root: Path, host: str, deadline_s: int) -> int:
    node_id = local.drain_node(local.ClusterState.load(root), host, deadline_s)
    log.info("%s: node %s is draining (preempted), to be taken in %d s: kill-node takes it", host, node_id, deadline_s)
    return 0


def limit_cpu(root: Path, host: str, cores: str) -> int:
    try:
        limit = None if cores.strip().lower() == "none" else float(cores)
    except ValueError:
        raise UserError(f"--cores {cores!r}: expected a number of cores (e.g. 0.5) or none") from None
    local.set_cpu_limit(local.ClusterState.load(root), host, limit)
    log.info("%s: CPU limit %s", host, "removed" if limit is None else f"{limit:g} cores")
    return 0
