"""Errors no retry heals: recognised, recorded beside the checkpoints, and ended on without retrying."""

from __future__ import annotations

import pyarrow as pa
import pytest

from imagenet_ray.config import ExperimentConfig
from imagenet_ray.train.fatal import (
    PermanentError,
    clear_fatal,
    fatal_url,
    is_permanent_data_error,
    read_fatal,
    record_fatal,
)
from imagenet_ray.train.plan import WorkerPlan
from imagenet_ray.train.runner import Runner, permanent_data_errors


@pytest.mark.parametrize(
    "error",
    [
        OSError("Could not read page: CRC checksum verification failed"),
        pa.ArrowInvalid(
            "Parquet magic bytes not found in footer. Either the file is corrupted or this is not a parquet file."
        ),
        FileNotFoundError("/data/train/train-00003-of-00016.parquet: No such file or directory"),
        RuntimeError("task failed"),  # Ray Data's wrapper: the cause below names the shard's problem
    ],
)
def test_corrupt_or_missing_shards_are_permanent(error):
    if isinstance(error, RuntimeError):
        error.__cause__ = OSError("s3://bucket/train-00001.parquet: Couldn't deserialize thrift: invalid TType")
    assert is_permanent_data_error(error)


@pytest.mark.parametrize(
    "error",
    [
        OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7, Couldn't connect to server"),
        ConnectionResetError("connection reset by peer"),
        RuntimeError("The actor died unexpectedly before finishing this task"),
    ],
)
def test_outages_and_lost_workers_are_not(error):
    assert not is_permanent_data_error(error)


def test_the_reason_is_recorded_read_and_cleared_beside_the_checkpoints(tmp_path):
    url = fatal_url(str(tmp_path / "runs"), "exp1")
    assert url.endswith("runs/exp1/_fatal_error.txt") and read_fatal(url) is None
    clear_fatal(url)  # nothing there: no error
    record_fatal(url, "validation counted 9 images\nbut the manifest lists 10")
    assert read_fatal(url) == "validation counted 9 images but the manifest lists 10"  # one line
    clear_fatal(url)
    assert read_fatal(url) is None


def test_a_read_error_naming_a_corrupt_shard_becomes_permanent_others_pass_through():
    def batches(error):
        yield {"label": 1}
        raise error

    with pytest.raises(PermanentError, match="checksum"):
        list(permanent_data_errors(batches(OSError("CRC checksum verification failed"))))
    with pytest.raises(ConnectionResetError):
        list(permanent_data_errors(batches(ConnectionResetError("reset"))))


def _runner(tmp_path, fatal_reason=None) -> Runner:
    cfg = ExperimentConfig()
    runner = Runner.__new__(Runner)  # the pieces under test need no Ray context
    runner.cfg, runner.rank, runner.fatal_reason = cfg, 0, fatal_reason
    runner.plan = WorkerPlan(
        config=cfg,
        num_classes=2,
        classes=("a", "b"),
        num_train=10,
        num_val=4,
        tracking_uri="sqlite:////m.db",
        mlflow_run_id="r",
        fatal_error_url=fatal_url(str(tmp_path), "exp"),
    )
    return runner


def test_a_permanent_error_is_recorded_and_raised_and_a_restart_ends_before_training(tmp_path):
    runner = _runner(tmp_path)

    def wrong_val_count():
        raise PermanentError("validation counted 9 images but the manifest lists 10")

    runner.run_epochs = wrong_val_count  # type: ignore[method-assign]
    with pytest.raises(PermanentError):
        runner.run()
    assert read_fatal(runner.plan.fatal_error_url) == "validation counted 9 images but the manifest lists 10"

    restarted = _runner(tmp_path, fatal_reason=read_fatal(runner.plan.fatal_error_url))
    restarted.run_epochs = lambda: pytest.fail("a restart after a permanent error must not train")  # type: ignore[method-assign]
    restarted.run()  # returns: every rank ends cleanly, the driver raises the reason


def test_the_reason_is_the_projects_own_line_from_a_remote_error():
    from imagenet_ray.errors import UserError
    from imagenet_ray.train.fatal import permanent_reason

    class RemoteTaskError(Exception):  # like ray.exceptions.RayTaskError: str() is the remote traceback
        def __init__(self, cause):
            super().__init__("ray::ReadParquet() (pid=1)\nTraceback (most recent call last):\n  ...")
            self.cause = cause

    shard = UserError("s3://data/train/train-00002-of-00016.parquet: corrupt shard (CRC checksum verification failed)")
    error = RemoteTaskError(shard)
    assert is_permanent_data_error(error)
    assert permanent_reason(error) == str(shard)
    with pytest.raises(PermanentError, match=r"train-00002-of-00016\.parquet: corrupt shard"):

        def batches():
            yield {}
            raise error

        list(permanent_data_errors(batches()))
