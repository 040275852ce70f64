"""Ray Datasets for training and validation, built from a prepared dataset's manifest.

train: shard files in a new order every epoch (seeded) → decode + RandomResizedCrop + flip on CPU
       tasks → uint8 (N, H, W, 3) batches; each worker adds a local shuffle buffer when iterating.
val:   every shard, every row, eval preset; split across workers *without* equalising so that each
       image is seen exactly once (see ExactValDataConfig).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from imagenet_ray import storage
from imagenet_ray.data import transforms
from imagenet_ray.data.prepare import read_manifest

DECODE_BATCH_ROWS = 32


@dataclass(frozen=True)
class PreparedDataset:
    url: str
    manifest: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    def num_images(self, split: str) -> int:
        return int(self.manifest["splits"][split]["num_images"])

    def shard_paths(self, split: str) -> tuple[Any, list[str]]:
        root = storage.resolve(self.url)
        return root.fs, [root.child(s["path"]).path for s in self.manifest["splits"][split]["shards"]]


def open_prepared(url: str) -> PreparedDataset:
    return PreparedDataset(url, read_manifest(url))


def _train_map(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    # Fresh OS entropy per batch: augmentation must differ across tasks, epochs and restarts.
    return transforms.train_batch(batch, size, np.random.default_rng())


def _eval_map(batch: dict[str, np.ndarray], resize: int, crop: int) -> dict[str, np.ndarray]:
    return transforms.eval_batch(batch, resize, crop)


def build_train_dataset(prepared: PreparedDataset, crop: int, seed: int):
    import ray.data
    from ray.data import FileShuffleConfig

    fs, paths = prepared.shard_paths("train")
    ds = ray.data.read_parquet(
        paths, filesystem=fs, shuffle=FileShuffleConfig(seed=seed, reseed_after_execution=True),
    ).select_columns(["image", "label"])  # pushed down into the Parquet read
    return ds.map_batches(_train_map, fn_kwargs={"size": crop}, batch_size=DECODE_BATCH_ROWS, batch_format="numpy")


def build_val_dataset(prepared: PreparedDataset, resize: int, crop: int):
    import ray.data

    fs, paths = prepared.shard_paths("val")
    ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(["image", "label", "key"])
    return ds.map_batches(_eval_map, fn_kwargs={"resize": resize, "crop": crop},
                          batch_size=DECODE_BATCH_ROWS, batch_format="numpy")


def exact_val_data_config(equal_split: tuple[str, ...] = ("train",)):
    """A Ray Train DataConfig that splits `equal_split` datasets equally and every other one exactly.

    Ray Train's default `streaming_split(equal=True)` drops rows so that every worker gets the same
    count; fine for training (DDP needs equal step counts) but it would silently shrink validation.
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

    return ExactValDataConfig()
