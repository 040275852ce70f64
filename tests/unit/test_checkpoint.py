"""Checkpoint directory round trip: model + optimizer state restored exactly, run metadata kept, EMA and
RNG state, and reading a checkpoint by URL."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from imagenet_ray.train.checkpoint import (
    CONFIG_FILE,
    STATE_FILE,
    read_checkpoint_dir,
    read_checkpoint_url,
    restore_rng,
    rng_state,
    write_checkpoint_dir,
)
from imagenet_ray.train.optim import build_sgd

CONFIG_YAML = "name: ckpt\noptim:\n  lr: 0.05\n"


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )


def _train_a_bit(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(6, 3, 8, 8, generator=g)
        y = torch.randint(0, 3, (6,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_round_trip_restores_model_and_optimizer_exactly(tmp_path):
    model = _model(0)
    opt = build_sgd(model, lr=0.1, momentum=0.9, weight_decay=1e-4)
    _train_a_bit(model, opt)
    write_checkpoint_dir(
        tmp_path,
        model=model,
        optimizer=opt,
        epoch=2,
        step=37,
        mlflow_run_id="abc123",
        config_yaml=CONFIG_YAML,
        metrics={"epoch": 2, "val/top1": 0.25},
    )
    assert (tmp_path / STATE_FILE).is_file()
    assert (tmp_path / CONFIG_FILE).read_text() == CONFIG_YAML

    state = read_checkpoint_dir(tmp_path)
    assert (state["epoch"], state["step"], state["mlflow_run_id"], state["config_yaml"]) == (
        2,
        37,
        "abc123",
        CONFIG_YAML,
    )
    assert set(state["rng"]) == {"python", "numpy", "torch"}
    assert state["metrics"] == {"epoch": 2.0, "val/top1": 0.25}  # the epoch's, for a re-log on restore

    # A fresh, differently initialised model and optimizer take the state over exactly.
    model2 = _model(1)
    opt2 = build_sgd(model2, lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert not torch.equal(model2[0].weight, model[0].weight)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    assert model2[1].num_batches_tracked.item() == 3  # BatchNorm buffers too
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys() and len(s1["state"]) == len(list(model.parameters()))
    for i in s1["state"]:
        assert torch.equal(s1["state"][i]["momentum_buffer"], s2["state"][i]["momentum_buffer"])

    # Continuing from the restored state gives bit-identical parameters to continuing the original.
    _train_a_bit(model, opt, 2)
    _train_a_bit(model2, opt2, 2)
    for p1, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p1, p2)


def test_rng_state_is_captured(tmp_path):
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    write_checkpoint_dir(tmp_path, model=model, optimizer=opt, epoch=1, step=1, mlflow_run_id=None, config_yaml="")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    state = read_checkpoint_dir(tmp_path)
    restore_rng(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert state["mlflow_run_id"] is None


def test_overwrite_keeps_latest(tmp_path):
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    write_checkpoint_dir(tmp_path, model=model, optimizer=opt, epoch=1, step=10, mlflow_run_id="r", config_yaml="a")
    write_checkpoint_dir(tmp_path, model=model, optimizer=opt, epoch=2, step=20, mlflow_run_id="r", config_yaml="b")
    state = read_checkpoint_dir(tmp_path)
    assert (state["epoch"], state["step"], state["config_yaml"]) == (2, 20, "b")
    assert (tmp_path / CONFIG_FILE).read_text() == "b"


# ================================================================ EMA + RNG


@pytest.fixture
def _keep_global_rng():
    """These tests draw from (and reset) the global RNGs; leave them as found for other tests."""
    saved = rng_state()
    yield
    restore_rng(saved)


def _tiny_net():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )


def test_checkpoint_round_trips_the_ema_state(tmp_path, _keep_global_rng):
    torch.manual_seed(0)
    model = _tiny_net()
    opt = build_sgd(model, lr=0.1, momentum=0.9, weight_decay=1e-4)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 0])).backward()
        opt.step()
        ema.update_parameters(model)
    assert not torch.allclose(ema.module[0].weight, model[0].weight)  # a real average, not a copy
    write_checkpoint_dir(
        tmp_path,
        model=model,
        optimizer=opt,
        epoch=1,
        step=3,
        mlflow_run_id=None,
        config_yaml="name: x\n",
        ema=ema.state_dict(),
    )
    state = read_checkpoint_dir(tmp_path)
    saved = ema.state_dict()
    assert state["ema"].keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(state["ema"][k], v), k
    assert int(state["ema"]["n_averaged"]) == 3

    torch.manual_seed(99)
    fresh = AveragedModel(_tiny_net(), multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    fresh.load_state_dict(state["ema"])
    for (k, a), b in zip(fresh.state_dict().items(), saved.values(), strict=True):
        assert torch.equal(a, b), k


def test_checkpoint_without_ema_stores_none(tmp_path):
    model = _tiny_net()
    write_checkpoint_dir(
        tmp_path,
        model=model,
        optimizer=build_sgd(model, 0.1, 0.9, 0.0),
        epoch=0,
        step=0,
        mlflow_run_id="r",
        config_yaml="",
    )
    assert read_checkpoint_dir(tmp_path)["ema"] is None


def _draw():
    return torch.rand(4), np.random.rand(4), random.random()


def _same(a, b):
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_restore_rng_repeats_every_generator(_keep_global_rng):
    state = rng_state()
    first = _draw()
    assert not _same(first, _draw())  # the generators advance
    restore_rng(state)
    assert _same(first, _draw())


def test_rng_state_survives_a_checkpoint_round_trip(tmp_path, _keep_global_rng):
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    model = _tiny_net()
    write_checkpoint_dir(
        tmp_path,
        model=model,
        optimizer=build_sgd(model, 0.1, 0.9, 0.0),
        epoch=1,
        step=1,
        mlflow_run_id=None,
        config_yaml="",
    )
    after_save = _draw()
    _draw()
    restore_rng(read_checkpoint_dir(tmp_path)["rng"])
    assert _same(after_save, _draw())


def test_read_checkpoint_url_reads_a_local_directory_by_path_and_file_url(tmp_path):
    model = _tiny_net()
    write_checkpoint_dir(
        tmp_path,
        model=model,
        optimizer=build_sgd(model, 0.1, 0.9, 0.0),
        epoch=2,
        step=9,
        mlflow_run_id="r",
        config_yaml="name: u\n",
    )
    for url in (str(tmp_path), tmp_path.as_uri()):
        state = read_checkpoint_url(url)
        assert (state["epoch"], state["step"], state["config_yaml"]) == (2, 9, "name: u\n")
        for k, v in model.state_dict().items():
            assert torch.equal(state["model"][k], v), k


def test_a_checkpoint_that_needs_unpickling_is_refused(tmp_path):
    """torch.load(weights_only=True): a state.pt carrying an arbitrary object is an error naming the file."""
    import datetime

    import pytest

    from imagenet_ray.errors import UserError

    torch.save({"model": {}, "payload": datetime.timedelta(days=1)}, tmp_path / "state.pt")
    with pytest.raises(UserError, match=r"state\.pt: not a checkpoint this project can load safely"):
        read_checkpoint_dir(tmp_path)
