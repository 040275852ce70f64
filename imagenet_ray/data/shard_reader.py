"""Ray Data's Parquet reader for prepared shards, with every page's CRC checked and a corrupt shard named.

pyarrow's checksum error names no file and Ray Data adds none, so each read task is wrapped to raise a
CorruptShardError (a UserError) naming the shard. Built on Ray's V1 Parquet datasource, a private class of
the pinned Ray (checked by tests/pipeline/test_shard_integrity.py); why and the cost: docs/reliability.md.
"""

from __future__ import annotations

import functools
import posixpath
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data
from ray.data._internal.datasource.parquet_datasource import ParquetDatasource
from ray.data.block import Block
from ray.data.datasource import ReadTask

from imagenet_ray.errors import UserError, describe_error
from imagenet_ray.redact import redact_url

# Lower-case parts of pyarrow's messages for bytes that are not what was written: a page CRC mismatch, a
# damaged page header. Any other error (a network failure, access denied) passes through unchanged.
_CORRUPTION_MARKERS = ("checksum", "page integrity", "invalid page header", "deserialize thrift", "corrupt")


class CorruptShardError(UserError):
    """A shard whose bytes are not what prepare wrote: retrying cannot help. str() is the one line made here,
    whatever was appended later: Ray Data appends its retry guidance ("Failed to ... after 1/1 attempts ...
    if you believe this to be transient") to an exception's first argument on the way out of a task."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.line = str(self.args[0]).split("\n", 1)[0]  # also when unpickled from the appended argument

    def __str__(self) -> str:
        return self.line


def is_corruption(exc: BaseException) -> bool:
    return isinstance(exc, OSError | pa.ArrowException) and any(m in str(exc).lower() for m in _CORRUPTION_MARKERS)


def corrupt_shard_message(shard: str, exc: BaseException, dataset_url: str) -> str:
    """One line: the shard, what pyarrow found, and how to get a good copy back."""
    found = str(exc).strip().split("\n", 1)[0] or type(exc).__name__  # not the retry guidance Ray appends
    return (
        f"{redact_url(shard)}: corrupt shard ({describe_error(OSError(found), 160)}); delete it and re-run "
        f"`imagenet-ray prepare` with the same --source and --out to rewrite it "
        f"(`imagenet-ray verify {redact_url(dataset_url)}` checks every shard)"
    )


def verifying_scan_options() -> pds.ParquetFragmentScanOptions:
    """Ray Data's own scan options for its Parquet reads (buffered stream, buffer size: it sets them only
    when a read passes none), plus page checksum verification."""
    return pds.ParquetFragmentScanOptions(
        use_buffered_stream=ParquetDatasource._DEFAULT_FRAGMENT_USE_BUFFERED_STREAM,
        buffer_size=ParquetDatasource._DEFAULT_FRAGMENT_SCAN_BUFFER_SIZE,
        page_checksum_verification=True,
    )


class CheckedParquetDatasource(ParquetDatasource):
    """Ray Data's Parquet datasource with verified page checksums; a corrupt shard's error names it.

    `shard_urls`: filesystem path → URL of every shard (the URL goes in the error)."""

    def __init__(
        self,
        paths: list[str],
        *,
        filesystem: pafs.FileSystem,
        shard_urls: Mapping[str, str],
        dataset_url: str,
        **kw: Any,
    ) -> None:
        super().__init__(
            paths, filesystem=filesystem, to_batch_kwargs={"fragment_scan_options": verifying_scan_options()}, **kw
        )
        self._shard_fs = filesystem
        self._shard_urls = dict(shard_urls)
        self._dataset_url = dataset_url

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        tasks = super().get_read_tasks(parallelism, per_task_row_limit=per_task_row_limit, data_context=data_context)
        return [
            ReadTask(
                functools.partial(
                    _read_naming_shard, task.read_fn, self._shard_fs, self._task_shards(task), self._dataset_url
                ),
                task.metadata,
                schema=task.schema,
                per_task_row_limit=task.per_task_row_limit,
            )
            for task in tasks
        ]

    def _task_shards(self, task: ReadTask) -> list[tuple[str, str]]:
        files = task.metadata.input_files  # a numpy array of the task's paths
        paths = [str(p) for p in files] if files is not None else []
        return [(p, self._shard_urls.get(p, p)) for p in paths]


def _read_naming_shard(
    read_fn: Callable[[], Iterable[Block]], fs: pafs.FileSystem, shards: list[tuple[str, str]], dataset_url: str
) -> Iterator[Block]:
    """A read task's blocks; a corruption error becomes a CorruptShardError naming the shard."""
    try:
        yield from read_fn()
    except (OSError, pa.ArrowException) as exc:
        if not is_corruption(exc):
            raise
        raise CorruptShardError(corrupt_shard_message(_corrupt_one(fs, shards), exc, dataset_url)) from exc


def _corrupt_one(fs: pafs.FileSystem, shards: list[tuple[str, str]]) -> str:
    """Which of a read task's shards is corrupt (a task reads several when there are fewer blocks than
    shards): each is read again with verification, on this failure path only."""
    if len(shards) == 1:
        return shards[0][1]
    for path, url in shards:
        try:
            with fs.open_input_file(path) as f:
                for _ in pq.ParquetFile(f, page_checksum_verification=True).iter_batches():
                    pass
        except (OSError, pa.ArrowException) as exc:
            if is_corruption(exc):
                return url
    common = posixpath.commonpath([u for _, u in shards]) if shards else "?"
    return f"one of {len(shards)} shards under {common}"


def read_shards(
    paths: list[str],
    fs: pafs.FileSystem,
    shard_urls: Mapping[str, str],
    dataset_url: str,
    shuffle: ray.data.FileShuffleConfig | None,
    override_num_blocks: int | None,
) -> ray.data.Dataset:
    """The shards at `paths` as one Ray Dataset (what `ray.data.read_parquet(paths, filesystem=fs, shuffle=...,
    override_num_blocks=...)` builds with the V1 reader), page checksums verified."""
    datasource = CheckedParquetDatasource(
        paths,
        filesystem=fs,
        shard_urls=shard_urls,
        dataset_url=dataset_url,
        shuffle=shuffle,
        file_extensions=ParquetDatasource._FILE_EXTENSIONS,  # read_parquet's default
    )
    ds: ray.data.Dataset = ray.data.read_datasource(datasource, override_num_blocks=override_num_blocks)
    return ds
