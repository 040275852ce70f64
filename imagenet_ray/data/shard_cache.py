"""A node-local disk cache of a remote prepared dataset's shards: a pyarrow filesystem for the shard reads.

A shard's first read on a node copies it from the base filesystem (S3) into `<cache_dir>/<key>/<path>`; later
reads open the local copy. The key is a digest of the manifest, so a re-prepared dataset never reads an older
copy. A cache that cannot take a shard (disk full, over its size limit, not writable) reads through.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import secrets
import shutil
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from imagenet_ray.storage import TMP_MARKER

log = logging.getLogger(__name__)

GIB = 1 << 30
DEFAULT_MAX_GB = 100.0
# Left free on the cache's disk beyond the shard being copied: the node's other writers (Ray's spilling, logs)
# must not be the ones that hit a full disk.
MIN_FREE_BYTES = GIB
STALE_TMP_S = 3600.0  # a temporary copy this old belongs to a killed task (a live copy takes seconds)
_CHUNK = 16 << 20  # per read from the base: a few large ranged GETs per shard, bounded memory
MANIFEST_COPY = "_manifest.json"  # the node's copy of the manifest: the size and SHA-256 of every shard

_Entry = tuple[int | None, str | None]  # (bytes, sha256) as the manifest records them, when it does
_LOCAL = pafs.LocalFileSystem()
# Per process, (cache_dir, key) → the manifest's shards: kept out of the handler, which is pickled into
# every read task (under 1 KB; a 1,024-shard table would add ~110 KB to each).
_TABLES: dict[tuple[str, str], dict[str, _Entry]] = {}
_UNCOPIED: dict[tuple[str, str], bytes] = {}  # a manifest read from the base: copied with the first shard
_SAID: set[str] = set()  # the cache's log lines, once per process each


@dataclass(frozen=True)
class ShardCache:
    """Where and how much: `directory` on every node's own disk, at most `max_gb` GiB under it in all."""

    directory: str
    max_gb: float = DEFAULT_MAX_GB
    min_free_bytes: int = MIN_FREE_BYTES

    def wrap(self, base: pafs.FileSystem, root: str, manifest_path: str, manifest: dict[str, Any]) -> pafs.FileSystem:
        """`base` with the shards of the dataset at `root` (its manifest at `manifest_path`) read through the cache."""
        handler = ShardCacheHandler(
            base,
            root,
            manifest_path,
            os.path.abspath(self.directory),
            manifest_key(manifest),
            int(self.max_gb * GIB),
            self.min_free_bytes,
        )
        return pafs.PyFileSystem(handler)


def manifest_key(manifest: dict[str, Any]) -> str:
    """The cache key of a dataset: a digest of its manifest, which every preparation rewrites (shard SHA-256s,
    creation time), so a dataset prepared again at the same URL gets another directory."""
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def shard_table(manifest: dict[str, Any]) -> dict[str, _Entry]:
    """Manifest path → (bytes, sha256) of every shard whose path is safe as a path below the cache directory."""
    table: dict[str, _Entry] = {}
    for info in manifest.get("splits", {}).values():
        for shard in info.get("shards", []):
            path = shard.get("path")
            if isinstance(path, str) and _safe_relative(path):
                table[path] = (shard.get("bytes"), shard.get("sha256") or None)
    return table


def _safe_relative(path: str) -> bool:
    parts = path.split("/")
    return (
        path != MANIFEST_COPY and "\0" not in path and "\\" not in path and all(p not in ("", ".", "..") for p in parts)
    )


class _BaseReadError(Exception):
    """An error reading the base filesystem during a copy, told apart from the cache disk's own OSErrors."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _read_base(src: pa.NativeFile) -> bytes:
    try:
        data: bytes = src.read(_CHUNK)
    except OSError as exc:
        raise _BaseReadError(exc) from exc
    return data


def _used_bytes(cache_dir: str) -> int:
    """Bytes under `cache_dir`, every dataset's and the copies in progress; removes stale temporary files."""
    used, now = 0, time.time()
    for folder, _, names in os.walk(cache_dir):
        for name in names:
            path = os.path.join(folder, name)
            with contextlib.suppress(OSError):  # renamed or removed by another task meanwhile
                st = os.stat(path)
                if TMP_MARKER in name and now - st.st_mtime > STALE_TMP_S:
                    os.remove(path)
                else:
                    used += st.st_size
    return used


