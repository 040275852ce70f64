"""The prepare lock on the real S3 server (SeaweedFS): If-None-Match: * refuses a second create (412),
If-Match guards heartbeat, takeover and delete; threads racing for one prefix, exactly one wins; a prepare
CLI refused by a held lock writes nothing under the prefix."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def s3_prefix(local_stack, monkeypatch):
    from imagenet_ray import storage

    for key, value in local_stack.env().items():
        monkeypatch.setenv(key, value)
    return storage.resolve(f"s3://imagenet/race-{uuid.uuid4().hex[:8]}")


def _keys(prefix) -> list[str]:
    from imagenet_ray import storage

    base = prefix.path + "/"
    return sorted(i.path[len(base) :] for i in storage.list_files(prefix))


def test_conditional_requests_on_seaweedfs(s3_prefix):
    from imagenet_ray.data import prefix_lock as pl

    store = pl.S3Store(s3_prefix.child(pl.LOCK_NAME))
    first = store.create(b"first")
    assert first is not None
    assert store.create(b"second") is None  # If-None-Match: * → 412 PreconditionFailed
    assert store.read() == (b"first", first)
    assert store.replace(b"third", '"0123456789abcdef0123456789abcdef"') is None  # If-Match, wrong ETag → 412
    assert store.delete('"0123456789abcdef0123456789abcdef"') is False and store.read() == (b"first", first)
    second = store.replace(b"fourth", first)
    assert second is not None and second != first and store.read() == (b"fourth", second)
    assert store.delete(first) is False and store.delete(second) is True and store.read() is None


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale-lock-present"])
def test_threads_racing_for_one_s3_prefix_exactly_one_wins(s3_prefix, stale):
    from imagenet_ray import storage
    from imagenet_ray.data import prefix_lock as pl
    from imagenet_ray.errors import UserError

    if stale:  # all take over the same stale lock: If-Match on its ETag lets one through
        old = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=120)
        record = pl.new_record(s3_prefix.url, "a" * 32, pl.PidSpace("gone", "", ""), old)
        storage.write_bytes_atomic(s3_prefix.child(pl.LOCK_NAME), pl.encode(record))
    barrier = threading.Barrier(8)
    won, refused = [], []

    def attempt() -> None:
        barrier.wait()
        try:
            won.append(pl.acquire(s3_prefix, lease_s=60))
        except UserError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(won) == 1 and len(refused) == 7, refused
    assert all(m.startswith(f"{s3_prefix.url} is being prepared by another prepare") for m in refused)
    won[0].release()
    assert not storage.exists(s3_prefix.child(pl.LOCK_NAME))


def test_stale_takeover_and_release_only_by_the_owner_on_s3(s3_prefix):
    from imagenet_ray import storage
    from imagenet_ray.data import prefix_lock as pl

    loc = s3_prefix.child(pl.LOCK_NAME)
    old = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=120)
    storage.write_bytes_atomic(loc, pl.encode(pl.new_record(s3_prefix.url, "a" * 32, pl.PidSpace("gone", "", ""), old)))
    lock = pl.acquire(s3_prefix, lease_s=60)  # stale: taken over with If-Match on the stale ETag
    assert pl.decode(storage.read_bytes(loc))["token"] == lock.token
    assert lock.refresh()
    thief = pl.encode(pl.new_record(s3_prefix.url, "b" * 32, pl.PidSpace("thief", "", ""), dt.datetime.now(dt.UTC)))
    storage.write_bytes_atomic(loc, thief)
    assert lock.refresh() is False and "host thief" in (lock.lost or "")
    lock.release()
    assert storage.read_bytes(loc) == thief  # not ours any more: left in place
    loc.fs.delete_file(loc.path)


def test_prepare_cli_refused_on_s3_writes_nothing(s3_prefix, tmp_path):
    from imagenet_ray.data import prefix_lock as pl
    from imagenet_ray.data.synth import write_synthetic_imagenet

    raw = tmp_path / "raw"
    write_synthetic_imagenet(str(raw), num_classes=2, train_per_class=2, val_per_class=1, seed=0)
    with pl.hold(s3_prefix, lease_s=60) as lock:
        done = subprocess.run(
            [sys.executable, "-m", "imagenet_ray", "prepare", "--source", str(raw), "--out", s3_prefix.url],
            env={**os.environ, "RAY_ADDRESS": ""},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 1, done.stderr[-2000:]
        line = done.stderr.strip().splitlines()[-1]
        assert line.startswith(f"imagenet-ray: error: {s3_prefix.url} is being prepared by another prepare")
        assert f"pid {os.getpid()}" in line
        assert _keys(s3_prefix) == [pl.LOCK_NAME]
        assert pl.decode(lock.store.read()[0])["token"] == lock.token
    assert _keys(s3_prefix) == []
