"""LrSchedule as a pure function of the optimizer step, and the schedules the shipped recipes build.

References: FFCV's `get_cyclic_lr` (libffcv/ffcv-imagenet train_imagenet.py: np.interp over epochs through
(0, 1e-4·lr), (lr_peak_epoch=2, lr), (epochs, 0), interpolated per iteration), torchvision's V1 recipe
(StepLR(step_size=30, gamma=0.1), no warmup) and MLPerf's ResNet-50 PolynomialDecayWithWarmup
(mlcommons/training image_classification/tensorflow2/lars_util.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from pathlib import Path

import numpy as np
import pytest

from imagenet_ray.config import OptimSection, load_config
from imagenet_ray.train.optim import LrSchedule, lr_at, scaled_lr, schedule_from_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _ffcv_step_lr(step: int, peak: float, steps_per_epoch: int, epochs: int, peak_epoch: int = 2) -> float:
    """FFCV's per-iteration LR: the epoch-level np.interp, linearly interpolated inside each epoch."""

    def epoch_lr(e):
        return float(np.interp([e], [0, peak_epoch, epochs], [1e-4 * peak, peak, 0])[0])

    epoch, ix = divmod(step, steps_per_epoch)
    start, end = epoch_lr(epoch), epoch_lr(epoch + 1)
    return float(np.interp([ix], [0, steps_per_epoch], [start, end])[0])


# ---------------------------------------------------------------- warmup


def test_warmup_is_linear_from_start_factor_and_peaks_at_last_warmup_step():
    peak, spe, f = 1.7, 50, 1e-4
    s = LrSchedule(
        peak_lr=peak,
        total_steps=88 * spe,
        warmup_steps=2 * spe,
        schedule="linear",
        steps_per_epoch=spe,
        warmup_start_factor=f,
    )
    w = s.warmup_steps
    lrs = [s(i) for i in range(w)]
    inc = peak * (1 - f) / w
    # constant increments of (1 - f)·peak / W: a straight line ...
    assert all(b - a == pytest.approx(inc, rel=1e-9) for a, b in itertools.pairwise(lrs))
    # ... that starts at f·peak (one increment before step 0: step 0 already got its first increment) ...
    assert lrs[0] - inc == pytest.approx(f * peak, rel=1e-6)
    assert lrs[0] == pytest.approx(peak * (f + (1 - f) / w))
    # ... and reaches the peak exactly at the last warmup step, then the decay starts from the peak
    assert lrs[-1] == pytest.approx(peak, rel=1e-12)
    assert s(w) == pytest.approx(peak, rel=1e-12)
    assert s(w + 1) < peak
    assert max(lrs) <= peak * (1 + 1e-12)


def test_warmup_start_factor_zero_starts_at_one_increment():
    s = LrSchedule(peak_lr=0.8, total_steps=100, warmup_steps=8, schedule="cosine")
    assert s(0) == pytest.approx(0.1)
    assert s(3) == pytest.approx(0.4)
    assert s(7) == pytest.approx(0.8)


def test_warmup_start_factor_one_means_no_ramp():
    s = LrSchedule(peak_lr=0.3, total_steps=100, warmup_steps=10, schedule="constant", warmup_start_factor=1.0)
    assert {s(i) for i in range(0, 20)} == {0.3}


def test_ffcv_linear_matches_ffcv_reference_step_for_step():
    """After the ramp the schedule is FFCV's exactly; inside the ramp it leads FFCV by one step."""
    peak, spe, epochs = 1.7, 13, 16
    s = LrSchedule(
        peak_lr=peak,
        total_steps=epochs * spe,
        warmup_steps=2 * spe,
        schedule="linear",
        steps_per_epoch=spe,
        warmup_start_factor=1e-4,
    )
    w = s.warmup_steps
    assert _ffcv_step_lr(0, peak, spe, epochs) == pytest.approx(1e-4 * peak)  # the reference starts there
    assert _ffcv_step_lr(w, peak, spe, epochs) == pytest.approx(peak)  # and peaks at epoch 2
    for step in range(w, epochs * spe):
        assert s(step) == pytest.approx(_ffcv_step_lr(step, peak, spe, epochs), rel=1e-9, abs=1e-12), step
    for step in range(w):
        assert s(step) == pytest.approx(_ffcv_step_lr(step + 1, peak, spe, epochs), rel=1e-9), step
        # never more than one warmup increment away from the reference
        assert abs(s(step) - _ffcv_step_lr(step, peak, spe, epochs)) <= peak / w + 1e-12


# ---------------------------------------------------------------- decay shapes


