"""Ray Datasets for training and validation from a DatasetSource (prepared shards or a raw ILSVRC layout).

train: a new shard/file order every epoch, fused read + decode + augment tasks → uint8 (N, H, W, 3) batches.
val: every image once, eval preset, split across workers without equalising (exact_val_data_config).
With decode_on="gpu" the JPEG bytes pass through and the worker decodes on its device (device_decode.py).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from imagenet_ray import storage
from imagenet_ray.data import transforms
from imagenet_ray.data.format import DatasetSource, check_shard_sizes, open_prepared
from imagenet_ray.data.layouts import ImageRecord, LayoutListing, detect_and_list, read_records, val_index_of
from imagenet_ray.data.shard_cache import DEFAULT_MAX_GB, ShardCache

if TYPE_CHECKING:
    import ray.data
    from ray.actor import ActorHandle
    from ray.train import DataConfig

DECODE_BATCH_ROWS = 32
RAW_ROWS_PER_BLOCK = 256


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

    def read(self, split: str, columns: list[str], seed: int | None = None) -> ray.data.Dataset:
        import ray.data

        records = list(self.listing.split(split))
        if seed is not None:
            records = [records[i] for i in np.random.default_rng(seed).permutation(len(records))]
        items = [
            {"key": r.key, "path": r.path, "offset": r.offset, "size": r.size, "label": r.label, "wnid": r.wnid}
            for r in records
        ]
        blocks = max(1, len(items) // RAW_ROWS_PER_BLOCK)
        ds: ray.data.Dataset = ray.data.from_items(items, override_num_blocks=blocks)
        if seed is not None:
            ds = ds.randomize_block_order()  # a new block order every epoch
            # (the ignores: Ray's stubs do not know that fn_kwargs fill a map function's extra parameters)
        ds = ds.map_batches(
            _read_raw,  # type: ignore[arg-type]
            fn_kwargs={"root_url": self.url},
            batch_size=DECODE_BATCH_ROWS,
            batch_format="numpy",
        )
        return ds.select_columns(columns)


def _read_raw(batch: dict[str, np.ndarray], root_url: str) -> dict[str, np.ndarray]:
    root = storage.resolve(root_url)
    records = [
        ImageRecord(str(k), str(w), int(label), int(s), str(p), int(o))
        for k, w, label, s, p, o in zip(
            batch["key"], batch["wnid"], batch["label"], batch["size"], batch["path"], batch["offset"], strict=True
        )
    ]
    images = list(read_records(root, records))
    return {"image": np.array(images, dtype=object), "label": batch["label"], "key": batch["key"]}


def open_source(
    url: str, source: str, shard_cache_dir: str | None = None, shard_cache_max_gb: float = DEFAULT_MAX_GB
) -> DatasetSource:
    """`source` = "prepared" (Parquet shards + manifest) or "raw" (an ILSVRC layout, see layouts.py).

    A prepared dataset with a missing shard, or one of another size than the manifest records, is refused
    here (one line naming the shard), before any Ray worker starts. `shard_cache_dir` (data.shard_cache_dir):
    a remote prepared dataset's shards are kept there on each node after their first read."""
    if source == "raw":
        return RawLayoutDataset(url, detect_and_list(url))
    cache = ShardCache(shard_cache_dir, shard_cache_max_gb) if shard_cache_dir is not None else None
    data = open_prepared(url, cache)
    check_shard_sizes(data)
    return data


