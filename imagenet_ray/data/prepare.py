"""`imagenet-ray prepare`: an ILSVRC layout → validated Parquet shards of JPEG bytes, receipts, a report
and `_manifest.json` (written last), on Ray Data; resumable, refusing to mix two builds in one place, and
one prepare at a time per output (data/prefix_lock.py). The file names and the shard schema are
data/format.py's; the per-image rules are data/storage_rules.py's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imagenet_ray import __version__, storage
from imagenet_ray.data import prefix_lock
from imagenet_ray.data.format import (
    MANIFEST_FORMAT,
    PAGE_CHECKSUMS_KEY,
    PLAN_NAME,
    RECEIPTS_DIR,
    REPORT_NAME,
    SHARD_SCHEMA,
    SPLITS,
    receipt_name,
    shard_name,
    write_manifest,
)
from imagenet_ray.data.layouts import ImageRecord, LayoutListing, detect_and_list, read_records
from imagenet_ray.data.storage_rules import Quarantined, normalize_for_storage
from imagenet_ray.errors import UserError

log = logging.getLogger(__name__)

OFFICIAL_COUNTS = {"train": 1_281_167, "val": 50_000, "classes": 1000}  # ILSVRC2012-CLS, for the report


@dataclass(frozen=True)
class PrepareOptions:
    shard_mb: float = 128.0
    rows_per_group: int = 256
    seed: int = 0
    max_quarantine_frac: float = 0.001
    max_side: int | None = None  # re-encoded variant: longer side at most this many pixels
    quality: int = 90  # JPEG quality of the re-encoded variant
    layout: str | None = None  # force a layout instead of detecting it

    def shard_relevant(self) -> dict[str, Any]:
        """The options that change the bytes of the output (a resume must match them)."""
        return {
            "shard_mb": self.shard_mb,
            "rows_per_group": self.rows_per_group,
            "seed": self.seed,
            "max_side": self.max_side,
            "quality": self.quality if self.max_side else None,
        }


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


def build_shard_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)


def encode_shard(rows: list[dict[str, Any]], rows_per_group: int) -> bytes:
    """Parquet bytes of a shard; deterministic for the same rows (same pyarrow version)."""
    # JPEG bytes do not compress and have no useful min/max: no compression, no dictionary and no
    # statistics on the image column (much less encode time than the defaults: docs/benchmarks.md).
    # A CRC-32 in every page header: readers verify it (data/shard_reader.py), so a flipped byte in a page
    # is an error naming the shard, not a silently different image or label.
    sink = pa.BufferOutputStream()
    pq.write_table(
        build_shard_table(rows),
        sink,
        row_group_size=rows_per_group,
        compression="none",
        use_dictionary=["wnid"],
        write_statistics=["label"],
        write_page_checksum=True,
    )
    return cast(bytes, sink.getvalue().to_pybytes())


def write_shard_row(row: dict[str, str]) -> dict[str, str]:
    """Ray Data map function. Task and receipt travel as JSON: their nested shapes vary per shard."""
    return {"receipt": json.dumps(write_shard(json.loads(row["task"])))}


def write_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Build one shard from its planned records, write it, then its receipt."""
    source = storage.resolve(task["source_url"])
    out = storage.resolve(task["out_url"])
    max_side = task["max_side"]
    rows: list[dict[str, Any]] = []
    quarantined: list[dict[str, str]] = []
    notes: Counter[str] = Counter()
    per_class: Counter[str] = Counter()
    bytes_in = 0
    records = [ImageRecord(**fields) for fields in task["records"]]
    # read_records keeps one open file per tar across consecutive members (one open per shard).
    for rec, data in zip(records, read_records(source, records), strict=True):
        bytes_in += len(data)
        try:
            stored, height, width, note = normalize_for_storage(data, max_side, task["quality"])
        except Quarantined as exc:
            quarantined.append({"key": rec.key, "reason": str(exc)})
            continue
        if note:
            notes[note] += 1
        per_class[rec.wnid] += 1
        rows.append(
            {"image": stored, "label": rec.label, "wnid": rec.wnid, "key": rec.key, "height": height, "width": width}
        )
    payload = encode_shard(rows, task["rows_per_group"])
    storage.write_bytes_atomic(out.child(task["name"]), payload)
    receipt = {
        "split": task["split"],
        "path": task["name"],
        "rows": len(rows),
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        PAGE_CHECKSUMS_KEY: True,
        "bytes_in": bytes_in,
        "quarantined": quarantined,
        "notes": dict(notes),
        "per_class": dict(per_class),
    }
    storage.write_bytes_atomic(out.child(receipt_name(task["name"])), json.dumps(receipt).encode())
    return receipt