def test_linear_decays_to_zero_and_is_linear_in_between():
    s = LrSchedule(peak_lr=2.0, total_steps=110, warmup_steps=10, schedule="linear")
    # post-warmup span is 100 steps: lr = 2·(1 - (step - 10)/100), checked by hand at three points
    assert s(10) == pytest.approx(2.0)
    assert s(35) == pytest.approx(1.5)
    assert s(60) == pytest.approx(1.0)
    assert s(100) == pytest.approx(0.2)
    assert s(109) == pytest.approx(0.02)
    assert s(110) == pytest.approx(0.0, abs=1e-12)
    assert s(500) == pytest.approx(0.0, abs=1e-12)  # clamped past the end, never negative
    tail = [s(i) for i in range(10, 111)]
    diffs = [a - b for a, b in itertools.pairwise(tail)]
    assert all(d == pytest.approx(0.02) for d in diffs)


def test_linear_without_warmup():
    s = LrSchedule(peak_lr=1.0, total_steps=100, schedule="linear")
    assert [s(0), s(25), s(50), s(90), s(100)] == pytest.approx([1.0, 0.75, 0.5, 0.1, 0.0], abs=1e-12)


def test_cosine_is_half_at_midpoint_of_post_warmup_span():
    peak, w, total = 0.5, 20, 220
    s = LrSchedule(peak_lr=peak, total_steps=total, warmup_steps=w, schedule="cosine")
    assert s(w) == pytest.approx(peak)
    assert s(w + 100) == pytest.approx(peak / 2)  # midpoint of the 200-step span, not of the whole run
    assert s(total // 2) != pytest.approx(peak / 2)
    assert s(w + 50) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi / 4)))
    assert s(w + 150) == pytest.approx(peak * 0.5 * (1 - math.cos(math.pi / 4)))
    assert s(total) == pytest.approx(0.0, abs=1e-12)
    # symmetric around the midpoint: lr(mid - k) + lr(mid + k) == peak
    for k in (1, 17, 63, 99):
        assert s(w + 100 - k) + s(w + 100 + k) == pytest.approx(peak)


def test_poly_at_warmup_end_mid_and_end():
    # MLPerf's shape: peak 10.5, power 2, to 1e-4; a 100-step decay after 20 warmup steps
    peak, end, w = 10.5, 1e-4, 20
    s = LrSchedule(peak_lr=peak, total_steps=120, warmup_steps=w, schedule="poly", poly_power=2.0, poly_end_lr=end)
    assert s(w - 1) == pytest.approx(peak)  # the warmup's last step reaches the peak ...
    assert s(w) == pytest.approx(peak)  # ... and the decay starts there (progress 0)
    assert s(w + 50) == pytest.approx(end + (peak - end) * 0.25)  # half way: (1 - 0.5)² of the range
    assert s(w + 50) == pytest.approx(2.625075)
    assert s(w + 90) == pytest.approx(end + (peak - end) * 0.01)
    assert s(120) == pytest.approx(end, rel=1e-12)  # the end LR, not 0
    assert s(500) == pytest.approx(end, rel=1e-12)  # clamped past the end
    tail = [s(i) for i in range(w, 121)]
    assert all(b < a for a, b in itertools.pairwise(tail)), "poly must decrease after the warmup"


def test_poly_power_one_is_linear_to_the_end_lr():
    s = LrSchedule(peak_lr=2.0, total_steps=100, schedule="poly", poly_power=1.0, poly_end_lr=0.5)
    assert [s(0), s(25), s(50), s(100)] == pytest.approx([2.0, 1.625, 1.25, 0.5])


def _mlperf_lr(step: int, base: float, end: float, warmup_steps: int, train_steps: int) -> float:
    """MLPerf's reference PolynomialDecayWithWarmup (lars_util.py): base·step/W while step ≤ W, then
    tf.keras PolynomialDecay(base, decay_steps = train_steps - W + 1, end, power 2) of step - W."""
    if step <= warmup_steps:
        return base * step / warmup_steps
    decay_steps = train_steps - warmup_steps + 1
    done = min(step - warmup_steps, decay_steps)
    return (base - end) * (1 - done / decay_steps) ** 2 + end


