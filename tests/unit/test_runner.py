"""Runner pieces without Ray: the data-wait timer, the train iterator's options, a batch's model input."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from imagenet_ray.config import ExperimentConfig
from imagenet_ray.train.plan import WorkerPlan
from imagenet_ray.train.runner import DataWaitTimer, Runner, train_batches

CPU = torch.device("cpu")


def test_data_wait_timer_counts_only_the_time_blocked_on_the_iterator():
    def slow():
        for i in range(3):
            time.sleep(0.02)
            yield i

    timed = DataWaitTimer(slow())
    seen = []
    for item in timed:
        time.sleep(0.03)  # "training": not counted
        seen.append(item)
    assert seen == [0, 1, 2]
    assert 0.05 <= timed.wait_s < 0.09


class _FakeShard:
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def iter_torch_batches(self, **kwargs):
        self.calls.append(kwargs)
        return iter([{"image": torch.zeros(1, 2, 2, 3, dtype=torch.uint8), "label": torch.tensor([0])}])


@pytest.mark.parametrize("buffer,seed,expected_seed", [(256, 7, 7), (0, 7, None), (256, None, None)])
def test_train_batches_shuffle_seed_only_with_a_buffer(buffer, seed, expected_seed):
    data = ExperimentConfig.model_validate({"data": {"local_shuffle_buffer": buffer, "batch_size": 8}}).data
    shard = _FakeShard()
    assert len(list(train_batches(shard, data, 64, CPU, np.random.default_rng(0), seed))) == 1
    (kwargs,) = shard.calls
    assert kwargs["batch_size"] == 8 and kwargs["device"] == CPU
    assert kwargs["local_shuffle_buffer_size"] == (buffer or None)
    assert kwargs.get("local_shuffle_seed") == expected_seed


def _runner(data: dict, optim: dict | None = None, train: dict | None = None) -> Runner:
    cfg = ExperimentConfig.model_validate({"data": data, "optim": optim or {}, "train": train or {}})
    runner = Runner.__new__(Runner)  # the pieces under test need no Ray context
    runner.cfg = cfg
    runner.plan = WorkerPlan(
        config=cfg,
        num_classes=5,
        classes=tuple("abcde"),
        num_train=10,
        num_val=5,
        tracking_uri="sqlite:////m.db",
        mlflow_run_id="r",
    )
    runner.aug_rng = np.random.default_rng(0)
    return runner


def _batch(n: int = 4, size: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g),
        "label": torch.tensor([0, 1, 2, 3], dtype=torch.int32),
    }


def test_model_input_resizes_to_the_epochs_crop_and_keeps_integer_labels():
    x, target = _runner({}).model_input(_batch(), 32)
    assert x.shape == (4, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    assert target.dtype == torch.int64 and target.tolist() == [0, 1, 2, 3]


def test_model_input_with_mixing_gives_soft_targets():
    x, target = _runner({"mixup_alpha": 0.2}, {"label_smoothing": 0.1}).model_input(_batch(), 64)
    assert x.shape == (4, 3, 64, 64)
    assert target.shape == (4, 5) and torch.allclose(target.sum(1), torch.ones(4))


def test_time_box():
    assert not _runner({}).time_box_reached(99)
    boxed = _runner({}, train={"epochs": 5, "stop_after_epochs": 2})
    assert not boxed.time_box_reached(1) and boxed.time_box_reached(2)


class _RecordingQueue:
    def __init__(self) -> None:
        self.metrics: list[tuple[dict, int]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.metrics.append((metrics, step))


def test_an_epoch_checkpointed_but_not_logged_is_logged_from_the_checkpoint_once():
    """A failure between ray.train.report (the checkpoint exists) and the MLflow write: on restore, rank 0
    logs that epoch from the checkpoint's metrics; an epoch MLflow already has is not logged again."""
    runner = _runner({})
    runner.queue = _RecordingQueue()  # type: ignore[assignment]
    runner.start_epoch, runner.start_step = 2, 40
    runner.restored_metrics = {"epoch": 2.0, "val/top1": 0.5}
    runner.logged_epochs = {1}
    runner.relog_restored_epoch()
    runner.relog_restored_epoch()
    ((metrics, step),) = runner.queue.metrics  # type: ignore[attr-defined]
    assert step == 40 and metrics["val/top1"] == 0.5 and metrics["epoch"] == 2.0
    assert runner.logged_epochs == {1, 2}

    already = _runner({})
    already.queue = _RecordingQueue()  # type: ignore[assignment]
    already.start_epoch, already.start_step, already.restored_metrics = 2, 40, {"epoch": 2.0}
    already.logged_epochs = {1, 2}
    already.relog_restored_epoch()
    assert already.queue.metrics == []  # type: ignore[attr-defined]


def test_a_mid_epoch_resume_places_the_lr_where_the_uninterrupted_run_is():
    """Resumed after 4 of 5 batches of epoch 2 (0-based 1) on the same world: the LR of every later step
    equals the fresh run's; on another world size, by the share of the epoch's samples trained."""
    from imagenet_ray.train.mid_epoch import MidEpochState
    from imagenet_ray.train.optim import ResumedSchedule, schedule_from_config

    runner = _runner({"batch_size": 1}, {"schedule": "cosine", "warmup_epochs": 0.5}, {"epochs": 3})
    runner.world = 2
    runner.schedule = schedule_from_config(runner.cfg.optim, 0.1, steps_per_epoch=5, epochs=3)
    fresh = ResumedSchedule(runner.schedule)
    runner.mid_epoch = MidEpochState(epoch=1, batches=4, samples=8, loss_sum=0.0, decode_errors=0, world=2)
    resumed = ResumedSchedule(runner.schedule, 9, 1 + runner.epoch_fraction_done())
    assert [resumed(s) for s in range(9, 15)] == [fresh(s) for s in range(9, 15)]
    # The same 8 of 10 samples trained by 1 worker of 10 steps per epoch: position 10 + 8.
    runner.world, runner.schedule = 1, schedule_from_config(runner.cfg.optim, 0.1, steps_per_epoch=10, epochs=3)
    assert ResumedSchedule(runner.schedule, 9, 1 + runner.epoch_fraction_done()).position(9) == 18


class _BytesShard:
    def iter_batches(self, **kwargs):
        return iter([{"image": np.array([b"a", b"b"], dtype=object), "label": np.array([i, i])} for i in range(4)])


def test_a_resumed_epoch_skips_the_batches_trained_without_decoding_them(monkeypatch):
    import imagenet_ray.train.runner as runner_module

    decoded: list[list[bytes]] = []
    bounds_seen: list[tuple] = []  # RandomResizedCrop's scale and ratio, from the data section
    monkeypatch.setattr(
        runner_module,
        "train_batch_on_device",
        lambda images, crop, device, rng, *bounds: (
            decoded.append(images) or bounds_seen.append(bounds) or torch.zeros(len(images), 3, crop, crop)
        ),
    )
    audited: list[int] = []
    data = ExperimentConfig.model_validate({"data": {"decode_on": "gpu"}}).data
    batches = list(
        train_batches(
            _BytesShard(), data, 8, CPU, np.random.default_rng(0), skip_batches=3, audit=lambda i, _: audited.append(i)
        )
    )
    assert [int(b["label"][0]) for b in batches] == [3] and len(decoded) == 1 and audited == [3]
    assert bounds_seen == [(data.rrc_scale, data.rrc_ratio)]
