"""Re-read a prepared dataset and check it against its manifest: every shard's presence, size,
SHA-256 and row count, and the per-split totals; for a SHA-256 mismatch, what the Parquet page checksums say."""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from imagenet_ray import storage
from imagenet_ray.data.format import read_manifest
from imagenet_ray.errors import UserError, describe_error

_HASH_CHUNK = 8 * 2**20


@dataclass(frozen=True)
class ShardCheck:
    path: str
    problem: str | None  # None = the shard matches the manifest


def check_shard(root: storage.Location, entry: dict[str, Any]) -> ShardCheck:
    loc = root.child(entry["path"])
    try:
        with loc.fs.open_input_stream(loc.path) as stream:
            digest, size, chunks = hashlib.sha256(), 0, []
            while chunk := stream.read(_HASH_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                chunks.append(chunk)
    except FileNotFoundError:
        return ShardCheck(entry["path"], "missing")
    except OSError as exc:
        return ShardCheck(entry["path"], storage.describe_os_error(loc.url, exc))
    if size != entry["bytes"]:
        return ShardCheck(entry["path"], f"size {size} != manifest {entry['bytes']}")
    if digest.hexdigest() != entry["sha256"]:
        return ShardCheck(entry["path"], "sha256 mismatch" + _page_damage(b"".join(chunks)))
    try:
        rows = pq.ParquetFile(io.BytesIO(b"".join(chunks)), page_checksum_verification=True).metadata.num_rows
    except Exception as exc:
        return ShardCheck(entry["path"], f"unreadable Parquet ({exc})")
    if rows != entry["rows"]:
        return ShardCheck(entry["path"], f"{rows} rows != manifest {entry['rows']}")
    return ShardCheck(entry["path"], None)


def _page_damage(data: bytes) -> str:
    """Where a shard's bytes differ, as far as its Parquet page checksums tell (for a sha256 mismatch)."""
    try:
        for _ in pq.ParquetFile(io.BytesIO(data), page_checksum_verification=True).iter_batches():
            pass
    except Exception as exc:
        return f" ({describe_error(exc, 160)})"
    return " (every Parquet page reads and matches its checksum, where it has one)"


def verify(url: str, threads: int = 8) -> tuple[int, list[ShardCheck]]:
    """(number of shards checked, the shards with problems)."""
    manifest = read_manifest(url)
    root = storage.resolve(url)
    entries = []
    for split, info in manifest["splits"].items():
        if sum(s["rows"] for s in info["shards"]) != info["num_images"]:
            raise UserError(f"{url}: manifest inconsistent: {split} shard rows do not add up to num_images")
        entries.extend(info["shards"])
    with ThreadPoolExecutor(threads) as pool:
        checks = list(pool.map(lambda e: check_shard(root, e), entries))
    return len(entries), [c for c in checks if c.problem]
