"""prepare on local Ray: quirks of real data, quarantine, conservation, resume after a kill, verify."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imagenet_ray.data.decode import decode_rgb
from imagenet_ray.data.format import MANIFEST_NAME, RECEIPTS_DIR, REPORT_NAME
from imagenet_ray.data.prepare import PrepareOptions, prepare
from imagenet_ray.data.verify import verify

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]


def _image(mode: str, fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def quirky_raw(synth_raw, tmp_path_factory):
    """The synthetic set plus the kinds of files the real ImageNet holds (or that break downloads)."""
    raw, _ = synth_raw
    root = tmp_path_factory.mktemp("quirky") / "raw"
    shutil.copytree(raw, root)
    train = root / "ILSVRC/Data/CLS-LOC/train"
    wnid = sorted(p.name for p in train.iterdir())[0]
    extra = {
        "cmyk": _image("CMYK", "JPEG"),
        "png_named_jpeg": _image("RGB", "PNG"),
        "truncated": _image("RGB", "JPEG")[:400],
        "zero_byte": b"",
        "text": b"<html>404 Not Found</html>",
    }
    for name, data in extra.items():
        (train / wnid / f"{wnid}_{name}.JPEG").write_bytes(data)
    return root, wnid


def test_quarantine_conversions_and_conservation(local_ray, quirky_raw, tmp_path):
    raw, wnid = quirky_raw
    result = prepare(str(raw), str(tmp_path / "out"), PrepareOptions(shard_mb=0.5, max_quarantine_frac=0.1))
    assert result.ok, result.problems
    train = result.report["splits"]["train"]
    reasons = {q["key"].rsplit("_", 1)[-1].removesuffix(".JPEG"): q["reason"] for q in train["quarantined_files"]}
    assert set(reasons) == {"truncated", "byte", "text"}  # zero_byte → "byte"
    assert "truncated" in reasons["truncated"] and reasons["byte"] == "empty file"
    assert reasons["text"].startswith("not an image")
    assert train["notes"]["cmyk"] == 1 and train["notes"]["png"] == 1
    # input images = written + quarantined, for both splits, no key twice
    for s in result.report["splits"].values():
        assert s["conserved"] and s["listed"] == s["written"] + s["quarantined"]
    rows = [
        r
        for s in result.manifest["splits"]["train"]["shards"]
        for r in pq.read_table(tmp_path / "out" / s["path"]).to_pylist()
    ]
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == train["written"]
    by_name = {r["key"].rsplit("/", 1)[-1]: r for r in rows}
    for name in ("cmyk", "png_named_jpeg"):
        stored = by_name[f"{wnid}_{name}.JPEG"]["image"]
        assert stored[:2] == b"\xff\xd8"  # now a JPEG
        img = Image.open(io.BytesIO(stored))
        assert img.format == "JPEG" and img.mode == "RGB"
    assert json.loads((tmp_path / "out" / REPORT_NAME).read_text())["splits"]["train"]["quarantined"] == 3


def test_quarantine_above_limit_fails_but_writes_the_report(local_ray, quirky_raw, tmp_path):
    raw, _ = quirky_raw
    out = tmp_path / "out"
    result = prepare(str(raw), str(out), PrepareOptions(shard_mb=0.5, max_quarantine_frac=0.001))
    assert not result.ok and "quarantined" in result.problems[0]
    assert (out / REPORT_NAME).exists() and not (out / MANIFEST_NAME).exists()


def test_reencoded_variant_respects_max_side(local_ray, synth_raw, tmp_path):
    raw, _ = synth_raw
    result = prepare(str(raw), str(tmp_path / "small"), PrepareOptions(shard_mb=0.5, max_side=64, quality=85))
    assert result.ok
    assert result.manifest["options"]["max_side"] == 64
    for s in result.manifest["splits"]["val"]["shards"]:
        for r in pq.read_table(tmp_path / "small" / s["path"]).to_pylist():
            img = decode_rgb(r["image"])
            assert max(img.size) == 64 and (r["width"], r["height"]) == img.size


def test_verify_catches_a_corrupted_shard(local_ray, prepared):
    root, manifest = prepared
    checked, bad = verify(str(root))
    assert checked == sum(len(s["shards"]) for s in manifest["splits"].values()) and bad == []
    shard = root / manifest["splits"]["train"]["shards"][1]["path"]
    original = shard.read_bytes()
    try:
        corrupted = bytearray(original)
        corrupted[len(corrupted) // 2] ^= 0xFF
        shard.write_bytes(bytes(corrupted))
        _, bad = verify(str(root))
        assert [b.path for b in bad] == [manifest["splits"]["train"]["shards"][1]["path"]]
        assert "sha256" in bad[0].problem
        done = subprocess.run(
            [sys.executable, "-m", "imagenet_ray", "verify", str(root)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 1 and "shard-00001" in done.stderr.strip().splitlines()[-1]
    finally:
        shard.write_bytes(original)


def test_rerun_with_different_options_is_refused(local_ray, synth_raw, tmp_path):
    raw, _ = synth_raw
    prepare(str(raw), str(tmp_path / "o"), PrepareOptions(shard_mb=0.5))
    from imagenet_ray.errors import UserError

    with pytest.raises(UserError, match="different options"):
        prepare(str(raw), str(tmp_path / "o"), PrepareOptions(shard_mb=0.25))


@pytest.mark.slow
def test_killed_run_resumes_to_identical_output(synth_raw, tmp_path):
    """SIGKILL the prepare CLI mid-run, run it again: missing shards only, same bytes as a clean run."""
    raw, _ = synth_raw
    args = ["--source", str(raw), "--shard-mb", "0.1"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    clean = subprocess.run(
        [sys.executable, "-m", "imagenet_ray", "prepare", *args, "--out", str(tmp_path / "clean")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert clean.returncode == 0, clean.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagenet_ray", "prepare", *args, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    clean_splits = json.loads((tmp_path / "clean" / MANIFEST_NAME).read_text())["splits"]
    total = sum(len(s["shards"]) for s in clean_splits.values())
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        receipts = list((out / RECEIPTS_DIR).rglob("*.json")) if (out / RECEIPTS_DIR).exists() else []
        if len(receipts) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / MANIFEST_NAME).exists(), "killed too late: the run had finished"
    done_before = len(list((out / RECEIPTS_DIR).rglob("*.json")))
    assert done_before > 0

    resumed = subprocess.run(
        [sys.executable, "-m", "imagenet_ray", "prepare", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # Tasks of the killed run may still finish a shard after the kill: at least what we saw is reused.
    import re

    reused = int(re.search(r"(\d+) already done", resumed.stdout).group(1))
    assert done_before <= reused <= total, (done_before, reused, total)

    clean_m = json.loads((tmp_path / "clean" / MANIFEST_NAME).read_text())
    resumed_m = json.loads((out / MANIFEST_NAME).read_text())
    assert clean_m["splits"] == resumed_m["splits"]  # same shards, rows, sizes, SHA-256
    # nothing partial or extra left behind
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet"))
    assert files == sorted(s["path"] for sp in resumed_m["splits"].values() for s in sp["shards"])
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
