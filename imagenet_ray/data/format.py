"""The prepared-dataset format in one place: shard schema, file names, manifest read/write, the reader.

Written by data/prepare.py, read by data/pipeline.py, data/verify.py and evaluate. A dataset is complete
only when `_manifest.json` exists (written last); it lists every shard's size and SHA-256, and shards carry
page CRCs checked on every read (docs/reliability.md).
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import pyarrow as pa
import pyarrow.fs as pafs

from imagenet_ray import storage
from imagenet_ray.data.shard_cache import DEFAULT_MAX_GB, ShardCache
from imagenet_ray.errors import UserError, describe_error
from imagenet_ray.redact import redact_url

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"  # written last: its presence means the dataset is complete
REPORT_NAME = "_report.json"  # what every prepare run did (counts, quarantined files)
PLAN_NAME = "_plan.json"  # what a preparation is built from (a resume must match it)
RECEIPTS_DIR = "_receipts"  # one receipt per finished shard
MANIFEST_FORMAT = "imagenet-ray/prepared-v1"
# Manifest key: true when every shard was written with Parquet page checksums (absent in older manifests:
# their shards carry none, and read as before; only `imagenet-ray verify`'s SHA-256 then catches a flip).
PAGE_CHECKSUMS_KEY = "page_checksums"
SPLITS = ("train", "val")
SHARD_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),  # the encoded image (JPEG), as validated by prepare
        ("label", pa.int16()),  # index into the manifest's sorted `classes`
        ("wnid", pa.string()),
        ("key", pa.string()),  # where the image came from, relative to the source root
        ("height", pa.int32()),
        ("width", pa.int32()),
    ]
)


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}/shard-{index:05d}-of-{count:05d}.parquet"


def receipt_name(shard: str) -> str:
    return f"{RECEIPTS_DIR}/{shard.removesuffix('.parquet')}.json"


def write_manifest(out: storage.Location, manifest: dict[str, Any]) -> None:
    storage.write_bytes_atomic(out.child(MANIFEST_NAME), json.dumps(manifest, indent=1).encode())


def read_manifest(url: str) -> dict[str, Any]:
    """Load a prepared dataset's manifest; a dataset without one is incomplete and refused."""
    loc = storage.resolve(url).child(MANIFEST_NAME)
    if not storage.exists(loc):
        raise UserError(f"{url}: no {MANIFEST_NAME} (not a prepared dataset, or preparation did not finish)")
    try:
        manifest = json.loads(storage.read_bytes(loc))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError; RecursionError: [[[[...
        raise UserError(f"{loc.url}: not a JSON manifest ({describe_error(exc, 160)})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{loc.url}: not a manifest (a JSON {type(manifest).__name__}, not an object)")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{loc.url}: unknown format {manifest.get('format')!r:.80}")
    _check_manifest(manifest, loc.url)
    return manifest


def _check_manifest(manifest: dict[str, Any], where: str) -> None:
    """The structure the readers index into (classes, splits, shards), so that a damaged or hand-edited
    manifest is one line naming the field, not a KeyError or TypeError in whichever reader touches it first."""

    def bad(field: str, expected: str) -> UserError:
        shown = field if field.isprintable() else repr(field)  # a split name is any JSON string
        return UserError(f"{where}: manifest field {shown} must be {expected}")

    def is_int(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    classes = manifest.get("classes")
    if not isinstance(classes, list) or not all(isinstance(w, str) for w in classes):
        raise bad("classes", "a list of wnids")
    names = manifest.get("class_names")
    if names and (  # predict reads an empty list as absent
        not isinstance(names, list) or len(names) != len(classes) or not all(isinstance(n, str) for n in names)
    ):
        raise bad("class_names", "a list of names, one per class")
    if not isinstance(manifest.get("options", {}), dict):
        raise bad("options", "an object")
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        raise bad("splits", "an object (split name → its shards)")
    for split, info in splits.items():
        if not isinstance(info, dict) or not is_int(info.get("num_images")):
            raise bad(f"splits.{split}", "an object with num_images (an integer ≥ 0)")
        shards = info.get("shards")
        if not isinstance(shards, list):
            raise bad(f"splits.{split}.shards", "a list")
        for i, shard in enumerate(shards):
            ok = isinstance(shard, dict) and isinstance(shard.get("path"), str)
            ok = ok and all(is_int(shard[k]) for k in ("rows", "bytes") if k in shard)
            if not (ok and isinstance(shard.get("sha256", ""), str)):
                raise bad(f"splits.{split}.shards[{i}]", "an object with a path (rows, bytes, sha256 if given)")


@runtime_checkable
class DatasetSource(Protocol):
    """What the pipeline reads: a prepared dataset or a raw ILSVRC layout (pipeline.RawLayoutDataset)."""

    @property
    def num_classes(self) -> int: ...

    @property
    def class_wnids(self) -> list[str]: ...

    def num_images(self, split: str) -> int: ...

    def read(self, split: str, columns: list[str], seed: int | None = None) -> ray.data.Dataset: ...


@dataclass(frozen=True)
class PreparedDataset:
    url: str
    manifest: dict[str, Any]
    shard_cache: ShardCache | None = None  # `read` keeps the shards on each node's disk (shard_cache.py)

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def class_wnids(self) -> list[str]:
        return list(self.manifest["classes"])

    def _split(self, split: str) -> dict[str, Any]:
        info: dict[str, Any] | None = self.manifest["splits"].get(split)
        if info is None:  # e.g. a val-only dataset given to training
            raise UserError(f"{self.url}: the prepared dataset has no {split} split")
        return info

    def num_images(self, split: str) -> int:
        return int(self._split(split)["num_images"])

    def shard_paths(self, split: str) -> tuple[pafs.FileSystem, list[str]]:
        root = storage.resolve(self.url)
        return root.fs, [root.child(s["path"]).path for s in self._split(split)["shards"]]

    def shard_urls(self, split: str) -> dict[str, str]:
        """Filesystem path → URL of the split's shards (what an error names)."""
        root = storage.resolve(self.url)
        return {root.child(s["path"]).path: root.child(s["path"]).url for s in self._split(split)["shards"]}

    def read(self, split: str, columns: list[str], seed: int | None = None) -> ray.data.Dataset:
        """The split's shards (in a new seeded order every execution when `seed` is given), `columns` only.

        Page checksums are verified: a corrupt shard fails the read with a UserError naming it."""
        from ray.data import FileShuffleConfig

        from imagenet_ray.data.shard_reader import read_shards

        fs, paths = self.shard_paths(split)
        if self.shard_cache is not None:
            root = storage.resolve(self.url)
            fs = self.shard_cache.wrap(fs, root.path, root.child(MANIFEST_NAME).path, self.manifest)
        shuffle = FileShuffleConfig(seed=seed, reseed_after_execution=True) if seed is not None else None
        # Ray's V1 Parquet reader (read_parquet's with DataContext.use_datasource_v2 = False): its default
        # reader (DataSourceV2) is much slower to start each epoch at tens of shards (docs/benchmarks.md).
        # select_columns is pushed down into the Parquet read.
        total_bytes = sum(int(sh.get("bytes", 0)) for sh in self._split(split)["shards"])
        blocks = read_blocks(len(paths), _cluster_cpus(), total_bytes)
        return read_shards(paths, fs, self.shard_urls(split), self.url, shuffle, blocks).select_columns(columns)


def open_prepared(url: str, shard_cache: ShardCache | None = None) -> PreparedDataset:
    """The prepared dataset at `url`; with `shard_cache`, its reads keep the shards on each node's disk when
    the dataset is remote (a local one is read directly: a copy on the same kind of disk gains nothing)."""
    manifest = read_manifest(url)
    if shard_cache is not None:
        if storage.is_remote(url):
            log.info(
                "shards of %s cached on each node under %s (at most %g GiB)",
                redact_url(url),
                shard_cache.directory,
                shard_cache.max_gb,
            )
        else:
            log.info("%s is local: its shards are read directly, not cached (data.shard_cache_dir)", redact_url(url))
            shard_cache = None
    return PreparedDataset(url, manifest, shard_cache)


def cached_url_filesystem(url: str, cache_dir: str, max_gb: float = DEFAULT_MAX_GB) -> pafs.FileSystem:
    """The filesystem of the prepared dataset at `url` (remote or not) with its shards read through a cache
    under `cache_dir`, for readers of `shard_paths` (the benchmarks'); the pipeline's: open_prepared's `shard_cache`."""
    root = storage.resolve(url)
    return ShardCache(cache_dir, max_gb).wrap(root.fs, root.path, root.child(MANIFEST_NAME).path, read_manifest(url))


def check_shard_sizes(data: PreparedDataset, splits: Iterable[str] | None = None) -> None:
    """Every shard of `splits` (default: all) is there with the size the manifest records, else a one-line
    UserError naming the first shard that is not; before a job starts its workers.

    One listing per shard directory (a split's ~1,000 shards on S3 in one paginated LIST), not a request
    per shard. A manifest without shard sizes (older prepare) is checked for presence only."""
    root = storage.resolve(data.url)
    wanted = [
        s for split in (data.manifest["splits"] if splits is None else splits) for s in data._split(split)["shards"]
    ]
    if not data.manifest.get(PAGE_CHECKSUMS_KEY):
        log.info("%s: shards carry no Parquet page checksums (prepared by an older version)", redact_url(data.url))
    if any("bytes" not in s for s in wanted):
        log.info("%s: the manifest records no shard sizes: checking only that the shards exist", redact_url(data.url))
    found: dict[str, int | None] = {}
    for folder in sorted({posixpath.dirname(s["path"]) for s in wanted}):
        found.update(_listed_sizes(root.child(folder) if folder else root, folder))
    problems = []
    for s in wanted:
        url = redact_url(root.child(s["path"]).url)
        if s["path"] not in found:
            problems.append(f"{url}: missing (listed in the manifest)")
            continue
        size = found[s["path"]]
        if "bytes" in s and size is not None and size != s["bytes"]:
            problems.append(f"{url}: expected {s['bytes']:,} bytes (manifest), found {size:,}")
    if problems:
        more = f"; {len(problems) - 1} more shard(s) missing or of the wrong size" if len(problems) > 1 else ""
        raise UserError(
            f"{problems[0]}{more}; re-run `imagenet-ray prepare` with the same --source and --out (it rewrites "
            f"missing and wrong-size shards), `imagenet-ray verify {redact_url(data.url)}` checks every shard"
        )


def _listed_sizes(folder: storage.Location, rel: str) -> dict[str, int | None]:
    """Manifest path (`rel`/name) → size of every file directly in `folder`: one listing."""
    try:
        infos = folder.fs.get_file_info(pafs.FileSelector(folder.path, recursive=False, allow_not_found=True))
    except OSError as exc:
        raise UserError(storage.describe_os_error(redact_url(folder.url), exc)) from None
    return {posixpath.join(rel, i.base_name): i.size for i in infos if i.type == pafs.FileType.File}


MIN_READ_TASK_BYTES = 16 * 2**20  # smaller shards are grouped: each read task costs ~10-20 ms of Ray's own


def read_blocks(num_files: int, cluster_cpus: float, total_bytes: int = 0) -> int | None:
    """How many blocks to ask the Parquet read for: one per shard when there are enough shards, fewer
    (several shards per read task) when the shards are smaller than MIN_READ_TASK_BYTES.

    Ray fuses the read with the decode map into one task only when the read is not split into more
    blocks than files, and splits by itself below 200 files; a split read only pays when there are
    too few shards to keep every CPU busy (docs/architecture.md). Per-task overhead made 1,024 shards of
    0.6 MB read at a quarter of the rate of 16 shards of the same images (docs/benchmarks.md).
    """
    floor = 2 * max(1.0, cluster_cpus)
    if num_files < floor:
        return None
    if total_bytes > 0 and total_bytes / num_files < MIN_READ_TASK_BYTES:
        return int(min(num_files, max(floor, math.ceil(total_bytes / MIN_READ_TASK_BYTES))))
    return num_files


def _cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0)) if ray.is_initialized() else 1.0
