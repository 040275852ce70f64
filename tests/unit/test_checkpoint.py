"""Checkpoint directory round trip: model + optimizer state restored exactly, run metadata kept."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn as nn

from imagenet_ray.train.checkpoint import CONFIG_FILE, STATE_FILE, read_checkpoint_dir, write_checkpoint_dir
from imagenet_ray.train.optim import build_sgd

CONFIG_YAML = "name: ckpt\noptim:\n  lr: 0.05\n"


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


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
    write_checkpoint_dir(tmp_path, model=model, optimizer=opt, epoch=2, step=37, mlflow_run_id="abc123",
                         config_yaml=CONFIG_YAML)
    assert (tmp_path / STATE_FILE).is_file()
    assert (tmp_path / CONFIG_FILE).read_text() == CONFIG_YAML

    state = read_checkpoint_dir(tmp_path)
    assert (state["epoch"], state["step"], state["mlflow_run_id"], state["config_yaml"]) == (2, 37, "abc123",
                                                                                            CONFIG_YAML)
    assert set(state["rng"]) == {"python", "numpy", "torch"}

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
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p1, p2)


def test_rng_state_is_captured(tmp_path):
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    write_checkpoint_dir(tmp_path, model=model, optimizer=opt, epoch=1, step=1, mlflow_run_id=None,
                         config_yaml="")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    state = read_checkpoint_dir(tmp_path)
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
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
