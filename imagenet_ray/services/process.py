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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

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


def in_netns(cmd: list[str], netns: str | None) -> list[str]:
    """`cmd` run inside the network namespace `netns` (unchanged for None). `ip netns exec` execs the
    command after entering the namespace, so the pid, session and signals stay the command's."""
    return ["ip", "netns", "exec", netns, *cmd] if netns else list(cmd)


def _log_header(log: IO[bytes], cmd: list[str]) -> None:
    log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
    log.flush()


def spawn(
    cmd: list[str],
    *,
    env: dict[str, str],
    cwd: Path,
    log_path: Path,
    pass_fds: tuple[int, ...] = (),
    netns: str | None = None,
) -> tuple[subprocess.Popen[bytes], ProcessRef]:
    """Start `cmd` (inside `netns` if given) in its own session, stdout+stderr appended to `log_path`.

    The command line is written to the log (it never carries secrets: those travel in `env` or in
    files with mode 0600)."""
    cmd = in_netns(cmd, netns)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        _log_header(log, cmd)
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
            pass_fds=pass_fds,  # e.g. listening sockets handed over (the cluster gateway)
        )
    st = _read_stat(proc.pid) if _have_proc() else None
    return proc, ProcessRef(proc.pid, st.start_time if st else None)


def run_logged(cmd: list[str], *, env: dict[str, str], cwd: Path, log_path: Path, timeout_s: float) -> int:
    """Run a one-off command (e.g. initdb) to completion, logged like `spawn`; returns its exit code."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        _log_header(log, cmd)
        done = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, timeout=timeout_s
        )
    return done.returncode


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


def stop_trees(
    refs: list[tuple[ProcessRef, float]],
    kill_wait_s: float = 10.0,
    leader_signals: Mapping[ProcessRef, int] | None = None,
) -> list[int]:
    """Stop several process trees concurrently and wait until every process in them is gone.

    Each entry is (leader, grace seconds): SIGTERM to the whole tree at once, SIGKILL to whatever is
    left after the grace period, then wait up to `kill_wait_s`. A tree in `leader_signals` gets that
    signal at its leader only (a server that stops its own children, e.g. PostgreSQL's SIGINT). Returns
    the pids still alive after that (empty on success).
    """
    if not refs:
        return []
    first = dict(leader_signals or {})
    if not _have_proc():
        return _stop_groups_fallback(refs, kill_wait_s, first)
    t0 = time.monotonic()
    known: dict[ProcessRef, dict[int, int]] = {ref: {} for ref, _ in refs}
    sent: dict[ProcessRef, set[tuple[int, int]]] = {ref: set() for ref, _ in refs}  # (pid, signal)
    deadline = t0 + max(grace for _, grace in refs) + kill_wait_s
    while True:
        table = _proc_table()
        remaining: list[int] = []
        for ref, grace in refs:
            _reap(ref.pid)
            members = _family(ref, table, known[ref])
            known[ref] = members
            killing = time.monotonic() - t0 >= grace
            sig = signal.SIGKILL if killing else first.get(ref, signal.SIGTERM)
            targets = [pid for pid in members if killing or ref not in first or pid == ref.pid]
            for pid in targets:
                if (pid, sig) not in sent[ref]:
                    _signal(pid, sig)
                    sent[ref].add((pid, sig))
            remaining.extend(members)
        if not remaining or time.monotonic() > deadline:
            return sorted(remaining)
        time.sleep(0.1)


def _stop_groups_fallback(
    refs: list[tuple[ProcessRef, float]], kill_wait_s: float, first: dict[ProcessRef, int]
) -> list[int]:
    t0 = time.monotonic()
    for ref, _ in refs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if ref in first:
                os.kill(ref.pid, first[ref])
            else:
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
