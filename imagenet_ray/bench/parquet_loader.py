"""The floor under Ray's overhead: a torch DataLoader over our own Parquet shards, decoding with our kernel.

Each of N workers reads whole shards (a new shard order every epoch, rows in a new order within each shard,
page checksums verified, as the Ray side does) and decodes batch-size rows at a time with
transforms.train_batch, the kernel Ray Data maps; no Ray, no object store, no shuffle buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch.utils.data

# What bench/data.py's loop makes of a side: given batches_for_epoch(epoch), the side's timed summary.
Measure = Callable[[Callable[[int], Iterable[Any]]], dict[str, Any]]


class ParquetShards(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """The train split of a prepared dataset at `url` as decoded batches, split by shard across workers."""

    def __init__(self, url: str, crop: int, batch_size: int, seed: int = 0) -> None:
        from imagenet_ray.data.format import open_prepared

        self.fs, self.paths = open_prepared(url).shard_paths("train")  # the filesystem pickles (endpoint kept)
        self.crop, self.batch_size, self.seed, self.epoch = crop, batch_size, seed, 0

    def _read(self, path: str) -> dict[str, np.ndarray]:
        import pyarrow.dataset as pds

        from imagenet_ray.data.shard_reader import verifying_scan_options

        fmt = pds.ParquetFileFormat(default_fragment_scan_options=verifying_scan_options())
        table = pds.dataset(path, filesystem=self.fs, format=fmt).to_table(columns=["image", "label"])
        return {
            "image": table.column("image").to_numpy(zero_copy_only=False),
            "label": table.column("label").to_numpy(),
        }

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        from imagenet_ray.data import transforms

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Every worker draws the same shard order (same seed, same epoch count) and takes its slice of it.
        order = np.random.default_rng(self.seed + self.epoch).permutation(len(self.paths))
        self.epoch += 1
        rng = np.random.default_rng()  # fresh OS entropy per worker and epoch, as pipeline._train_map
        for index in order[worker::workers]:
            block = self._read(self.paths[index])
            rows = rng.permutation(len(block["label"]))
            for start in range(0, len(rows), self.batch_size):
                take = rows[start : start + self.batch_size]
                yield transforms.train_batch({k: v[take] for k, v in block.items()}, self.crop, rng)


def run_parquet_loader_side(url: str, crop: int, batch_size: int, workers: int, measure: Measure) -> dict[str, Any]:
    """DataLoader(ParquetShards(url), N workers, persistent, prefetch 2), iterated like every other side."""
    dataset = ParquetShards(url, crop, batch_size)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,  # the dataset yields whole batches (the kernel writes them in place)
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
    )
    out = measure(lambda _e: loader)
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:  # its workers stop now, not when a later side's fork collects them
        iterator._shutdown_workers()
        loader._iterator = None
    out["workers"] = workers
    out["shards"] = len(dataset.paths)
    return out