def row_chunks(batch: dict[str, np.ndarray], rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive slices of at most `rows` rows of a column batch."""
    n = len(next(iter(batch.values())))
    for start in range(0, n, rows):
        yield {k: v[start : start + rows] for k, v in batch.items()}


def _train_map(
    block: dict[str, np.ndarray],
    size: int,
    scale: tuple[float, float] = transforms.RRC_SCALE,
    ratio: tuple[float, float] = transforms.RRC_RATIO,
) -> Iterator[dict[str, np.ndarray]]:
    # A whole read block (a shard, or part of one) per call, so Ray can fuse read and decode into one
    # task; decoded in chunks so that memory stays per-chunk and output streams out. Rows are visited
    # in a fresh random order (the shard order already changes every epoch; this changes the order
    # within each shard too). Fresh OS entropy: augmentation differs across tasks, epochs, restarts.
    rng = np.random.default_rng()
    order = rng.permutation(len(block["label"]))
    block = {k: np.asarray(v)[order] for k, v in block.items()}
    for chunk in row_chunks(block, DECODE_BATCH_ROWS):
        yield transforms.train_batch(chunk, size, rng, scale=scale, ratio=ratio)


def _val_indices(keys: np.ndarray) -> np.ndarray:
    return np.array([val_index_of(str(k)) for k in keys], dtype=np.int64)


def _eval_map(
    block: dict[str, np.ndarray], resize: int, crop: int, with_val_index: bool = False
) -> Iterator[dict[str, np.ndarray]]:
    for chunk in row_chunks(block, DECODE_BATCH_ROWS):
        out = transforms.eval_batch(chunk, resize, crop)
        if with_val_index:
            out["val_index"] = _val_indices(chunk["key"])
        yield out


def _val_index_map(block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """JPEG bytes passed through (decode on the GPU), the key replaced by its val index."""
    return {"image": block["image"], "label": block["label"], "val_index": _val_indices(block["key"])}


def build_train_dataset(
    data: DatasetSource,
    crop: int,
    seed: int,
    decode_on: str = "cpu",
    deterministic: bool = False,
    rrc_scale: tuple[float, float] = transforms.RRC_SCALE,
    rrc_ratio: tuple[float, float] = transforms.RRC_RATIO,
) -> ray.data.Dataset:
    """Train rows: JPEG bytes (decode_on="gpu"), or RandomResizedCrop(crop, rrc_scale, rrc_ratio) + flip."""
    # Deterministic runs keep the file order fixed; the worker shuffles locally with a per-epoch seed.
    ds = data.read("train", ["image", "label"], seed=None if deterministic else seed)
    if decode_on == "gpu":
        return ds  # JPEG bytes go to the worker
    return ds.map_batches(
        _train_map,  # type: ignore[arg-type]
        fn_kwargs={"size": crop, "scale": tuple(rrc_scale), "ratio": tuple(rrc_ratio)},
        batch_size=None,
        batch_format="numpy",
    )


def build_val_dataset(
    data: DatasetSource, resize: int, crop: int, decode_on: str = "cpu", with_val_index: bool = False
) -> ray.data.Dataset:
    """Every val image once; with_val_index adds an int64 `val_index` (ILSVRC2012 val index, -1 if none)."""
    ds = data.read("val", ["image", "label", "key"])
    if decode_on == "gpu":
        if with_val_index:
            return ds.map_batches(_val_index_map, batch_size=None, batch_format="numpy")
        return ds.select_columns(["image", "label"])
    kwargs = {"resize": resize, "crop": crop, "with_val_index": with_val_index}
    return ds.map_batches(_eval_map, fn_kwargs=kwargs, batch_size=None, batch_format="numpy")  # type: ignore[arg-type]


def pin_reads_to(node_labels: dict[str, str]) -> None:
    """Send Ray Data's own tasks at dataset construction (Parquet metadata sampling) where decoding goes:
    they follow the driver's DataContext selector, not the trainer's DataConfig."""
    from ray.data import DataContext

    if node_labels:
        DataContext.get_current().execution_options.label_selector = dict(node_labels)


def exact_val_data_config(
    equal_split: tuple[str, ...] = ("train",), preserve_order: bool = False, node_labels: dict[str, str] | None = None
) -> DataConfig:
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
        def configure(
            self,
            datasets: dict[str, ray.data.Dataset],
            world_size: int,
            worker_handles: list[ActorHandle[Any]] | None,
            worker_node_ids: list[str] | None,
            **kwargs: Any,
        ) -> list[dict[str, ray.data.DataIterator]]:
            output: list[dict[str, Any]] = [{} for _ in range(world_size)]
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

    from ray.data.context import DataContext

    # DataConfig.default_ingest_options() would pass the deprecated exclude_resources (a warning in every
    # job log); a copy of the driver's options carries the same settings without it.
    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = preserve_order
    if node_labels:
        options.label_selector = dict(node_labels)
    return ExactValDataConfig(execution_options=options)


def plain_progress_logs() -> None:
    """Ray Data's progress as plain log lines in a job's log: its default in a Ray worker is Ray's tqdm
    bars, which a job log (a file, not a terminal) shows as cursor-movement escapes, with a notice about
    another progress UI. Without tqdm in a worker it logs progress lines instead."""
    from ray.data.context import DataContext

    DataContext.get_current().use_ray_tqdm = False
