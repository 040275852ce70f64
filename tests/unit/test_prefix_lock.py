"""The output-prefix lock of prepare on a local directory: acquire, refuse, stale and dead-holder takeover,
release only by its owner, heartbeat, threads racing (no Ray)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from imagenet_ray import storage
from imagenet_ray.data import prefix_lock as pl
from imagenet_ray.errors import UserError


def _out(tmp_path: Path) -> storage.Location:
    out = storage.resolve(str(tmp_path / "out"))
    storage.ensure_dir(out)
    return out


def _lock_file(out: storage.Location) -> Path:
    return Path(out.path) / pl.LOCK_NAME


def _plant(out: storage.Location, age_s: float = 0.0, **changes: object) -> dict[str, object]:
    """Put another prepare's lock record at `out` (heartbeat `age_s` old), as that prepare would."""
    now = dt.datetime.now(dt.UTC)
    record = pl.new_record(out.url, "f" * 32, pl.this_pid_space(), now - dt.timedelta(seconds=age_s))
    record.update(changes)
    _lock_file(out).write_bytes(pl.encode(record))
    return record


def _dead_pid() -> tuple[int, int | None]:
    """The pid and start time of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    start = pl.process_start(proc.pid)
    proc.wait(timeout=30)
    return proc.pid, start


def test_acquire_writes_a_record_and_release_deletes_it(tmp_path):
    out = _out(tmp_path)
    lock = pl.acquire(out, lease_s=60)
    record = json.loads(_lock_file(out).read_text())
    assert record["token"] == lock.token and len(record["token"]) == 32
    assert record["host"] == pl.this_pid_space().host and record["pid"] == os.getpid()
    assert record["prefix"] == out.url and record["started"].endswith("Z") and record["heartbeat"].endswith("Z")
    lock.release()
    assert os.listdir(out.path) == []  # no lock, no temporary file


def test_a_live_lock_is_refused_with_one_line_and_nothing_written(tmp_path):
    out = _out(tmp_path)
    held = _plant(out, age_s=3, host="train-7", pid=4242, boot_id="b", pid_ns="n")
    before = sorted(os.listdir(out.path))
    with pytest.raises(UserError) as err:
        pl.acquire(out, lease_s=60)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{out.url} is being prepared by another prepare")
    assert "host train-7, pid 4242" in msg and f"since {held['started']}" in msg and "heartbeat 3 s ago" in msg
    assert "wait for it" in msg and "after 60 s without a heartbeat" in msg and pl.LEASE_VAR in msg
    assert f"delete {out.url}/{pl.LOCK_NAME}" in msg
    assert sorted(os.listdir(out.path)) == before and json.loads(_lock_file(out).read_text()) == held


def test_a_stale_lock_is_taken_over_with_a_log_line(tmp_path, caplog):
    out = _out(tmp_path)
    _plant(out, age_s=90, host="elsewhere", pid=1)
    with caplog.at_level(logging.WARNING, logger=pl.__name__):
        lock = pl.acquire(out, lease_s=60)
    assert json.loads(_lock_file(out).read_text())["token"] == lock.token
    assert "taking over the prepare lock" in caplog.text and "no heartbeat for 90 s" in caplog.text
    lock.release()
    assert not _lock_file(out).exists()


def test_a_dead_pid_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    out = _out(tmp_path)
    pid, start = _dead_pid()
    _plant(out, pid=pid, pid_start=start)
    with caplog.at_level(logging.WARNING, logger=pl.__name__):
        lock = pl.acquire(out, lease_s=60)
    assert f"its pid {pid} is gone on this host" in caplog.text
    lock.release()


def test_a_reused_pid_does_not_keep_a_lock(tmp_path):
    out = _out(tmp_path)
    _plant(out, pid=os.getpid(), pid_start=(pl.process_start(os.getpid()) or 0) + 1)  # same pid, another start
    pl.acquire(out, lease_s=60).release()


@pytest.mark.parametrize("field", ["host", "boot_id", "pid_ns"])
def test_a_dead_pid_elsewhere_waits_for_the_lease(tmp_path, field):
    """Another host, boot or pid namespace (a container with the same host name): the pid means nothing here."""
    out = _out(tmp_path)
    pid, start = _dead_pid()
    _plant(out, pid=pid, pid_start=start, **{field: "other"})
    with pytest.raises(UserError, match="being prepared"):
        pl.acquire(out, lease_s=60)


def test_an_unreadable_lock_is_taken_over(tmp_path):
    out = _out(tmp_path)
    _lock_file(out).write_bytes(b"{not json")
    pl.acquire(out, lease_s=60).release()


def test_release_and_heartbeat_only_while_the_owner(tmp_path):
    out = _out(tmp_path)
    lock = pl.acquire(out, lease_s=60)
    other = _plant(out, host="thief")  # taken over behind our back (we stalled past the lease)
    assert lock.refresh() is False and "host thief" in (lock.lost or "")
    with pytest.raises(UserError, match="lost its lock"):
        lock.ensure_held()
    lock.release()
    assert json.loads(_lock_file(out).read_text()) == other  # not ours: left in place


def test_ensure_held_passes_while_ours(tmp_path):
    out = _out(tmp_path)
    lock = pl.acquire(out, lease_s=60)
    lock.ensure_held()
    assert lock.refresh() and json.loads(_lock_file(out).read_text())["heartbeat"] == lock.record["heartbeat"]
    lock.release()
    assert not _lock_file(out).exists()


def test_the_heartbeat_keeps_a_lock_live_past_its_lease(tmp_path):
    out = _out(tmp_path)
    with pl.hold(out, lease_s=0.4) as lock:  # a beat every 0.1 s
        first = lock.record["heartbeat"]
        time.sleep(0.8)
        assert json.loads(_lock_file(out).read_text())["heartbeat"] != first
        with pytest.raises(UserError, match="being prepared"):
            pl.acquire(out, lease_s=0.4)
    assert not _lock_file(out).exists()


def test_hold_releases_on_failure(tmp_path):
    out = _out(tmp_path)
    with pytest.raises(RuntimeError), pl.hold(out, lease_s=60):
        raise RuntimeError("prepare failed")
    assert os.listdir(out.path) == []


def _race(out: storage.Location, n: int, lease_s: float) -> tuple[list[pl.PrefixLock], list[str]]:
    barrier = threading.Barrier(n)
    won: list[pl.PrefixLock] = []
    refused: list[str] = []

    def attempt() -> None:
        barrier.wait()
        try:
            won.append(pl.acquire(out, lease_s=lease_s))
        except UserError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=attempt) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return won, refused


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale-lock-present"])
def test_threads_racing_exactly_one_wins(tmp_path, stale):
    for round_ in range(10):
        out = storage.resolve(str(tmp_path / f"out{round_}"))
        storage.ensure_dir(out)
        if stale:
            _plant(out, age_s=120, host="gone")
        won, refused = _race(out, 8, lease_s=60)
        assert len(won) == 1 and len(refused) == 7, (round_, refused)
        assert all("being prepared by another prepare" in m for m in refused)
        assert json.loads(_lock_file(out).read_text())["token"] == won[0].token
        won[0].release()
        assert os.listdir(out.path) == []


@pytest.mark.parametrize("raw", ["0", "-1", "nan", "inf", "soon"])
def test_a_bad_lease_is_refused(raw):
    with pytest.raises(UserError, match=pl.LEASE_VAR):
        pl.lease_from_env({pl.LEASE_VAR: raw})


def test_lease_default_and_heartbeat_interval():
    assert pl.lease_from_env({}) == pl.DEFAULT_LEASE_S == 60
    assert pl.lease_from_env({pl.LEASE_VAR: "2.5"}) == 2.5
    assert pl.heartbeat_interval(60) == 15 and pl.heartbeat_interval(2) == 0.5


def test_prepare_refused_by_a_live_lock_writes_nothing(tmp_path):
    """The loser neither writes a plan nor removes the holder's partial files (no Ray needed: it stops first)."""
    from imagenet_ray.data.prepare import prepare
    from imagenet_ray.data.synth import write_synthetic_imagenet

    raw = tmp_path / "raw"
    write_synthetic_imagenet(str(raw), num_classes=2, train_per_class=2, val_per_class=1, seed=0)
    out = _out(tmp_path)
    holder = pl.acquire(out, lease_s=60)
    partial = Path(out.path) / f"train/shard-00000-of-00001.parquet{storage.TMP_MARKER}abc"
    partial.parent.mkdir()
    partial.write_bytes(b"half a shard")
    before = sorted(p.relative_to(out.path).as_posix() for p in Path(out.path).rglob("*"))
    with pytest.raises(UserError, match="^" + re.escape(f"{out.url} is being prepared by another prepare")):
        prepare(str(raw), out.url)
    assert sorted(p.relative_to(out.path).as_posix() for p in Path(out.path).rglob("*")) == before
    holder.release()


def test_hold_output_removes_a_directory_it_made_if_nothing_was_written(tmp_path):
    """A prepare that fails before writing (a bad source) leaves no empty output directory behind."""
    out = tmp_path / "new" / "out"
    with pytest.raises(UserError, match="bad source"), pl.hold_output(str(out), lease_s=60):
        assert (out / pl.LOCK_NAME).exists()
        raise UserError("bad source")
    assert not out.exists()
    (tmp_path / "kept").mkdir()
    with pl.hold_output(str(tmp_path / "kept"), lease_s=60):
        pass
    assert (tmp_path / "kept").is_dir()
