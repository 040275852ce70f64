"""`imagenet-ray bench prepare`: prepare throughput against a plain copy of the same bytes.

Lays a folder of JPEGs out as class folders and measures a plain copy (the floor), the real prepare job
on a local Ray, and per-image costs of read, decode check and Parquet encoding on one core; locally and,
with `--s3`, from/to an S3 server (AWS_ENDPOINT_URL, or a SeaweedFS started for the run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagenet_ray.errors import ConfigError
from imagenet_ray.runtime import start_local_ray

if TYPE_CHECKING:
    import pyarrow.fs as pafs

_WNID = re.compile(r"^(n\d{8})")


def build_folder_layout(images_dir: Path, out: Path, limit: int | None = None) -> int:
    """Class-folder layout of the JPEGs in `images_dir`; returns the image count."""
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))[:limit]
    for i, path in enumerate(files):
        m = _WNID.match(path.name)
        wnid = m.group(1) if m else f"n{i % 10:08d}"
        # Every image in train; every 10th also in val (the sample set has one image per class, and a
        # val class must exist in train).
        for split in ("train", "val") if i % 10 == 9 else ("train",):
            dest = out / split / wnid / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
    return sum(1 for _ in out.rglob("*") if _.is_file())


def plain_copy(src_url: str, dst_url: str, threads: int) -> dict[str, Any]:
    """Read every object under src and write it under dst (the same bytes, no decoding)."""
    from imagenet_ray import storage

    src, dst = storage.resolve(src_url), storage.resolve(dst_url)
    infos = storage.list_files(src)
    base = src.path.rstrip("/") + "/"
    start = time.perf_counter()

    def copy(info: pafs.FileInfo) -> int:
        data = storage.read_bytes(storage.Location(src.url, src.fs, info.path))
        storage.write_bytes_atomic(dst.child(info.path[len(base) :]), data)
        return len(data)

    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(copy, infos))
    seconds = time.perf_counter() - start
    return {
        "images": len(infos),
        "bytes": total,
        "seconds": seconds,
        "images_per_s": len(infos) / seconds,
        "mb_per_s": total / seconds / 2**20,
    }


def run_prepare(src_url: str, out_url: str, cpus: int) -> dict[str, Any]:
    from imagenet_ray.data.prepare import PrepareOptions, prepare

    start = time.perf_counter()
    result = prepare(src_url, out_url, PrepareOptions(shard_mb=16))
    seconds = time.perf_counter() - start
    report = result.report
    images = sum(s["listed"] for s in report["splits"].values())
    bytes_in = sum(s["bytes_in"] for s in report["splits"].values())
    return {
        "images": images,
        "bytes": bytes_in,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "images_per_s_per_core": images / seconds / cpus,
        "mb_per_s": bytes_in / seconds / 2**20,
        "ok": result.ok,
    }


def time_breakdown(layout_dir: Path, sample: int = 200) -> dict[str, Any]:
    """Per-image cost of each stage on one core (ms), measured on the same files."""
    from imagenet_ray.data.prepare import encode_shard
    from imagenet_ray.data.storage_rules import normalize_for_storage

    files = sorted(layout_dir.rglob("*.JPEG"))[:sample]
    warm = [f.read_bytes() for f in files[:8]]  # warm up imports, decoder and Arrow before timing
    encode_shard(
        [
            {"image": normalize_for_storage(b)[0], "label": 0, "wnid": "n00000000", "key": "w", "height": 1, "width": 1}
            for b in warm
        ],
        256,
    )
    t0 = time.perf_counter()
    blobs = [f.read_bytes() for f in files]
    t1 = time.perf_counter()
    rows = []
    for i, b in enumerate(blobs):
        data, h, w, _ = normalize_for_storage(b)
        rows.append({"image": data, "label": 0, "wnid": "n00000000", "key": str(i), "height": h, "width": w})
    t2 = time.perf_counter()
    encode_shard(rows, 256)
    t3 = time.perf_counter()
    n = max(1, len(files))
    return {
        "images": len(files),
        "read_ms": (t1 - t0) * 1e3 / n,
        "decode_check_ms": (t2 - t1) * 1e3 / n,
        "parquet_ms": (t3 - t2) * 1e3 / n,
    }


def run_prepare_bench(images_dir: Path, cpus: int, s3: bool, limit: int | None, rounds: int) -> dict[str, Any]:
    import ray

    from imagenet_ray import storage

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    results: dict[str, Any] = {"cpus": cpus, "rounds": rounds, "machine": _machine()}
    stack = None
    try:
        layout = work / "raw"
        results["images"] = build_folder_layout(images_dir, layout, limit)
        results["breakdown_1core"] = time_breakdown(layout)
        if s3 and not os.environ.get("AWS_ENDPOINT_URL"):
            from imagenet_ray.services import start_stack

            stack = start_stack(work / "services")
            # before ray.init: Ray's workers inherit the S3 endpoint and credentials from this process
            os.environ.update({k: v for k, v in stack.env().items() if not k.startswith("RAY_")})
        start_local_ray(num_cpus=cpus, log_to_driver=False)
        sides = {"local": (str(layout), str(work))}
        if s3:
            plain_copy(str(layout), "s3://imagenet/bench-raw", threads=8)  # upload the input once
            sides["s3"] = ("s3://imagenet/bench-raw", "s3://imagenet/bench")
        for name, (src, out_root) in sides.items():
            copies, preps = [], []
            for r in range(rounds):  # alternate so that noise hits both sides
                copies.append(plain_copy(src, storage.join(out_root, f"copy-{r}"), threads=cpus))
                preps.append(run_prepare(src, storage.join(out_root, f"prepared-{r}"), cpus))
            med = lambda xs, k: statistics.median(x[k] for x in xs)
            results[name] = {
                "plain_copy": {"images_per_s": med(copies, "images_per_s"), "mb_per_s": med(copies, "mb_per_s")},
                "prepare": {
                    "images_per_s": med(preps, "images_per_s"),
                    "mb_per_s": med(preps, "mb_per_s"),
                    "images_per_s_per_core": med(preps, "images_per_s_per_core"),
                },
            }
            results[name]["prepare_vs_copy"] = (
                results[name]["prepare"]["images_per_s"] / results[name]["plain_copy"]["images_per_s"]
            )
    finally:
        ray.shutdown()
        if stack is not None:
            stack.stop()
        shutil.rmtree(work, ignore_errors=True)
    return results


def _machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model}


def add_bench_prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, help="a folder of JPEGs (e.g. ../shared/imagenet-samples)")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    p.add_argument("--limit", type=int, default=None, help="use at most N images")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--s3", action="store_true", help="also measure S3 → S3 (AWS_ENDPOINT_URL, or a local SeaweedFS)")
    p.add_argument("--json", default=None)


def run_bench_prepare(args: argparse.Namespace) -> int:

    images = Path(args.images)
    if not images.is_dir():
        raise ConfigError(f"bench prepare: --images {images} is not a directory")
    res = run_prepare_bench(images, args.cpus, args.s3, args.limit, args.rounds)
    b = res["breakdown_1core"]
    # The command's result table (stdout), like `bench data`'s; messages go through logging.
    print(f"prepare benchmark: {res['images']} images, {res['cpus']} CPUs ({res['machine']['cpu']})")
    print(
        f"  one core, per image: read {b['read_ms']:.2f} ms, decode check {b['decode_check_ms']:.2f} ms, "
        f"parquet {b['parquet_ms']:.2f} ms"
    )
    for side in ("local", "s3"):
        if side in res:
            r = res[side]
            print(
                f"  {side:5s}: plain copy {r['plain_copy']['images_per_s']:8.1f} img/s "
                f"{r['plain_copy']['mb_per_s']:7.1f} MB/s | prepare {r['prepare']['images_per_s']:8.1f} img/s "
                f"{r['prepare']['mb_per_s']:7.1f} MB/s ({r['prepare']['images_per_s_per_core']:.1f} img/s/core) "
                f"| prepare/copy {r['prepare_vs_copy']:.2f}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0