def listing_digest(listing: LayoutListing) -> str:
    h = hashlib.sha256()
    for split in SPLITS:
        for r in listing.split(split):
            h.update(f"{split}\t{r.key}\t{r.label}\t{r.size}\n".encode())
    return h.hexdigest()


def plan_tasks(listing: LayoutListing, out_url: str, opts: PrepareOptions) -> list[dict[str, Any]]:
    tasks = []
    for split_index, split in enumerate(SPLITS):
        shards = plan_shards(listing.split(split), int(opts.shard_mb * 2**20), opts.seed + split_index)
        for i, recs in enumerate(shards):
            tasks.append(
                {
                    "split": split,
                    "name": shard_name(split, i, len(shards)),
                    "source_url": listing.root_url,
                    "out_url": out_url,
                    "records": [asdict(r) for r in recs],
                    "rows_per_group": opts.rows_per_group,
                    "max_side": opts.max_side,
                    "quality": opts.quality,
                }
            )
    return tasks


def check_or_write_plan(
    out: storage.Location, listing: LayoutListing, opts: PrepareOptions, tasks: list[dict[str, Any]]
) -> None:
    """Record what this output is being built from; refuse to resume a different build."""
    plan = {
        "format": MANIFEST_FORMAT,
        "source": listing.root_url,
        "layout": listing.layout,
        "options": opts.shard_relevant(),
        "listing_sha256": listing_digest(listing),
        "shards": [t["name"] for t in tasks],
    }
    loc = out.child(PLAN_NAME)
    if storage.exists(loc):
        previous = json.loads(storage.read_bytes(loc))
        for key in ("source", "layout", "options", "listing_sha256"):
            if previous.get(key) != plan[key]:
                raise UserError(
                    f"{out.url} already holds a preparation with a different {key} "
                    f"({previous.get(key)!r}); use another --out or delete it"
                )
        return
    storage.write_bytes_atomic(loc, json.dumps(plan, indent=1).encode())


