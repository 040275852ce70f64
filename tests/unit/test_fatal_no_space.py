"""A full checkpoint disk is an error no retry heals: recognised through Ray's wrappers, named in one line,
and recorded in Ray's cluster store when the full storage cannot hold the record itself."""

from __future__ import annotations

import errno
import os

import pytest

from imagenet_ray import storage
from imagenet_ray.errors import UserError
from imagenet_ray.train import fatal
from imagenet_ray.train.fatal import (
    PermanentError,
    checkpoint_storage_error,
    clear_fatal,
    fatal_url,
    is_no_space_error,
    read_fatal,
    record_fatal,
)


class RemoteError(Exception):  # like ray.exceptions.RayTaskError: str() a traceback, `cause` the remote error
    def __init__(self, text: str, cause: BaseException | None = None) -> None:
        super().__init__(text)
        self.cause = cause


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        RemoteError("Traceback ...\nOSError: [Errno 28] Error writing bytes to file"),  # text only, no errno
        RemoteError("ray::RayTrainWorker.run() failed", OSError(errno.ENOSPC, "No space left on device")),
    ],
)
def test_a_full_disk_is_recognised_through_wrappers(error):
    assert is_no_space_error(error)


@pytest.mark.parametrize(
    "error",
    [
        OSError("AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7, Couldn't connect to server"),
        FileNotFoundError(errno.ENOENT, "No such file or directory"),
        RuntimeError("The actor died unexpectedly before finishing this task"),
        OSError("s3://b/k: 28 objects"),  # a bare number is no errno
    ],
)
def test_other_failures_are_not_a_full_disk(error):
    assert not is_no_space_error(error)
    assert checkpoint_storage_error(error, "/vol/runs/exp/_fatal_error.txt") is None


def test_the_error_is_one_line_naming_the_run_storage_and_no_space_left():
    exc = OSError(errno.ENOSPC, "Error writing bytes to file.\nDetail: [errno 28] No space left on device")
    error = checkpoint_storage_error(exc, fatal_url("/vol/runs", "exp"), "the checkpoint of epoch 2")
    assert isinstance(error, PermanentError)
    message = str(error)
    assert message.startswith("/vol/runs/exp: no space left on device writing the checkpoint of epoch 2")
    assert "\n" not in message and "resubmit with the same name" in message


class FakeClusterStore:
    """Ray's internal KV as fatal.py uses it."""

    def __init__(self) -> None:
        self.kept: dict[tuple[str, str], bytes] = {}

    def _internal_kv_put(self, key, value, overwrite=True, *, namespace=None):
        self.kept[(namespace, key)] = value
        return True

    def _internal_kv_get(self, key, *, namespace=None):
        return self.kept.get((namespace, key))

    def _internal_kv_del(self, key, *, namespace=None):
        return int(self.kept.pop((namespace, key), None) is not None)


def test_a_record_the_storage_cannot_hold_goes_to_the_cluster_store(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    url = fatal_url(str(tmp_path / "a-file" / "runs"), "exp")  # a directory that cannot be made, like a full disk
    with pytest.raises(UserError):
        record_fatal(url, "x")  # outside Ray: nowhere else to put it
    store = FakeClusterStore()
    monkeypatch.setattr(fatal, "_cluster_kv", lambda: store)
    record_fatal(url, "/vol/runs/exp: no space left\non device")
    assert store.kept == {(fatal.KV_NAMESPACE, url): b"/vol/runs/exp: no space left on device"}
    assert read_fatal(url) == "/vol/runs/exp: no space left on device"  # what a restarted group and the driver see
    clear_fatal(url)  # a resubmission
    assert store.kept == {} and read_fatal(url) is None


def test_a_local_write_that_fails_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match="No space left on device"):
        storage.write_bytes_atomic(storage.resolve(str(tmp_path / "f.txt")), b"data")
    assert list(tmp_path.iterdir()) == []
