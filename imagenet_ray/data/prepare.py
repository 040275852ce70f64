"""ILSVRC layout → Parquet shards of the original JPEG bytes + `_manifest.json` (written last).

The driver lists the source and plans the shards (pure, seeded): every shard is a random mix of
classes, sized by the source byte counts. Ray Data then runs one task per shard; each task reads its
images, checks that each one decodes, writes the shard in one atomic PUT and returns its row count,
byte size and SHA-256. The manifest is written only after every shard exists, so a reader that
finds a manifest finds a complete dataset.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imagenet_ray import __version__, storage
from imagenet_ray.data.decode import DecodeError, decode_rgb
from imagenet_ray.data.layouts import ImageRecord, LayoutListing, detect_and_list
from imagenet_ray.errors import UserError

MANIFEST_NAME = "_manifest.json"
MANIFEST_FORMAT = "imagenet-ray/prepared-v1"
SPLITS = ("train", "val")
SHARD_SCHEMA = pa.schema([
    ("image", pa.binary()),
    ("label", pa.int16()),
    ("wnid", pa.string()),
    ("key", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
])


@dataclass(frozen=True)
class PrepareOptions:
    shard_mb: float = 128.0
    rows_per_group: int = 256
    seed: int = 0


def plan_shards(records: tuple[ImageRecord, ...], target_bytes: int, seed: int) -> list[list[ImageRecord]]:
    """Shuffle `records` with `seed` and cut them into consecutive shards of about `target_bytes`."""
    order = np.random.default_rng(seed).permutation(len(records))
    shards: list[list[ImageRecord]] = []
    current: list[ImageRecord] = []
    current_bytes = 0
    for i in order:
        rec = records[int(i)]
        if current and current_bytes + rec.size > target_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(rec)
        current_bytes += rec.size
    if current:
        shards.append(current)
    return shards


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}/shard-{index:05d}-of-{count:05d}.parquet"


def build_shard_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)


def read_and_check(source: storage.Location, rec: ImageRecord) -> dict[str, Any]:
    data = storage.read_bytes(source.child(rec.key))
    try:
        img = decode_rgb(data)
    except DecodeError as exc:
        raise UserError(f"{source.url}/{rec.key}: {exc}") from None
    return {"image": data, "label": rec.label, "wnid": rec.wnid, "key": rec.key,
            "height": img.height, "width": img.width}


def write_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Ray Data map function: build one shard from its planned records and write it atomically."""
    source = storage.resolve(task["source_url"])
    out = storage.resolve(task["out_url"])
    records = [ImageRecord(k, w, int(l), int(s)) for k, w, l, s in
               zip(task["keys"], task["wnids"], task["labels"], task["sizes"])]
    rows = [read_and_check(source, rec) for rec in records]
    buf = io.BytesIO()
    pq.write_table(build_shard_table(rows), buf, row_group_size=int(task["rows_per_group"]), compression="none")
    payload = buf.getvalue()
    storage.write_bytes_atomic(out.child(task["name"]), payload)
    return {"split": task["split"], "path": task["name"], "rows": len(rows), "bytes": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest()}


def _shard_tasks(listing: LayoutListing, out_url: str, opts: PrepareOptions) -> list[dict[str, Any]]:
    tasks = []
    for split_index, split in enumerate(SPLITS):
        shards = plan_shards(listing.split(split), int(opts.shard_mb * 2**20), opts.seed + split_index)
        for i, recs in enumerate(shards):
            tasks.append({
                "split": split, "name": shard_name(split, i, len(shards)),
                "source_url": listing.root_url, "out_url": out_url,
                "keys": [r.key for r in recs], "wnids": [r.wnid for r in recs],
                "labels": [r.label for r in recs], "sizes": [r.size for r in recs],
                "rows_per_group": opts.rows_per_group,
            })
    return tasks


def build_manifest(listing: LayoutListing, shards: list[dict[str, Any]], opts: PrepareOptions,
                   seconds: float) -> dict[str, Any]:
    splits = {}
    for split in SPLITS:
        records = listing.split(split)
        per_class = Counter(r.wnid for r in records)
        split_shards = sorted((s for s in shards if s["split"] == split), key=lambda s: s["path"])
        splits[split] = {
            "num_images": sum(s["rows"] for s in split_shards),
            "per_class": {w: per_class.get(w, 0) for w in listing.classes.wnids},
            "shards": [{k: s[k] for k in ("path", "rows", "bytes", "sha256")} for s in split_shards],
        }
        if splits[split]["num_images"] != len(records):
            raise UserError(f"prepare: {split} wrote {splits[split]['num_images']} images, listed {len(records)}")
    return {
        "format": MANIFEST_FORMAT,
        "tool_version": __version__,
        "created_unix": int(time.time()),
        "source": {"url": listing.root_url, "layout": listing.layout},
        "options": {"shard_mb": opts.shard_mb, "rows_per_group": opts.rows_per_group, "seed": opts.seed},
        "classes": list(listing.classes.wnids),
        "class_names": list(listing.classes.names),
        "splits": splits,
        "wall_seconds": round(seconds, 3),
    }


def prepare(source_url: str, out_url: str, opts: PrepareOptions = PrepareOptions()) -> dict[str, Any]:
    """List `source_url`, write shards to `out_url` on Ray Data, write the manifest last; return it."""
    import ray

    start = time.perf_counter()
    listing = detect_and_list(source_url)
    out = storage.resolve(out_url)
    if not storage.is_remote(out.url):
        storage.ensure_dir(out)
    tasks = _shard_tasks(listing, out.url, opts)
    ds = ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks)))
    results = ds.map(write_shard, num_cpus=1).take_all()
    manifest = build_manifest(listing, results, opts, time.perf_counter() - start)
    storage.write_bytes_atomic(out.child(MANIFEST_NAME), json.dumps(manifest, indent=1).encode())
    return manifest


def read_manifest(url: str) -> dict[str, Any]:
    """Load a prepared dataset's manifest; a dataset without one is incomplete and refused."""
    loc = storage.resolve(url).child(MANIFEST_NAME)
    if not storage.exists(loc):
        raise UserError(f"{url}: no {MANIFEST_NAME} (not a prepared dataset, or preparation did not finish)")
    manifest = json.loads(storage.read_bytes(loc))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{loc.url}: unknown format {manifest.get('format')!r}")
    return manifest
