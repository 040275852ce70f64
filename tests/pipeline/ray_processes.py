"""The Ray Train worker processes of this test process's own local Ray, for fault tests to kill."""

from __future__ import annotations

import os
from pathlib import Path


def descendants(root_pid: int) -> list[int]:
    """Pids below `root_pid`, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [root_pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def train_workers() -> list[int]:
    """Ray Train worker processes started under this test process (our own local Ray only)."""
    pids = []
    for pid in descendants(os.getpid()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "RayTrainWorker" in cmd:
            pids.append(pid)
    return pids
