"""CPU limits of the local cluster's hosts, as a kubelet enforces a pod's `limits.cpu`: a CFS quota (100 ms period)
on a cgroup holding every process of the host (cgroup v2 `cpu.max`, else v1's cpu controller). Processes join
as a node starts (children inherit it); the quota can change while they run, like an in-place pod resize
(Ray's CPU count does not follow, as on Kubernetes). See docs/cluster.md.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from imagenet_ray.errors import UserError

PERIOD_US = 100_000  # the kubelet's CFS period
MOUNTS = Path("/proc/mounts")
GROUP_PREFIX = "irc-"  # every cgroup we make: irc-<cluster id>-<host>


@dataclass(frozen=True)
class CpuCgroup:
    """One host's cgroup: its directory and the hierarchy's version (1 or 2)."""

    path: str
    version: int

    @property
    def procs(self) -> Path:
        return Path(self.path) / "cgroup.procs"

    def set_limit(self, cores: float | None) -> None:
        """Quota `cores` CPUs (e.g. 0.25), or None for no limit."""
        if cores is not None and not cores > 0:
            raise UserError(f"a CPU limit must be > 0 cores, got {cores}")
        quota = None if cores is None else max(1_000, math.ceil(cores * PERIOD_US))  # the kernel's minimum: 1 ms
        try:
            if self.version == 2:
                (Path(self.path) / "cpu.max").write_text(f"{'max' if quota is None else quota} {PERIOD_US}\n")
            else:
                (Path(self.path) / "cpu.cfs_period_us").write_text(f"{PERIOD_US}\n")
                (Path(self.path) / "cpu.cfs_quota_us").write_text(f"{-1 if quota is None else quota}\n")
        except OSError as exc:
            raise UserError(f"setting the CPU limit of cgroup {self.path}: {exc.strerror or exc}") from None

    def limit(self) -> float | None:
        """The quota in cores now (None: unlimited)."""
        if self.version == 2:
            quota, period = (Path(self.path) / "cpu.max").read_text().split()
            return None if quota == "max" else int(quota) / int(period)
        quota_us = int((Path(self.path) / "cpu.cfs_quota_us").read_text())
        return None if quota_us < 0 else quota_us / int((Path(self.path) / "cpu.cfs_period_us").read_text())

    def join_prefix(self) -> list[str]:
        """Prefix a command so that its process joins this cgroup before it execs (no fork escapes it)."""
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.procs)]

    def pids(self) -> list[int]:
        with contextlib.suppress(OSError):
            return [int(p) for p in self.procs.read_text().split()]
        return []

    def to_dict(self) -> dict[str, object]:
        return {"path": self.path, "version": self.version}


def _cpu_hierarchy() -> tuple[Path, int] | str:
    """(mount point, version) of the hierarchy that has the cpu controller, or why there is none."""
    if os.geteuid() != 0:
        return "not running as root"
    try:
        mounts = [line.split() for line in MOUNTS.read_text().splitlines()]
    except OSError as exc:
        return f"{MOUNTS}: {exc.strerror}"
    for fields in mounts:
        if len(fields) >= 3 and fields[2] == "cgroup2":
            controllers = Path(fields[1]) / "cgroup.controllers"
            with contextlib.suppress(OSError):
                if "cpu" in controllers.read_text().split():
                    return Path(fields[1]), 2
    for fields in mounts:
        if len(fields) >= 4 and fields[2] == "cgroup" and "cpu" in fields[3].split(","):
            return Path(fields[1]), 1
    return "no cgroup hierarchy with the cpu controller is mounted"


def cgroups_unavailable() -> str | None:
    """Why host CPU limits cannot be enforced here, or None when they can."""
    found = _cpu_hierarchy()
    return found if isinstance(found, str) else None


def create(cluster_id: str, host: str) -> CpuCgroup:
    """A new, unlimited cgroup for one host."""
    found = _cpu_hierarchy()
    if isinstance(found, str):
        raise UserError(f"host CPU limits need a cgroup cpu controller: {found}")
    root, version = found
    if version == 2:  # children of the root get the cpu controller only once it is delegated
        with contextlib.suppress(OSError):
            (root / "cgroup.subtree_control").write_text("+cpu\n")
    path = root / f"{GROUP_PREFIX}{cluster_id}-{host}"
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        raise UserError(f"creating cgroup {path}: {exc.strerror or exc}") from None
    group = CpuCgroup(str(path), version)
    group.set_limit(None)
    return group


def delete(group: CpuCgroup, wait_s: float = 5.0) -> str | None:
    """Remove an (empty) cgroup; what is wrong when it cannot be removed."""
    path = Path(group.path)
    deadline = time.monotonic() + wait_s  # a killed process leaves its cgroup a moment after the signal
    while path.exists():
        try:
            path.rmdir()
        except OSError as exc:
            if time.monotonic() > deadline:
                return f"cgroup {path}: {exc.strerror or exc} (pids {', '.join(map(str, group.pids())) or 'none'})"
            time.sleep(0.1)
    return None


def our_cgroups(cluster_id: str | None = None) -> list[str]:
    """cgroups this project made (all clusters, or one) that still exist."""
    found = _cpu_hierarchy()
    if isinstance(found, str):
        return []
    prefix = GROUP_PREFIX if cluster_id is None else f"{GROUP_PREFIX}{cluster_id}-"
    return sorted(str(p) for p in found[0].iterdir() if p.is_dir() and p.name.startswith(prefix))