def _load_json(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    with fs.open_input_stream(path) as src:
        value = json.loads(src.read())
    return value if isinstance(value, dict) else {}


def _write_atomic(path: str, data: bytes) -> None:
    """Best effort: the node's manifest copy (without it each process reads the base's once)."""
    tmp = f"{path}{TMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def _say_once(key: str, message: str) -> None:
    if key not in _SAID:  # a read task per shard: one line per process and reason, not one per shard
        _SAID.add(key)
        log.warning(message)


class ShardCacheHandler(pafs.FileSystemHandler):
    """`base` for everything; a manifest-listed shard below `root` is opened from the node's cache, copied
    there first if absent or of the wrong size. State is paths and numbers (and `base`): it pickles."""

    def __init__(
        self,
        base: pafs.FileSystem,
        root: str,
        manifest_path: str,
        cache_dir: str,
        key: str,
        max_bytes: int,
        min_free_bytes: int = MIN_FREE_BYTES,
    ) -> None:
        self.base = base
        self.root = root.rstrip("/")
        self.manifest_path = manifest_path
        self.cache_dir = cache_dir
        self.key = key
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes

    # --- the two reads the cache serves -------------------------------------------------------------------

    def open_input_file(self, path: str) -> pa.NativeFile:
        local = self.cached_copy(path)
        return self.base.open_input_file(path) if local is None else _LOCAL.open_input_file(local)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        local = self.cached_copy(path)
        return self.base.open_input_stream(path) if local is None else _LOCAL.open_input_stream(local)

    def cached_copy(self, path: str) -> str | None:
        """The local copy of `path` (made now if needed), or None: not a shard of this dataset, or no room."""
        rel = posixpath.relpath(path, self.root) if path.startswith(self.root + "/") else None
        entry = self._table().get(rel) if rel is not None else None
        if rel is None or entry is None:
            return None
        local = os.path.join(self.cache_dir, self.key, *rel.split("/"))
        size, sha256 = entry
        if size is None:  # a manifest from before sizes were recorded
            size = self.base.get_file_info(path).size
        with contextlib.suppress(OSError):
            if os.stat(local).st_size == size:
                return local
        return self._copy(path, local, size, sha256)

    def _copy(self, path: str, local: str, size: int | None, sha256: str | None) -> str | None:
        """Copy `path` to `local` through a temporary sibling renamed into place: a reader sees a whole copy or
        none, two tasks copying one shard both end with a whole one, and a killed task leaves only its
        temporary file (never read; removed once stale). Local trouble: None (read through); the base's raises."""
        if not self._room_for(size or 0):
            return None
        tmp = f"{local}{TMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}"
        digest, written = hashlib.sha256(), 0
        src = self.base.open_input_stream(path)  # its errors raise, as a direct read's would
        try:
            with src:
                os.makedirs(os.path.dirname(local), exist_ok=True)
                with open(tmp, "wb") as out:
                    while chunk := _read_base(src):
                        out.write(chunk)
                        digest.update(chunk)
                        written += len(chunk)
                    out.flush()
                    os.fsync(out.fileno())  # a whole copy on disk before it gets the name readers open
            if (size is not None and written != size) or (sha256 is not None and digest.hexdigest() != sha256):
                # Not the bytes prepare wrote: never cached; the direct read then names the shard if it is corrupt.
                _say_once(f"differs:{path}", f"{path}: not the bytes the manifest records; not cached")
                return None
            os.replace(tmp, local)
            manifest = _UNCOPIED.pop((self.cache_dir, self.key), None)
            if manifest is not None:  # the node's copy, for the next process
                _write_atomic(os.path.join(self.cache_dir, self.key, MANIFEST_COPY), manifest)
            return local
        except _BaseReadError as exc:
            raise exc.error from None  # what a direct read would have raised
        except OSError as exc:  # the cache's disk: full (ENOSPC), not writable
            self._reading_through("write", str(exc))
            return None
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)  # gone already once renamed

    def _room_for(self, size: int) -> bool:
        """Whether the disk has `size` + the margin free and the cache stays under its limit with it."""
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            free = shutil.disk_usage(self.cache_dir).free
            used = _used_bytes(self.cache_dir)
        except OSError as exc:
            return self._reading_through("unusable", str(exc))
        if free < size + self.min_free_bytes:
            return self._reading_through("full", f"{free:,} bytes free on its disk")
        if used + size > self.max_bytes:
            return self._reading_through("limit", f"{used:,} bytes used of its {self.max_bytes:,}")
        return True

    def _reading_through(self, why: str, detail: str) -> bool:
        _say_once(f"{why}:{self.cache_dir}", f"shard cache {self.cache_dir}: {detail}; reading shards through")
        return False

    def _table(self) -> dict[str, _Entry]:
        """This dataset's shards: from the node's copy of the manifest, else the base's (then copied for the next)."""
        memo = (self.cache_dir, self.key)
        if memo not in _TABLES:
            copy = os.path.join(self.cache_dir, self.key, MANIFEST_COPY)
            manifest: dict[str, Any] = {}
            with contextlib.suppress(OSError, ValueError):  # none yet, or damaged: fetched again
                manifest = _load_json(_LOCAL, copy)
            try:
                if manifest_key(manifest) != self.key:
                    manifest = _load_json(self.base, self.manifest_path)
                    if manifest_key(manifest) != self.key:  # prepared again since this job read it: cache nothing
                        _say_once(
                            f"changed:{self.key}", f"{self.manifest_path} changed since the job started: not cached"
                        )
                        manifest = {}
                    else:
                        _UNCOPIED[memo] = json.dumps(manifest).encode()
            except (OSError, ValueError) as exc:  # not memoized: the next open tries again
                _say_once(f"manifest:{self.key}", f"{self.manifest_path}: {exc}; shards read through")
                return {}
            _TABLES[memo] = shard_table(manifest)
        return _TABLES[memo]

    # --- everything else: the base filesystem --------------------------------------------------------------

    def get_type_name(self) -> str:
        return f"shard-cache+{self.base.type_name}"

    def normalize_path(self, path: str) -> str:
        return str(self.base.normalize_path(path))

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return list(self.base.get_file_info(paths))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return list(self.base.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self.base.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.base.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.base.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        self.base.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path: str) -> None:
        self.base.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.base.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.base.copy_file(src, dest)

    def open_output_stream(self, path: str, metadata: dict[str, str] | None) -> pa.NativeFile:
        return self.base.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: dict[str, str] | None) -> pa.NativeFile:
        return self.base.open_append_stream(path, metadata=metadata)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShardCacheHandler) and vars(self) == vars(other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash((self.root, self.cache_dir, self.key))