def test_schedule_from_config_mlperf_follows_the_reference():
    """The MLPerf recipe at 8 × 408 (393 steps per epoch): the warmup leads the reference by one step (as
    FFCV's does), and the decay, whose span here is one step shorter, stays within a step's change of it."""
    cfg = load_config(CONFIGS / "resnet50_mlperf.yaml")
    spe, epochs = 393, cfg.train.epochs
    peak = scaled_lr(cfg.optim.lr, cfg.data.batch_size * cfg.train.num_workers)
    assert peak == pytest.approx(10.5)
    s = schedule_from_config(cfg.optim, peak, spe, epochs)
    w, total = 2 * spe, epochs * spe
    assert (s.schedule, s.warmup_steps, s.total_steps, s.poly_power, s.poly_end_lr) == ("poly", w, total, 2.0, 1e-4)
    for step in range(w):
        assert s(step) == pytest.approx(_mlperf_lr(step + 1, 10.5, 1e-4, w, total), rel=1e-9), step
    one_step = 2 * 10.5 / (total - w)  # the most the squared decay moves in one step
    for step in range(w, total):
        assert abs(s(step) - _mlperf_lr(step, 10.5, 1e-4, w, total)) <= one_step, step
    assert s(w + (total - w) // 2) == pytest.approx(1e-4 + (10.5 - 1e-4) / 4, rel=1e-3)
    assert s(total) == pytest.approx(1e-4)


def test_step_schedule_torchvision_v1():
    spe = 5005
    s = LrSchedule(
        peak_lr=0.1, total_steps=90 * spe, schedule="step", steps_per_epoch=spe, step_epochs=30, step_gamma=0.1
    )
    assert s(0) == pytest.approx(0.1)  # no warmup: the peak from the first step
    assert s(30 * spe - 1) == pytest.approx(0.1)
    assert s(30 * spe) == pytest.approx(0.01)
    assert s(60 * spe - 1) == pytest.approx(0.01)
    assert s(60 * spe) == pytest.approx(0.001)
    assert s(90 * spe - 1) == pytest.approx(0.001)
    # piecewise constant inside an epoch block
    assert {s(i) for i in range(31 * spe, 31 * spe + 50)} == {s(31 * spe)}


def test_step_schedule_counts_epochs_with_steps_per_epoch():
    s = LrSchedule(peak_lr=1.0, total_steps=100, schedule="step", steps_per_epoch=4, step_epochs=2, step_gamma=0.5)
    assert [s(i) for i in range(0, 20, 4)] == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25])
    assert s(7) == pytest.approx(1.0) and s(8) == pytest.approx(0.5)


def test_constant_schedule():
    s = LrSchedule(peak_lr=0.3, total_steps=100, schedule="constant")
    assert {s(i) for i in range(0, 300, 7)} == {0.3}


@pytest.mark.parametrize("name", ["polynomial", "exponential", "Cosine"])
def test_unknown_schedule_raises_naming_it(name):
    s = LrSchedule(peak_lr=0.1, total_steps=10, schedule=name)
    with pytest.raises(ValueError, match=name):
        s(5)
    with pytest.raises(ValueError, match=name):
        lr_at(5, 10, 0, 0.1, name)


# ---------------------------------------------------------------- purity


@pytest.mark.parametrize("schedule", ["cosine", "linear", "step", "constant", "poly"])
def test_same_step_same_value_in_any_order(schedule):
    s = LrSchedule(
        peak_lr=1.3,
        total_steps=400,
        warmup_steps=30,
        schedule=schedule,
        steps_per_epoch=20,
        step_epochs=5,
        step_gamma=0.3,
        warmup_start_factor=0.01,
        poly_end_lr=0.002,
    )
    steps = list(range(0, 450))
    in_order = {i: s(i) for i in steps}
    rnd = random.Random(1234)
    for _ in range(3):
        shuffled = steps[:]
        rnd.shuffle(shuffled)
        assert {i: s(i) for i in shuffled} == in_order  # bit-identical, no hidden state
    twin = LrSchedule(**dataclasses.asdict(s))
    assert twin == s and all(twin(i) == in_order[i] for i in steps)


