"""The shipped recipes (configs/*.yaml) against the published recipes they claim to reproduce.

FFCV: libffcv/ffcv-imagenet rn50_configs/ and rn18_configs/ (lr for the global batch, ramp epochs, weight
decay, batch size × world size) and its README results table. torchvision: references/classification,
ResNet50_Weights.IMAGENET1K_V1 / IMAGENET1K_V2. MLPerf: MLPERF_REFERENCE below.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ffcv_reference import ffcv_resolution
from imagenet_ray.config import ExperimentConfig, load_config, to_yaml
from imagenet_ray.data.transforms import train_batch
from imagenet_ray.train.device import to_model_input, train_size_for_epoch
from imagenet_ray.train.models import BlurPool2d, build_model
from imagenet_ray.train.optim import (
    ResumedSchedule,
    build_optimizer,
    build_sgd,
    scale_for_world,
    scaled_lr,
    schedule_from_config,
)
from imagenet_ray.train.step import TrainStep

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ALL = sorted(CONFIGS.glob("*.yaml"))
BASES = sorted(CONFIGS.glob("base/*.yaml"))  # recipe parts that budget files extend
NOT_RECIPES = {"local", "smoke"}  # the demo and the integration smoke run
RECIPES = [p for p in ALL if p.stem not in NOT_RECIPES]
FFCV = sorted(CONFIGS.glob("resnet*_fast_*ep.yaml"))
IMAGENET_TRAIN_IMAGES = 1_281_167

# FFCV's configs: (epochs, start_ramp, end_ramp, lr for the global batch, batch per GPU, GPUs, weight decay)
# and README top-1.
FFCV_REFERENCE = {
    "resnet50_fast_16ep": (16, 11, 13, 1.7, 512, 8, 1e-4, 73.8),
    "resnet50_fast_24ep": (24, 17, 20, 1.7, 512, 8, 1e-4, 75.6),
    "resnet50_fast_32ep": (32, 23, 27, 1.7, 512, 8, 1e-4, 76.6),
    "resnet50_fast_40ep": (40, 29, 34, 1.7, 512, 8, 1e-4, 77.2),
    "resnet50_fast_88ep": (88, 65, 76, 1.7, 512, 8, 1e-4, 78.4),
    "resnet18_fast_16ep": (16, 11, 13, 0.5, 1024, 1, 5e-5, 66.9),
    "resnet18_fast_88ep": (88, 65, 76, 0.5, 1024, 1, 5e-5, 72.4),
}
# MLPerf Training ResNet-50, closed division: NVIDIA's DGX A100 submission (mlcommons/training_results_v2.0,
# NVIDIA/benchmarks/resnet/implementations/mxnet/config_DGXA100.sh: BATCHSIZE 408 on 8 GPUs, LR 10.5,
# WARMUP_EPOCHS 2, NUMEPOCHS 37, WD 5e-5, MOM 0.9, LARSETA 0.001, LABELSMOOTHING 0.1, LRSCHED pow2) and the
# mlcommons/training reference, image_classification/tensorflow2 (lars_util.py: warmup from 0, end LR 1e-4,
# power 2; README_tensorflow2.md: --lars_epsilon=0, target 0.759; imagenet_preprocessing.py: area_range
# [0.05, 1.0], 224 px; eval resize 256, central 224).
MLPERF_REFERENCE = {
    "gpus": 8,
    "batch_per_gpu": 408,
    "lr": 10.5,  # for the global batch of 3,264
    "warmup_epochs": 2,
    "epochs": 37,
    "weight_decay": 5e-5,
    "momentum": 0.9,
    "lars_eta": 0.001,
    "lars_epsilon": 0.0,
    "label_smoothing": 0.1,
    "poly_power": 2.0,
    "end_lr": 1e-4,
    "min_area": 0.05,
    "top1": 75.9,
}
PUBLISHED_TOP1 = {
    **{k: v[-1] for k, v in FFCV_REFERENCE.items()},
    "resnet50_v1_90ep": 76.13,
    "resnet50_v2": 80.858,
    "resnet50_mlperf": MLPERF_REFERENCE["top1"],
}
TARGET = re.compile(r"Published target:\s*(\d+(?:\.\d+)?)\s*%")


def _load(stem: str) -> ExperimentConfig:
    return load_config(CONFIGS / f"{stem}.yaml")


def _global_batch(cfg: ExperimentConfig) -> int:
    return cfg.data.batch_size * cfg.train.num_workers


# ---------------------------------------------------------------- every file


def test_the_recipe_set_is_complete():
    assert {p.stem for p in FFCV} == set(FFCV_REFERENCE)
    assert {p.stem for p in RECIPES} == set(PUBLISHED_TOP1)
    assert {p.stem for p in ALL} >= NOT_RECIPES


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.name and cfg.train.epochs > 0
    assert load_config(path, [f"name={cfg.name}"]) == cfg
    assert ExperimentConfig.model_validate(yaml.safe_load(to_yaml(cfg))) == cfg


@pytest.mark.parametrize("path", BASES, ids=lambda p: p.stem)
def test_every_base_loads_on_its_own(path):
    assert isinstance(load_config(path), ExperimentConfig)


@pytest.mark.parametrize("path", FFCV, ids=lambda p: p.stem)
def test_ffcv_budget_files_are_deltas(path):
    """An FFCV budget file extends its model's base and sets only the name, the epochs and the ramp."""
    tree = yaml.safe_load(path.read_text())
    model = path.stem.split("_")[0]
    assert tree.pop("extends") == f"base/ffcv_{model}.yaml"
    assert tree == {
        "name": tree["name"],
        "data": {"progressive": tree["data"]["progressive"]},
        "train": {"epochs": FFCV_REFERENCE[path.stem][0]},
    }
    assert set(tree["data"]["progressive"]) == {"start_epoch", "end_epoch"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_carries_a_published_target(path):
    comments = " ".join(
        line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.lstrip().startswith("#")
    )
    match = TARGET.search(comments)
    assert match, f"{path.name}: no 'Published target: NN.N %' comment"
    top1 = float(match.group(1))
    assert 0 < top1 < 100
    assert top1 == pytest.approx(PUBLISHED_TOP1[path.stem])


# ---------------------------------------------------------------- FFCV


@pytest.mark.parametrize("path", FFCV, ids=lambda p: p.stem)
def test_ffcv_recipe_settings(path):
    cfg = load_config(path)
    epochs, start, end, _lr, batch, gpus, wd, _ = FFCV_REFERENCE[path.stem]
    o, d, m = cfg.optim, cfg.data, cfg.model
    assert cfg.train.epochs == epochs
    assert o.schedule == "linear"
    assert o.warmup_epochs == 2 and o.warmup_start_factor == pytest.approx(1e-4)
    assert o.label_smoothing == pytest.approx(0.1)
    assert o.momentum == pytest.approx(0.9) and not o.nesterov
    assert o.weight_decay == pytest.approx(wd)
    assert o.no_decay_norm_and_bias is True  # FFCV: bn_wd 0
    assert d.mixup_alpha == 0 and d.cutmix_alpha == 0
    assert o.ema_decay == 0
    assert m.blurpool is True and m.channels_last is True and m.zero_init_residual is False
    assert cfg.eval.hflip is True  # FFCV lr_tta
    p = d.progressive
    assert p is not None
    assert (p.start_size, p.end_size, p.start_epoch, p.end_epoch, p.step) == (160, 192, start, end, 32)
    assert p.end_size <= d.train_crop
    # FFCV validation: 256 px crops of the central 224/256 of the image
    assert cfg.eval.crop == 256 and cfg.eval.resize == int(256 / (224 / 256))
    assert (d.batch_size, cfg.train.num_workers) == (batch, gpus)


@pytest.mark.parametrize("path", FFCV, ids=lambda p: p.stem)
def test_ffcv_peak_lr_for_the_global_batch(path):
    cfg = load_config(path)
    lr = FFCV_REFERENCE[path.stem][3]
    assert lr == (1.7 if cfg.model.name == "resnet50" else 0.5)
    assert _global_batch(cfg) * cfg.optim.lr / 256 == pytest.approx(lr, abs=1e-6)
    assert scaled_lr(cfg.optim.lr, _global_batch(cfg)) == pytest.approx(lr, abs=1e-6)


@pytest.mark.parametrize("path", FFCV, ids=lambda p: p.stem)
def test_ffcv_train_sizes_follow_ffcv_epoch_by_epoch(path):
    cfg = load_config(path)
    epochs, start, end = FFCV_REFERENCE[path.stem][:3]
    sizes = [train_size_for_epoch(cfg.data, e) for e in range(epochs)]
    assert sizes == [ffcv_resolution(e, 160, 192, end, start) for e in range(epochs)]
    assert sizes[0] == 160 and sizes[-1] == 192
    assert max(sizes) <= cfg.data.train_crop


def test_ffcv_model_and_optimizer_as_built():
    cfg = _load("resnet18_fast_16ep")
    model = build_model(cfg.model.name, 1000, cfg.model.zero_init_residual, cfg.model.blurpool)
    assert sum(isinstance(mod, BlurPool2d) for mod in model.modules()) == 6
    decay, no_decay = build_sgd(
        model, 0.5, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.nesterov, cfg.optim.no_decay_norm_and_bias
    ).param_groups
    bn = {id(p) for mod in model.modules() if isinstance(mod, nn.BatchNorm2d) for p in mod.parameters()}
    assert bn and bn <= {id(p) for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == pytest.approx(5e-5)
    assert all(p.dim() > 1 for p in decay["params"])  # only conv / linear weights are decayed


# ---------------------------------------------------------------- torchvision V1


def test_torchvision_v1_recipe():
    cfg = _load("resnet50_v1_90ep")
    o, d = cfg.optim, cfg.data
    assert cfg.model.name == "resnet50" and cfg.train.epochs == 90
    assert (o.schedule, o.step_epochs, o.step_gamma) == ("step", 30, pytest.approx(0.1))
    assert o.warmup_epochs == 0
    assert o.weight_decay == pytest.approx(1e-4) and o.no_decay_norm_and_bias is False  # on every parameter
    assert o.momentum == pytest.approx(0.9) and not o.nesterov
    assert o.lr == pytest.approx(0.1)  # per 256 images
    assert (d.batch_size, cfg.train.num_workers) == (32, 8) and _global_batch(cfg) == 256
    assert scaled_lr(o.lr, _global_batch(cfg)) == pytest.approx(0.1)
    assert o.label_smoothing == 0 and d.mixup_alpha == 0 and d.cutmix_alpha == 0 and o.ema_decay == 0
    assert (d.train_crop, cfg.eval.resize, cfg.eval.crop) == (224, 256, 224)
    assert d.progressive is None and not cfg.model.blurpool and not cfg.eval.hflip


# ---------------------------------------------------------------- torchvision V2


def test_torchvision_v2_recipe():
    cfg = _load("resnet50_v2")
    o, d = cfg.optim, cfg.data
    assert cfg.model.name == "resnet50" and cfg.train.epochs == 600
    assert (d.mixup_alpha, d.cutmix_alpha) == (pytest.approx(0.2), pytest.approx(1.0))
    assert o.ema_decay > 0 and o.ema_every_steps == 32
    assert (d.train_crop, cfg.eval.resize, cfg.eval.crop) == (176, 232, 224)
    assert o.label_smoothing == pytest.approx(0.1)
    assert o.schedule == "cosine" and o.warmup_epochs == 5 and o.warmup_start_factor == pytest.approx(0.01)
    assert o.weight_decay == pytest.approx(2e-5) and o.no_decay_norm_and_bias is True
    assert _global_batch(cfg) == 1024
    assert scaled_lr(o.lr, _global_batch(cfg)) == pytest.approx(0.5)


def _ema_weight_of(decay: float, updates: int) -> float:
    """Weight the first EMA snapshot still has after `updates` updates of AveragedModel + get_ema_multi_avg_fn."""
    return decay ** (updates - 1)


def test_ema_weight_formula_matches_averaged_model():
    """The train loop's EMA: AveragedModel(get_ema_multi_avg_fn(ema_decay)), one update per ema_every_steps."""
    p = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    holder = nn.Module()
    holder.p = p
    ema = AveragedModel(holder, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    with torch.no_grad():
        p.fill_(1.0)
        ema.update_parameters(holder)  # the first update copies: snapshot = 1
        p.fill_(0.0)
        for _ in range(19):
            ema.update_parameters(holder)
    assert ema.module.p.item() == pytest.approx(_ema_weight_of(0.9, 20), rel=1e-12)


def test_v2_ema_forgets_the_initial_weights_like_torchvision():
    cfg = _load("resnet50_v2")
    o = cfg.optim
    steps_per_epoch = math.ceil(IMAGENET_TRAIN_IMAGES / cfg.train.num_workers / cfg.data.batch_size)
    updates = cfg.train.epochs * steps_per_epoch // o.ema_every_steps
    # torchvision references/classification/train.py
    adjust = cfg.train.num_workers * cfg.data.batch_size * o.ema_every_steps / cfg.train.epochs
    torchvision_decay = 1.0 - min(1.0, (1.0 - 0.99998) * adjust)
    assert _ema_weight_of(torchvision_decay, updates) < 1e-6  # the reference forgets its start
    assert _ema_weight_of(o.ema_decay, updates) < 1e-3
    assert o.ema_decay == pytest.approx(torchvision_decay, abs=1e-6)


# ---------------------------------------------------------------- MLPerf (LARS, polynomial decay)


def test_mlperf_recipe_against_the_reference():
    cfg = _load("resnet50_mlperf")
    ref, o, d = MLPERF_REFERENCE, cfg.optim, cfg.data
    assert cfg.model.name == "resnet50" and cfg.train.epochs == ref["epochs"]
    assert (d.batch_size, cfg.train.num_workers) == (ref["batch_per_gpu"], ref["gpus"])
    assert _global_batch(cfg) == 3264 and o.grad_accum_steps == 1
    assert scaled_lr(o.lr, _global_batch(cfg)) == pytest.approx(ref["lr"], rel=1e-12)
    assert o.name == "lars" and not o.nesterov
    assert (o.lars_trust_coeff, o.lars_eps) == (pytest.approx(ref["lars_eta"]), ref["lars_epsilon"])
    assert o.momentum == pytest.approx(ref["momentum"]) and o.weight_decay == pytest.approx(ref["weight_decay"])
    assert o.no_decay_norm_and_bias is True  # skip_list ['batch_normalization', 'bias']
    assert (o.schedule, o.poly_power, o.poly_end_lr) == ("poly", ref["poly_power"], pytest.approx(ref["end_lr"]))
    assert o.warmup_epochs == ref["warmup_epochs"] and o.warmup_start_factor == 0
    assert o.label_smoothing == pytest.approx(ref["label_smoothing"])
    assert o.clip_grad_norm is None and o.ema_decay == 0  # neither is in the recipe
    assert d.rrc_scale == (ref["min_area"], 1.0) and d.rrc_ratio == (3 / 4, 4 / 3)
    assert (d.train_crop, cfg.eval.resize, cfg.eval.crop) == (224, 256, 224)
    assert d.mixup_alpha == 0 and d.cutmix_alpha == 0 and d.auto_augment == "none" and d.random_erasing == 0
    assert d.progressive is None and not cfg.model.blurpool and not cfg.eval.hflip


def test_mlperf_recipe_names_its_sources():
    text = (CONFIGS / "resnet50_mlperf.yaml").read_text()
    assert "mlcommons/training_results_v2.0" in text and "config_DGXA100.sh" in text
    assert "mlcommons/training reference" in text and "lars_util.py" in text


def test_mlperf_mechanics_on_cpu(jpeg_bytes):
    """A few steps of a tiny model with the recipe's optimizer, schedule, label smoothing and crops (plus
    clipping, which the recipe leaves off): finite losses, the LR where the schedule puts it, capped norms."""
    cfg = load_config(CONFIGS / "resnet50_mlperf.yaml", ["optim.clip_grad_norm=0.05", "data.batch_size=8"])
    o, d = cfg.optim, cfg.data
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    scale = scale_for_world(num_train=64, world_size=1, batch_size=d.batch_size, grad_accum_steps=1, lr_per_256=o.lr)
    assert scale.steps_per_epoch == 8 and scale.peak_lr == pytest.approx(10.5 * 8 / 3264)
    optimizer = build_optimizer(model, o, scale.peak_lr)
    assert type(optimizer).__name__ == "Lars" and [g["always_adapt"] for g in optimizer.param_groups] == [True, False]
    schedule = schedule_from_config(o, scale.peak_lr, scale.steps_per_epoch, cfg.train.epochs)
    lr_at = ResumedSchedule(schedule)
    step = TrainStep(model, optimizer, lr_at, label_smoothing=o.label_smoothing, clip_grad_norm=o.clip_grad_norm)
    stepped = []  # the global gradient norm the optimizer steps with
    lars_step = optimizer.step
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def recording_step():
        stepped.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]).norm().item())
        return lars_step()

    optimizer.step = recording_step
    encoded = np.array([jpeg_bytes(96, 72), jpeg_bytes(64, 80)] * 4, dtype=object)
    rng = np.random.default_rng(0)
    losses, norms, lrs = [], [], []
    for i in range(5):
        batch = train_batch(
            {"image": encoded, "label": np.arange(8) % 4}, 32, rng, scale=d.rrc_scale, ratio=d.rrc_ratio
        )
        x, y = to_model_input(torch.from_numpy(batch["image"])), torch.from_numpy(batch["label"])
        losses.append(step(x, y).item() / 8)
        assert step.grad_norm is not None
        norms.append(step.grad_norm.item())
        lrs.append(optimizer.param_groups[0]["lr"])
        assert lrs[-1] == pytest.approx(schedule(i))
    assert all(math.isfinite(v) and 0 < v < 10 for v in losses), losses
    assert max(norms) > o.clip_grad_norm  # the clipping had work to do ...
    assert stepped == [pytest.approx(min(n, o.clip_grad_norm), rel=1e-4) for n in norms]  # ... and capped it
    # the warmup: step i of 16 warmup steps (2 epochs × 8) at (i + 1) / 16 of the peak
    assert lrs == pytest.approx([scale.peak_lr * (i + 1) / 16 for i in range(5)])
    # and the decay at given points of progress: warmup end, half way, end
    w, total = schedule.warmup_steps, schedule.total_steps
    assert (w, total) == (16, 37 * 8)
    assert schedule(w) == pytest.approx(scale.peak_lr)
    assert schedule(w + (total - w) // 2) == pytest.approx(1e-4 + (scale.peak_lr - 1e-4) / 4)
    assert schedule(total) == pytest.approx(1e-4)
