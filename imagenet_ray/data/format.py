"""The prepared-dataset format in one place: shard schema, file names, manifest read/write, the reader.

Written by data/prepare.py, read by data/pipeline.py, data/verify.py and the evaluate job. A dataset
is complete only when `_manifest.json` exists (prepare writes it last).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import pyarrow as pa

from imagenet_ray import storage
from imagenet_ray.errors import UserError

if TYPE_CHECKING:
    import pyarrow.fs as pafs
    import ray.data

MANIFEST_NAME = "_manifest.json"  # written last: its presence means the dataset is complete
REPORT_NAME = "_report.json"  # what every prepare run did (counts, quarantined files)
PLAN_NAME = "_plan.json"  # what a preparation is built from (a resume must match it)
RECEIPTS_DIR = "_receipts"  # one receipt per finished shard
MANIFEST_FORMAT = "imagenet-ray/prepared-v1"
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
    manifest: dict[str, Any] = json.loads(storage.read_bytes(loc))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{loc.url}: unknown format {manifest.get('format')!r}")
    return manifest


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

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def class_wnids(self) -> list[str]:
        return list(self.manifest["classes"])

    def num_images(self, split: str) -> int:
        return int(self.manifest["splits"][split]["num_images"])

    def shard_paths(self, split: str) -> tuple[pafs.FileSystem, list[str]]:
        root = storage.resolve(self.url)
        return root.fs, [root.child(s["path"]).path for s in self.manifest["splits"][split]["shards"]]

    def read(self, split: str, columns: list[str], seed: int | None = None) -> ray.data.Dataset:
        """The split's shards (in a new seeded order every execution when `seed` is given), `columns` only."""
        import ray.data
        from ray.data import DataContext, FileShuffleConfig

        fs, paths = self.shard_paths(split)
        shuffle = FileShuffleConfig(seed=seed, reseed_after_execution=True) if seed is not None else None
        # Ray's default Parquet reader (DataSourceV2) is much slower to start each epoch at tens of shards
        # than the V1 reader (docs/benchmarks.md); the dataset keeps the reader it is planned with.
        ctx = DataContext.get_current()
        previous, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
        try:
            # select_columns is pushed down into the Parquet read.
            return ray.data.read_parquet(
                paths, filesystem=fs, shuffle=shuffle, override_num_blocks=read_blocks(len(paths), _cluster_cpus())
            ).select_columns(columns)
        finally:
            ctx.use_datasource_v2 = previous


def open_prepared(url: str) -> PreparedDataset:
    return PreparedDataset(url, read_manifest(url))


def read_blocks(num_files: int, cluster_cpus: float) -> int | None:
    """How many blocks to ask the Parquet read for: one per shard when there are enough shards.

    Ray fuses the read with the decode map into one task only when the read is not split into more
    blocks than files, and splits by itself below 200 files; a split read only pays when there are
    too few shards to keep every CPU busy (docs/architecture.md).
    """
    if num_files >= 2 * max(1.0, cluster_cpus):
        return num_files
    return None


def _cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0)) if ray.is_initialized() else 1.0