def test_schedule_is_frozen():
    s = LrSchedule(peak_lr=0.1, total_steps=10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.peak_lr = 1.0  # type: ignore[misc]


# ---------------------------------------------------------------- schedule_from_config


def test_schedule_from_config_torchvision_v1():
    cfg = load_config(CONFIGS / "resnet50_v1_90ep.yaml")
    spe = 5005  # ceil(1_281_167 / 256)
    peak = scaled_lr(cfg.optim.lr, cfg.data.batch_size * cfg.train.num_workers)
    assert peak == pytest.approx(0.1)
    s = schedule_from_config(cfg.optim, peak, spe, cfg.train.epochs)
    assert (s.schedule, s.warmup_steps, s.total_steps, s.steps_per_epoch) == ("step", 0, 90 * spe, spe)
    expected = {0: 0.1, 29: 0.1, 30: 0.01, 60: 0.001, 89: 0.001}
    for epoch, lr in expected.items():
        assert s(epoch * spe) == pytest.approx(lr), epoch
        assert s(epoch * spe + spe - 1) == pytest.approx(lr), epoch  # the whole epoch
    assert s(30 * spe - 1) == pytest.approx(0.1)


def test_schedule_from_config_ffcv_rn50_88ep():
    cfg = load_config(CONFIGS / "resnet50_fast_88ep.yaml")
    global_batch = cfg.data.batch_size * cfg.train.num_workers
    spe = 1_281_167 // global_batch  # FFCV drops the last partial batch
    peak = scaled_lr(cfg.optim.lr, global_batch)
    s = schedule_from_config(cfg.optim, peak, spe, cfg.train.epochs)
    assert s == LrSchedule(
        peak_lr=peak,
        total_steps=88 * spe,
        warmup_steps=2 * spe,
        schedule="linear",
        steps_per_epoch=spe,
        step_epochs=cfg.optim.step_epochs,
        step_gamma=cfg.optim.step_gamma,
        warmup_start_factor=1e-4,
    )
    assert s(2 * spe - 1) == pytest.approx(1.7)
    for epoch in (2, 10, 45, 87):
        step = epoch * spe
        assert s(step) == pytest.approx(_ffcv_step_lr(step, 1.7, spe, 88), rel=1e-9), epoch
    assert s(88 * spe) == pytest.approx(0.0, abs=1e-12)


def test_schedule_from_config_torchvision_v2_cosine_with_warmup():
    cfg = load_config(CONFIGS / "resnet50_v2.yaml")
    spe = 1251
    s = schedule_from_config(cfg.optim, 0.5, spe, cfg.train.epochs)
    assert (s.schedule, s.warmup_steps, s.total_steps) == ("cosine", 5 * spe, 600 * spe)
    assert s.warmup_start_factor == pytest.approx(0.01)
    assert s(5 * spe - 1) == pytest.approx(0.5)
    assert s(5 * spe + (595 * spe) // 2) == pytest.approx(0.25, rel=1e-5)
    assert s(600 * spe) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("warmup_epochs,spe,expected", [(0.3, 10, 3), (0.0, 100, 0), (2, 7, 14), (0.25, 6, 2)])
def test_schedule_from_config_rounds_fractional_warmup(warmup_epochs, spe, expected):
    optim = OptimSection(warmup_epochs=warmup_epochs, schedule="cosine")
    s = schedule_from_config(optim, 0.4, spe, 3)
    assert s.warmup_steps == expected
    assert s.total_steps == 3 * spe
    assert s.peak_lr == 0.4


# ---------------------------------------------------------------- elastic restart


@pytest.mark.parametrize("schedule", ["cosine", "linear", "step", "poly"])
@pytest.mark.parametrize("warmup_epochs", [0.0, 2.5])
def test_resize_2_to_1_workers_gives_the_lr_of_an_uninterrupted_run_at_the_same_sample_count(schedule, warmup_epochs):
    """A 2-worker run checkpointed after 3 epochs and resumed on 1 worker: at every later sample count
    its LR is the uninterrupted 1-worker run's. The checkpoint's step counts 2-worker steps (half as
    many per epoch), which placed the schedule at the wrong fraction before."""
    from imagenet_ray.train.optim import ResumedSchedule, scale_for_world

    num_train, batch, epochs, done = 1000, 10, 8, 3
    o = OptimSection(schedule=schedule, warmup_epochs=warmup_epochs, step_epochs=2)
    two = scale_for_world(num_train, 2, batch, 1, o.lr)
    one = scale_for_world(num_train, 1, batch, 1, o.lr)
    assert (two.steps_per_epoch, one.steps_per_epoch) == (50, 100)
    uninterrupted = schedule_from_config(o, one.peak_lr, one.steps_per_epoch, epochs)
    checkpoint_step = done * two.steps_per_epoch  # what the 2-worker run's checkpoint holds
    resumed = ResumedSchedule(uninterrupted, resumed_step=checkpoint_step, epochs_done=done)
    for k in range(0, (epochs - done) * one.steps_per_epoch, 7):
        samples = done * num_train + k * batch * 1  # trained when the resumed run takes step checkpoint_step + k
        step_uninterrupted = samples // (batch * 1)
        assert resumed(checkpoint_step + k) == uninterrupted(step_uninterrupted)
    # The step count alone (the old behaviour) is somewhere else on the curve.
    assert uninterrupted(checkpoint_step) != uninterrupted(done * one.steps_per_epoch)


def test_a_fresh_run_and_a_same_size_restart_follow_the_schedule_by_step():
    from imagenet_ray.train.optim import ResumedSchedule

    s = LrSchedule(peak_lr=0.4, total_steps=300, warmup_steps=30, schedule="cosine", steps_per_epoch=100)
    fresh, restarted = ResumedSchedule(s), ResumedSchedule(s, resumed_step=200, epochs_done=2)
    assert [fresh(i) for i in range(300)] == [s(i) for i in range(300)]
    assert [restarted(i) for i in range(200, 300)] == [s(i) for i in range(200, 300)]
