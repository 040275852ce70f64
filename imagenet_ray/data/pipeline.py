"""Ray Datasets for training and validation.

Sources: a prepared dataset (Parquet shards + manifest; the default) or a raw ILSVRC layout read
straight from storage (for users who do not prepare).

train: new shard/file order every epoch (seeded) → [CPU tasks: decode + RandomResizedCrop + flip]
       → uint8 (N, H, W, 3) batches; each worker adds a local shuffle buffer when iterating.
       With `decode_on="gpu"` the tasks pass the JPEG bytes through and the worker decodes on its
       device (data/device_decode.py).
val:   every image once, eval preset; split across workers *without* equalising so that each image
       is seen exactly once (see exact_val_data_config).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from imagenet_ray import storage
from imagenet_ray.data import transforms
from imagenet_ray.data.layouts import ImageRecord, LayoutListing, detect_and_list, read_records
from imagenet_ray.data.prepare import read_manifest

DECODE_BATCH_ROWS = 32
RAW_ROWS_PER_BLOCK = 256


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

    def shard_paths(self, split: str) -> tuple[Any, list[str]]:
        root = storage.resolve(self.url)
        return root.fs, [root.child(s["path"]).path for s in self.manifest["splits"][split]["shards"]]

    def read(self, split: str, columns: list[str], seed: int | None = None):
        import ray.data
        from ray.data import FileShuffleConfig

        from ray.data import DataContext

        fs, paths = self.shard_paths(split)
        shuffle = FileShuffleConfig(seed=seed, reseed_after_execution=True) if seed is not None else None
        # Ray 2.60's default Parquet reader (DataSourceV2) took 10 s to start each epoch at 66 shards vs
        # 1.8 s for the V1 reader (docs/benchmarks.md); the dataset keeps the reader it is planned with.
        ctx = DataContext.get_current()
        previous, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
        try:
            # select_columns is pushed down into the Parquet read.
            return ray.data.read_parquet(paths, filesystem=fs, shuffle=shuffle,
                                         override_num_blocks=read_blocks(len(paths), _cluster_cpus())
                                         ).select_columns(columns)
        finally:
            ctx.use_datasource_v2 = previous


@dataclass(frozen=True)
class RawLayoutDataset:
    """An ILSVRC layout read without preparation: records are listed on the driver, bytes are read
    by Ray Data tasks (byte ranges for tar members), every epoch in a new order."""

    url: str
    listing: LayoutListing

    @property
    def num_classes(self) -> int:
        return len(self.listing.classes)

    @property
    def class_wnids(self) -> list[str]:
        return list(self.listing.classes.wnids)

    def num_images(self, split: str) -> int:
        return len(self.listing.split(split))

    def read(self, split: str, columns: list[str], seed: int | None = None):
        import ray.data

        records = self.listing.split(split)
        if seed is not None:
            records = [records[i] for i in np.random.default_rng(seed).permutation(len(records))]
        items = [{"key": r.key, "path": r.path, "offset": r.offset, "size": r.size, "label": r.label,
                  "wnid": r.wnid} for r in records]
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // RAW_ROWS_PER_BLOCK))
        if seed is not None:
            ds = ds.randomize_block_order()  # a new block order every epoch
        ds = ds.map_batches(_read_raw, fn_kwargs={"root_url": self.url}, batch_size=DECODE_BATCH_ROWS,
                            batch_format="numpy")
        return ds.select_columns(columns)


def _read_raw(batch: dict[str, np.ndarray], root_url: str) -> dict[str, np.ndarray]:
    root = storage.resolve(root_url)
    records = [ImageRecord(str(k), str(w), int(l), int(s), str(p), int(o))
               for k, w, l, s, p, o in zip(batch["key"], batch["wnid"], batch["label"], batch["size"],
                                           batch["path"], batch["offset"])]
    images = list(read_records(root, records))
    return {"image": np.array(images, dtype=object), "label": batch["label"], "key": batch["key"]}


def open_prepared(url: str) -> PreparedDataset:
    return PreparedDataset(url, read_manifest(url))


def open_source(url: str, source: str) -> PreparedDataset | RawLayoutDataset:
    """`source` = "prepared" (Parquet shards + manifest) or "raw" (an ILSVRC layout, see layouts.py)."""
    if source == "raw":
        return RawLayoutDataset(url, detect_and_list(url))
    return open_prepared(url)


def read_blocks(num_files: int, cluster_cpus: float) -> int | None:
    """How many blocks to ask the Parquet read for: one per shard when there are enough shards.

    Ray fuses the read with the decode map into one task (no object-store hop for the JPEG bytes, no
    second task per shard) only when the read is not split into more blocks than files, and Ray
    splits by itself below 200 files (its read_op_min_num_blocks). Fused took the Ray side from 433 to
    610 images/s on the same shards (docs/benchmarks.md); a split read only pays when there are too
    few shards to keep every CPU busy.
    """
    if num_files >= 2 * max(1.0, cluster_cpus):
        return num_files
    return None


def _cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0)) if ray.is_initialized() else 1.0


def row_chunks(batch: dict[str, np.ndarray], rows: int):
    """Consecutive slices of at most `rows` rows of a column batch."""
    n = len(next(iter(batch.values())))
    for start in range(0, n, rows):
        yield {k: v[start:start + rows] for k, v in batch.items()}


def _train_map(block: dict[str, np.ndarray], size: int):
    # A whole read block (a shard, or part of one) per call, so Ray can fuse read and decode into one
    # task; decoded in chunks so that memory stays per-chunk and output streams out. Rows are visited
    # in a fresh random order (the shard order already changes every epoch; this changes the order
    # within each shard too). Fresh OS entropy: augmentation differs across tasks, epochs, restarts.
    rng = np.random.default_rng()
    order = rng.permutation(len(block["label"]))
    block = {k: np.asarray(v)[order] for k, v in block.items()}
    for chunk in row_chunks(block, DECODE_BATCH_ROWS):
        yield transforms.train_batch(chunk, size, rng)


def _eval_map(block: dict[str, np.ndarray], resize: int, crop: int):
    for chunk in row_chunks(block, DECODE_BATCH_ROWS):
        yield transforms.eval_batch(chunk, resize, crop)


def build_train_dataset(data, crop: int, seed: int, decode_on: str = "cpu", deterministic: bool = False):
    # Deterministic runs keep the file order fixed; the worker shuffles locally with a per-epoch seed.
    ds = data.read("train", ["image", "label"], seed=None if deterministic else seed)
    if decode_on == "gpu":
        return ds  # JPEG bytes go to the worker
    return ds.map_batches(_train_map, fn_kwargs={"size": crop}, batch_size=None, batch_format="numpy")


def build_val_dataset(data, resize: int, crop: int, decode_on: str = "cpu"):
    ds = data.read("val", ["image", "label", "key"])
    if decode_on == "gpu":
        return ds.select_columns(["image", "label"])
    return ds.map_batches(_eval_map, fn_kwargs={"resize": resize, "crop": crop}, batch_size=None,
                          batch_format="numpy")


def exact_val_data_config(equal_split: tuple[str, ...] = ("train",), preserve_order: bool = False,
                          node_labels: dict[str, str] | None = None):
    """A Ray Train DataConfig that splits `equal_split` datasets equally and every other one exactly.

    Ray Train's default `streaming_split(equal=True)` drops rows so that every worker gets the same
    count; fine for training (DDP needs equal step counts) but it would silently shrink validation.
    preserve_order: rows reach the workers in a reproducible order (deterministic runs).
    node_labels: every Ray Data task runs on nodes with these labels (e.g. the CPU-only node group),
    so decoding never competes with the GPU nodes. (The training workers' own CPUs are already
    excluded from Ray Data's budget by Ray Train.)
    """
    from ray.train import DataConfig

    class ExactValDataConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                if ds.name is None:
                    ds.set_name(name)
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                hints = worker_node_ids if self._enable_shard_locality else None
                splits = ds.streaming_split(world_size, equal=name in equal_split, locality_hints=hints)
                for i, split in enumerate(splits):
                    output[i][name] = split
            return output

    if preserve_order or node_labels:
        options = DataConfig.default_ingest_options()
        options.preserve_order = preserve_order
        if node_labels:
            options.label_selector = dict(node_labels)
        return ExactValDataConfig(execution_options=options)
    return ExactValDataConfig()
