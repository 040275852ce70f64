"""Mid-epoch checkpoints without Ray: how a resume continues an epoch, when the ranks agree to checkpoint,
and that each rank's RNG and EMA state survive a checkpoint loaded with weights_only=True."""

from __future__ import annotations

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from imagenet_ray.train.checkpoint import read_checkpoint_dir, write_checkpoint_dir
from imagenet_ray.train.mid_epoch import (
    CheckpointClock,
    EpochResume,
    MidEpochState,
    gather_to_all,
    plan_resume,
    rank_local_state,
    restore_rank_local_state,
)


def _state(batches=3, samples=24, world=2):
    return MidEpochState(epoch=1, batches=batches, samples=samples, loss_sum=5.0, decode_errors=0, world=world)


def test_deterministic_same_world_skips_exactly_the_batches_trained():
    assert plan_resume(_state(), world=2, deterministic=True, num_train=100) == EpochResume(skip_batches=3, exact=True)


def test_other_modes_train_the_count_left_in_a_new_order():
    # 100 images on 2 ranks: 50 each (equal split); 24 trained = 12 per rank; 38 left per rank.
    resume = plan_resume(_state(), world=2, deterministic=False, num_train=100)
    assert resume == EpochResume(skip_batches=0, stop_after_samples=38, exact=False)
    # A resize: 24 trained of 100, on 1 rank now: 76 left, so the epoch still trains 100.
    resized = plan_resume(_state(), world=1, deterministic=True, num_train=100)
    assert resized.stop_after_samples == 76 and not resized.exact
    assert plan_resume(_state(samples=100), world=2, deterministic=False, num_train=100).stop_after_samples == 0


def test_an_approximate_resume_cuts_the_last_batch_to_the_count():
    from imagenet_ray.train.runner import Runner

    batch = {"image": torch.zeros(4, 2), "label": torch.arange(4)}
    assert Runner.within_count(batch, 0, None) is batch
    assert Runner.within_count(batch, 4, 10) is batch
    assert Runner.within_count(batch, 8, 10)["label"].tolist() == [0, 1]
    assert Runner.within_count(batch, 10, 10) is None


def test_clock_is_due_after_the_interval_and_asks_for_preemption_notices_at_its_own_pace():
    clock = CheckpointClock(every_s=60.0, preemption_every_s=10.0)
    clock.add(30.0)
    assert not clock.interval_passed()
    assert clock.preemption_check_due() and not clock.preemption_check_due()  # reset by asking
    clock.add(30.0)
    assert clock.interval_passed()
    clock.checkpointed()
    assert not clock.interval_passed()
    assert not CheckpointClock(every_s=None, preemption_every_s=10.0).interval_passed()
    off = CheckpointClock(every_s=None, preemption_every_s=None)
    off.add(1e6)
    assert not off.preemption_check_due()


def test_rank_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    with torch.no_grad():
        model(torch.randn(8, 3))
    ema.update_parameters(model)
    rng = np.random.default_rng([1, 2])
    rng.random(7)
    torch.manual_seed(5)
    local = rank_local_state(rng, ema, torch.device("cpu"))
    expected_draw, expected_torch = rng.random(), torch.rand(3)
    state = MidEpochState(1, 3, 24, 5.0, 0, 1, gather_to_all(local))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    write_checkpoint_dir(
        tmp_path,
        model=model,
        optimizer=opt,
        epoch=1,
        step=9,
        mlflow_run_id=None,
        config_yaml="",
        mid_epoch=state.to_dict(),
    )
    loaded = MidEpochState.from_dict(read_checkpoint_dir(tmp_path)["mid_epoch"])
    assert loaded.batches == 3 and loaded.world == 1

    fresh_rng = np.random.default_rng(0)
    fresh_ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for b in fresh_ema.buffers():
        b.zero_()
    torch.manual_seed(0)
    restore_rank_local_state(loaded.rank_states[0], fresh_rng, fresh_ema, torch.device("cpu"))
    assert fresh_rng.random() == expected_draw
    assert torch.equal(torch.rand(3), expected_torch)
    for (name, a), (_, b) in zip(ema.named_buffers(), fresh_ema.named_buffers(), strict=True):
        assert torch.equal(a, b), name


def test_an_epoch_boundary_checkpoint_has_no_mid_epoch_state(tmp_path):
    model = torch.nn.Linear(2, 2)
    write_checkpoint_dir(
        tmp_path,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        epoch=2,
        step=4,
        mlflow_run_id=None,
        config_yaml="",
    )
    assert read_checkpoint_dir(tmp_path)["mid_epoch"] is None


def test_the_mid_epoch_score_survives_ray_trains_checkpoint_snapshot():
    """Ray Train saves its checkpoint manager's state as pydantic JSON, where -inf becomes null; a resubmitted
    job's controller then compares None with a float at its first checkpoint. The score must round-trip."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _TrainingResultState

    from imagenet_ray.train.runner import MID_EPOCH_SCORE

    def round_trip(score: float) -> object:
        state = _TrainingResultState(checkpoint_dir_name="checkpoint_x", metrics={"val/top1": score})
        return _TrainingResultState.parse_raw(state.json()).metrics["val/top1"]

    assert round_trip(float("-inf")) is None  # why it is not -inf
    assert round_trip(MID_EPOCH_SCORE) == MID_EPOCH_SCORE < 0.0  # below any real top-1 (0 … 1)
