"""Server processes that outlive the Python process that started them, and stopping them completely.

Each server gets its own session; a pid is trusted only with its start time (pids get reused); a tree
to stop is the leader's session plus every descendant, including jobs Ray starts in new sessions.
Why: docs/architecture.md ("Local services"). Without /proc (macOS) only the process group is signalled.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_PROC = Path("/proc")


@dataclass(frozen=True)
class ProcessRef:
    """A started server: its pid and start time (None where /proc is missing)."""

    pid: int
    start_time: int | None

    def to_dict(self) -> dict[str, int | None]:
        return {"pid": self.pid, "start_time": self.start_time}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProcessRef:
        start = data.get("start_time")
        return cls(int(data["pid"]), None if start is None else int(start))


@dataclass(frozen=True)
class _Stat:
    ppid: int
    sid: int
    state: str
    start_time: int


def _have_proc() -> bool:
    return (_PROC / "self" / "stat").exists()


def _read_stat(pid: int) -> _Stat | None:
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces or ')'.
    rest = raw[raw.rfind(")") + 2 :].split()
    # rest[0] = state (field 3), [1] ppid, [2] pgrp, [3] session, ... [19] starttime (field 22)
    return _Stat(ppid=int(rest[1]), sid=int(rest[3]), state=rest[0], start_time=int(rest[19]))


def _proc_table() -> dict[int, _Stat]:
    table: dict[int, _Stat] = {}
    for name in os.listdir(_PROC):
        if name.isdigit():
            st = _read_stat(int(name))
            if st is not None:
                table[int(name)] = st
    return table


def _live(st: _Stat | None) -> bool:
    return st is not None and st.state not in ("Z", "X", "x")  # zombies are dead, just not yet reaped


def spawn(
    cmd: list[str], *, env: dict[str, str], cwd: Path, log_path: Path
) -> tuple[subprocess.Popen[bytes], ProcessRef]:
    """Start `cmd` in its own session, stdout+stderr appended to `log_path`.

    The command line is written to the log (it never carries secrets: those travel in `env` or in
    files with mode 0600)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
    st = _read_stat(proc.pid) if _have_proc() else None
    return proc, ProcessRef(proc.pid, st.start_time if st else None)


def start_time_of(pid: int) -> int | None:
    st = _read_stat(pid)
    return st.start_time if st else None


def _reap(pid: int) -> None:
    """Collect the exit status if `pid` is our own child (otherwise it stays a zombie until we exit)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def is_alive(ref: ProcessRef) -> bool:
    """The leader process still runs (and is the one we started, not a reused pid)."""
    _reap(ref.pid)
    if not _have_proc():
        try:
            os.kill(ref.pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    st = _read_stat(ref.pid)
    return st is not None and _live(st) and (ref.start_time is None or st.start_time == ref.start_time)


def _family(ref: ProcessRef, table: dict[int, _Stat], known: dict[int, int]) -> dict[int, int]:
    """pid → start time of every live process in the leader's tree (see module docstring)."""
    leader = table.get(ref.pid)
    if leader is not None and ref.start_time is not None and leader.start_time != ref.start_time:
        return {}  # the pid now belongs to an unrelated process: nothing of ours is left
    members = {pid: start for pid, start in known.items() if _live(table.get(pid)) and table[pid].start_time == start}
    for pid, st in table.items():
        if _live(st) and st.sid == ref.pid:
            members[pid] = st.start_time
    grew = True
    while grew:
        grew = False
        for pid, st in table.items():
            if pid not in members and _live(st) and st.ppid in members:
                members[pid] = st.start_time
                grew = True
    return members


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def stop_trees(refs: list[tuple[ProcessRef, float]], kill_wait_s: float = 10.0) -> list[int]:
    """Stop several process trees concurrently and wait until every process in them is gone.

    Each entry is (leader, grace seconds): SIGTERM to the whole tree at once, SIGKILL to whatever is
    left after the grace period, then wait up to `kill_wait_s`. Returns the pids still alive after
    that (empty on success).
    """
    if not refs:
        return []
    if not _have_proc():
        return _stop_groups_fallback(refs, kill_wait_s)
    t0 = time.monotonic()
    known: dict[ProcessRef, dict[int, int]] = {ref: {} for ref, _ in refs}
    sent: dict[ProcessRef, dict[int, set[int]]] = {
        ref: {signal.SIGTERM: set(), signal.SIGKILL: set()} for ref, _ in refs
    }
    deadline = t0 + max(grace for _, grace in refs) + kill_wait_s
    while True:
        table = _proc_table()
        remaining: list[int] = []
        for ref, grace in refs:
            _reap(ref.pid)
            members = _family(ref, table, known[ref])
            known[ref] = members
            sig = signal.SIGTERM if time.monotonic() - t0 < grace else signal.SIGKILL
            for pid in members:
                if pid not in sent[ref][sig]:
                    _signal(pid, sig)
                    sent[ref][sig].add(pid)
            remaining.extend(members)
        if not remaining or time.monotonic() > deadline:
            return sorted(remaining)
        time.sleep(0.1)


def _stop_groups_fallback(refs: list[tuple[ProcessRef, float]], kill_wait_s: float) -> list[int]:
    t0 = time.monotonic()
    for ref, _ in refs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(ref.pid, signal.SIGTERM)
    killed: set[int] = set()
    deadline = t0 + max(grace for _, grace in refs) + kill_wait_s
    while True:
        alive = [ref for ref, _ in refs if is_alive(ref)]
        for ref, grace in refs:
            if ref in alive and ref.pid not in killed and time.monotonic() - t0 >= grace:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(ref.pid, signal.SIGKILL)
                killed.add(ref.pid)
        if not alive or time.monotonic() > deadline:
            return sorted(ref.pid for ref in alive)
        time.sleep(0.1)
