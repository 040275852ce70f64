"""Two `imagenet-ray prepare` processes started at the same time on one output prefix: exactly one runs, the
other refuses with one line naming the prefix and the holder and writes nothing; the output verifies, each
image once, and no lock or temporary file is left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from imagenet_ray.data.format import MANIFEST_NAME
from imagenet_ray.data.prefix_lock import LOCK_NAME
from imagenet_ray.data.verify import verify

pytestmark = pytest.mark.ray
CLI = Path(sys.executable).with_name("imagenet-ray")  # .venv/bin/imagenet-ray


def _start(raw: Path, out: Path, log_dir: Path, name: str) -> tuple[subprocess.Popen[bytes], Path]:
    err = log_dir / f"{name}.err"
    cmd = [str(CLI), "prepare", "--source", str(raw), "--out", str(out), "--shard-mb", "0.5"]
    with open(log_dir / f"{name}.out", "wb") as so, open(err, "wb") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, env={**os.environ, "RAY_ADDRESS": ""})
    return proc, err


def _wait_all(procs: list[subprocess.Popen[bytes]], t0: float, timeout_s: float) -> list[float]:
    """Seconds from `t0` to each process's exit."""
    ended: dict[int, float] = {}
    deadline = time.monotonic() + timeout_s
    while len(ended) < len(procs) and time.monotonic() < deadline:
        for i, p in enumerate(procs):
            if i not in ended and p.poll() is not None:
                ended[i] = time.monotonic() - t0
        time.sleep(0.02)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)
    assert len(ended) == len(procs), "a prepare did not end in time"
    return [ended[i] for i in range(len(procs))]


def test_two_prepares_started_together_one_wins_the_other_refuses(synth_raw, tmp_path):
    raw, summary = synth_raw
    out = tmp_path / "out"
    t0 = time.monotonic()
    started = [_start(raw, out, tmp_path, name) for name in ("a", "b")]
    procs = [p for p, _ in started]
    ended = _wait_all(procs, t0, timeout_s=180)
    codes = [p.returncode for p in procs]
    assert sorted(c == 0 for c in codes) == [False, True], codes
    win, lose = (0, 1) if codes[0] == 0 else (1, 0)
    print(f"\nrace: winner exit 0 after {ended[win]:.1f} s, loser exit {codes[lose]} after {ended[lose]:.1f} s")

    lines = started[lose][1].read_text().strip().splitlines()
    errors = [line for line in lines if line.startswith("imagenet-ray: error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    assert f"error: {out} is being prepared by another prepare (host " in errors[0]
    assert f"pid {procs[win].pid}, since " in errors[0] and "wait for it to finish" in errors[0]
    assert "taken over after 60 s without a heartbeat" in errors[0] and f"delete {out}/{LOCK_NAME}" in errors[0]
    assert "Started a local Ray instance" not in "\n".join(lines)  # refused before listing or starting Ray
    assert ended[lose] < ended[win]

    checked, bad = verify(str(out))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert bad == [] and checked == sum(len(s["shards"]) for s in manifest["splits"].values())
    for split, listed in (("train", summary.train_images), ("val", summary.val_images)):
        keys = [
            k for s in manifest["splits"][split]["shards"] for k in pq.read_table(out / s["path"])["key"].to_pylist()
        ]
        assert len(keys) == len(set(keys)) == listed == manifest["splits"][split]["num_images"], split
    assert not (out / LOCK_NAME).exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