def finished_receipts(out: storage.Location, tasks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Receipts of shards finished by an earlier run (only those whose shard file is there too)."""
    receipts_root = out.child(RECEIPTS_DIR)
    base = receipts_root.path.rstrip("/") + "/"
    present = {i.path[len(base) :] for i in storage.list_files(receipts_root)}
    wanted = {receipt_name(t["name"])[len(RECEIPTS_DIR) + 1 :]: t["name"] for t in tasks}
    done = {}
    for rel, shard in wanted.items():
        if rel in present:
            receipt = json.loads(storage.read_bytes(receipts_root.child(rel)))
            info = out.fs.get_file_info(out.child(shard).path)
            if info.size == receipt["bytes"]:
                done[shard] = receipt
    return done


def remove_partial_files(out: storage.Location) -> None:
    """Delete temporary files a killed local run left behind (object stores never show partial PUTs)."""
    if storage.is_remote(out.url):
        return
    for info in storage.list_files(out):
        if storage.TMP_MARKER in info.base_name:
            out.fs.delete_file(info.path)


class Progress:
    """Plain progress lines (images/s, MB/s, ETA) that read well in `ray job logs` too."""

    def __init__(self, total_images: int, total_bytes: int, every_s: float = 5.0):
        self.total_images, self.total_bytes = total_images, total_bytes
        self.images = self.bytes = 0
        self.start = self.last = time.perf_counter()
        self.every_s = every_s

    def add(self, images: int, nbytes: int) -> None:
        self.images += images
        self.bytes += nbytes
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.images >= self.total_images:
            self.last = now
            log.info(self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.images / elapsed
        eta = (self.total_images - self.images) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.images / max(1, self.total_images)
        return (
            f"[prepare] {self.images:,}/{self.total_images:,} images ({pct:.1f} %) "
            f"{rate:,.0f} img/s {self.bytes / elapsed / 2**20:,.1f} MB/s ETA {eta:,.0f} s"
        )


@dataclass
class PrepareResult:
    manifest: dict[str, Any] | None
    report: dict[str, Any]
    ok: bool
    skipped_shards: int = 0
    written_shards: int = 0
    problems: list[str] = field(default_factory=list)


def build_report(
    listing: LayoutListing, receipts: list[dict[str, Any]], opts: PrepareOptions, seconds: float, out_url: str
) -> dict[str, Any]:
    splits: dict[str, Any] = {}
    quarantined_total = 0
    listed_total = 0
    for split in SPLITS:
        rs = [r for r in receipts if r["split"] == split]
        per_class: Counter[str] = Counter()
        for r in rs:
            per_class.update(r["per_class"])
        notes: Counter[str] = Counter()
        for r in rs:
            notes.update(r["notes"])
        quarantined = [q for r in rs for q in r["quarantined"]]
        listed = len(listing.split(split))
        written = sum(r["rows"] for r in rs)
        counts = [per_class.get(w, 0) for w in listing.classes.wnids]
        splits[split] = {
            "listed": listed,
            "written": written,
            "quarantined": len(quarantined),
            "conserved": listed == written + len(quarantined),
            "min_per_class": min(counts) if counts else 0,
            "max_per_class": max(counts) if counts else 0,
            "notes": dict(sorted(notes.items())),
            "quarantined_files": quarantined,
            "bytes_in": sum(r["bytes_in"] for r in rs),
            "bytes_out": sum(r["bytes"] for r in rs),
            "shards": len(rs),
        }
        quarantined_total += len(quarantined)
        listed_total += listed
    full_set = len(listing.classes) == OFFICIAL_COUNTS["classes"]
    report = {
        "source": listing.root_url,
        "layout": listing.layout,
        "out": out_url,
        "tool_version": __version__,
        "classes": len(listing.classes),
        "splits": splits,
        "wall_seconds": round(seconds, 3),
        "quarantined_fraction": quarantined_total / max(1, listed_total),
        "max_quarantine_frac": opts.max_quarantine_frac,
    }
    if full_set:
        report["official"] = {
            split: {
                "expected": OFFICIAL_COUNTS[split],
                "listed": splits[split]["listed"],
                "matches": splits[split]["listed"] == OFFICIAL_COUNTS[split],
            }
            for split in SPLITS
        }
    return report


def build_manifest(listing: LayoutListing, receipts: list[dict[str, Any]], opts: PrepareOptions) -> dict[str, Any]:
    splits = {}
    for split in SPLITS:
        rs = sorted((r for r in receipts if r["split"] == split), key=lambda r: r["path"])
        per_class: Counter[str] = Counter()
        for r in rs:
            per_class.update(r["per_class"])
        splits[split] = {
            "num_images": sum(r["rows"] for r in rs),
            "per_class": {w: per_class.get(w, 0) for w in listing.classes.wnids},
            "shards": [{k: r[k] for k in ("path", "rows", "bytes", "sha256")} for r in rs],
        }
    return {
        "format": MANIFEST_FORMAT,
        "tool_version": __version__,
        "created_unix": int(time.time()),
        "source": {"url": listing.root_url, "layout": listing.layout},
        "options": {**opts.shard_relevant(), "max_quarantine_frac": opts.max_quarantine_frac},
        "classes": list(listing.classes.wnids),
        "class_names": list(listing.classes.names),
        "splits": splits,
        # a resumed preparation keeps the shards an older version wrote (without checksums): true only if all have them
        PAGE_CHECKSUMS_KEY: all(r.get(PAGE_CHECKSUMS_KEY, False) for r in receipts),
    }


def _run_tasks(tasks: list[dict[str, Any]], progress: Progress) -> Iterable[dict[str, Any]]:
    import ray.data

    ds = ray.data.from_items([{"task": json.dumps(t)} for t in tasks], override_num_blocks=len(tasks))
    # One task per shard; each holds one shard in memory, so memory is bounded by the task count.
    for row in ds.map(write_shard_row, num_cpus=1).iter_rows():
        receipt = json.loads(row["receipt"])
        progress.add(receipt["rows"] + len(receipt["quarantined"]), receipt["bytes_in"])
        yield receipt


def prepare(
    source_url: str,
    out_url: str,
    opts: PrepareOptions = PrepareOptions(),
    listing: LayoutListing | None = None,
    lock: prefix_lock.PrefixLock | None = None,
) -> PrepareResult:
    """Prepare `source_url` into `out_url` on Ray Data, resuming an interrupted run (docs/architecture.md).

    Runs holding `<out>/_prepare.lock` (`lock`, else taken here first; docs/reliability.md, "Two prepares on
    one prefix"): a second prepare of the same output fails with one line and writes nothing there."""
    if lock is None:
        with prefix_lock.hold_output(out_url) as held:
            return prepare(source_url, out_url, opts, listing, held)
    start = time.perf_counter()
    listing = listing or detect_and_list(source_url, layout=opts.layout)
    out = storage.resolve(out_url)
    if lock.prefix != out.url:
        raise ValueError(f"prepare of {out.url} given the lock of {lock.prefix}")
    if not storage.is_remote(out.url):
        storage.ensure_dir(out)
    return _prepare_locked(listing, out, opts, lock, start)


def _prepare_locked(
    listing: LayoutListing, out: storage.Location, opts: PrepareOptions, lock: prefix_lock.PrefixLock, start: float
) -> PrepareResult:
    tasks = plan_tasks(listing, out.url, opts)
    check_or_write_plan(out, listing, opts, tasks)
    remove_partial_files(out)
    done = finished_receipts(out, tasks)
    todo = [t for t in tasks if t["name"] not in done]
    total_images = sum(len(t["records"]) for t in todo)
    progress = Progress(total_images, sum(r["size"] for t in todo for r in t["records"]))
    receipts = list(done.values())
    if todo:
        receipts.extend(_run_tasks(todo, progress))
    report = build_report(listing, receipts, opts, time.perf_counter() - start, out.url)
    report["resumed_shards"] = len(done)
    problems = _problems(report, opts, out.url)
    lock.ensure_held()  # a prepare whose lock was taken over (it stalled past the lease) finalises nothing
    storage.write_bytes_atomic(out.child(REPORT_NAME), json.dumps(report, indent=1).encode())
    manifest = None
    if not problems:
        manifest = build_manifest(listing, receipts, opts)
        write_manifest(out, manifest)
    return PrepareResult(manifest, report, not problems, len(done), len(todo), problems)


def _problems(report: dict[str, Any], opts: PrepareOptions, out_url: str) -> list[str]:
    """Why this preparation gets no manifest: images not conserved, or too many quarantined."""
    problems = [
        f"{split}: {s['listed']} listed != {s['written']} written + {s['quarantined']} quarantined"
        for split, s in report["splits"].items()
        if not s["conserved"]
    ]
    if report["quarantined_fraction"] > opts.max_quarantine_frac:
        problems.append(
            f"{report['quarantined_fraction']:.4%} of images quarantined, above the limit of "
            f"{opts.max_quarantine_frac:.4%} (see {out_url}/{REPORT_NAME})"
        )
    return problems
