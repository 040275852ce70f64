"""train.throttle_images_per_s and train.skip_step: the step pacer on a fake clock, and a whole epoch of the Runner
without Ray (sleeps count as step time, never as data wait; no pacing and no new metric when the knob is unset;
the first batch's wait reported apart from the steady state)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from imagenet_ray.config import ExperimentConfig, load_config
from imagenet_ray.errors import ConfigError
from imagenet_ray.train.mid_epoch import CheckpointClock
from imagenet_ray.train.plan import WorkerPlan
from imagenet_ray.train.progress import ProgressLine
from imagenet_ray.train.runner import Runner
from imagenet_ray.train.step import StepPacer, TrainStep

CPU = torch.device("cpu")


class _Clock:
    def __init__(self) -> None:
        self.now, self.sleeps = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_pacer_sleeps_the_rest_of_images_over_rate():
    clock = _Clock()
    pacer = StepPacer(100.0, clock=clock, sleep=clock.sleep)
    with pacer.pace(10):  # 10 images at 100/s: 0.1 s; the step took 0.03 s
        clock.now += 0.03
    assert clock.sleeps == [pytest.approx(0.07)]
    with pacer.pace(10):  # a step slower than the throttle is left alone
        clock.now += 0.25
    assert len(clock.sleeps) == 1
    assert pacer.slept_s == pytest.approx(0.07) and clock.now == pytest.approx(0.35)


def test_pacer_off_reads_no_clock_and_never_sleeps():
    def fail() -> float:
        raise AssertionError("the clock must not be read without a throttle")

    pacer = StepPacer(None, clock=fail, sleep=lambda s: fail())
    with pacer.pace(512):
        pass
    assert pacer.slept_s == 0.0
    with pytest.raises(ValueError):
        StepPacer(0.0)


def test_config_knob_is_optional_and_positive():
    assert ExperimentConfig().train.throttle_images_per_s is None
    assert load_config(None, ["train.throttle_images_per_s=250"]).train.throttle_images_per_s == 250.0
    with pytest.raises(ConfigError, match=r"train\.throttle_images_per_s"):
        load_config(None, ["train.throttle_images_per_s=0"])


class _Shard:
    """A worker's dataset shard: `batches` batches of 4 tiny images, each `delay_s` late (slow data)."""

    def __init__(self, batches: int, delay_s: float = 0.0, first_delay_s: float = 0.0) -> None:
        self.batches, self.delay_s, self.first_delay_s = batches, delay_s, first_delay_s

    def iter_torch_batches(self, **kwargs):
        g = torch.Generator().manual_seed(0)
        time.sleep(self.first_delay_s)  # a pipeline's start-up
        for _ in range(self.batches):
            time.sleep(self.delay_s)
            yield {
                "image": torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=g),
                "label": torch.tensor([0, 1, 2, 1]),
            }


def _runner(throttle: float | None, shard: _Shard, skip_step: bool = False) -> Runner:
    cfg = ExperimentConfig.model_validate(
        {
            "data": {"train_crop": 16, "batch_size": 4},
            "train": {"throttle_images_per_s": throttle, "skip_step": skip_step},
        }
    )
    runner = Runner.__new__(Runner)  # the epoch loop needs no Ray context
    runner.cfg, runner.device, runner.world, runner.rank = cfg, CPU, 1, 0
    runner.plan = WorkerPlan(cfg, 3, ("a", "b", "c"), 4 * shard.batches, 3, "sqlite:////m.db", "r")
    runner.aug_rng = np.random.default_rng(0)
    runner.train_shard = shard
    runner.schedule = lambda step: 0.01
    runner.queue, runner.grid_logged = None, True  # rank 0's MLflow writes: not under test here
    runner.progress = ProgressLine(cfg.train.epochs, shard.batches, cfg.mlflow.progress_every_s)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    runner.step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.01), runner.schedule)
    runner.mid_epoch, runner.audit, runner.ema = None, None, None  # no resume, no audit, no EMA
    runner.clock = CheckpointClock(None, None)  # no mid-epoch checkpoints, no preemption barrier
    return runner


def _second_epoch(runner: Runner) -> dict[str, float]:
    runner.train_one_epoch(0, 16)  # the first one also pays for torch's lazy start-up
    return runner.train_one_epoch(1, 16)


def test_throttled_epoch_consumes_at_most_the_rate_and_sleep_is_not_data_wait():
    # 4 images per batch at ≤ 40 images/s: ≥ 100 ms per step, where the real step takes a few ms
    metrics = _second_epoch(_runner(40.0, _Shard(batches=6)))
    assert metrics["train/images"] == 24
    assert 10 < metrics["perf/epoch_images_per_s"] <= 40
    assert metrics["perf/throttle_sleep_frac"] > 0.25  # most of each 100 ms (less on a loaded machine)
    assert metrics["perf/epoch_data_wait_frac"] < 0.2


def test_throttled_epoch_with_slow_data_counts_the_wait():
    # a batch every 200 ms, steps paced to 100 ms. This shard does not prefetch, so data and step alternate:
    # 200 / (200 + 100) = 0.67 of the epoch is data wait (Ray Data prefetches: there, 1 - 20/40 = 0.5).
    metrics = _second_epoch(_runner(40.0, _Shard(batches=4, delay_s=0.2)))
    assert 0.5 < metrics["perf/epoch_data_wait_frac"] < 0.8
    # ~0.2 unloaded; a loaded machine steps slower and sleeps less (0.04 seen with a benchmark beside it)
    assert 0.0 < metrics["perf/throttle_sleep_frac"] < 0.4
    assert metrics["perf/epoch_images_per_s"] < 15  # 4 images per 300 ms


def test_unthrottled_epoch_is_unchanged():
    metrics = _second_epoch(_runner(None, _Shard(batches=6)))
    assert "perf/throttle_sleep_frac" not in metrics
    assert metrics["train/images"] == 24 and metrics["perf/epoch_images_per_s"] > 40  # a few ms per step


def test_first_batch_wait_is_reported_apart_from_the_steady_state():
    # 0.3 s of start-up, then a batch every 50 ms for steps paced to 100 ms (each late batch arrives while
    # the step sleeps: no steady wait beyond the iterator's own few ms)
    metrics = _second_epoch(_runner(40.0, _Shard(batches=5, delay_s=0.05, first_delay_s=0.3)))
    assert 0.3 <= metrics["perf/first_batch_s"] < 0.45
    assert metrics["perf/epoch_data_wait_frac"] > 0.3  # 0.3 + 4 x 0.05 of ~0.8 s in all
    assert metrics["perf/steady_data_wait_frac"] < metrics["perf/epoch_data_wait_frac"] - 0.2


def test_skip_step_consumes_batches_without_training():
    runner = _runner(40.0, _Shard(batches=6), skip_step=True)
    before = [p.detach().clone() for p in runner.step.model.parameters()]
    metrics = _second_epoch(runner)
    assert metrics["train/images"] == 24 and 10 < metrics["perf/epoch_images_per_s"] <= 40  # still paced
    assert "train/epoch_loss" not in metrics and "train/lr" not in metrics  # nothing trained: nothing to report
    assert runner.step.step == 12  # 2 epochs of 6 batches: the step axis moves without an optimizer step
    assert all(torch.equal(a, b) for a, b in zip(before, runner.step.model.parameters(), strict=True))
    assert load_config(None, ["train.skip_step=true"]).train.skip_step is True
