"""Learning-rate schedules, weight-decay parameter groups, and the optimizers built on them (SGD, timm's LARS)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn
import torchvision
from timm.optim import Lars

from imagenet_ray.config import OptimSection
from imagenet_ray.train.models import build_model
from imagenet_ray.train.optim import build_lars, build_optimizer, build_sgd, lr_at, param_groups, scaled_lr, set_lr


def test_warmup_is_linear_and_reaches_peak_at_its_end():
    peak, warmup, total = 0.8, 10, 100
    lrs = [lr_at(s, total, warmup, peak, "cosine") for s in range(warmup)]
    assert lrs[0] == pytest.approx(peak / warmup)
    assert lrs[-1] == pytest.approx(peak)
    steps = [b - a for a, b in itertools.pairwise(lrs)]
    assert all(d == pytest.approx(peak / warmup) for d in steps)  # constant increments: linear
    # the schedule continues from the peak without a jump
    assert lr_at(warmup, total, warmup, peak, "cosine") == pytest.approx(peak)
    assert lr_at(warmup, total, warmup, peak, "constant") == pytest.approx(peak)


def test_cosine_decays_to_zero_at_total_steps():
    peak, warmup, total = 0.5, 5, 105
    lrs = [lr_at(s, total, warmup, peak, "cosine") for s in range(warmup, total + 1)]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(lrs)), "cosine must be non-increasing"
    assert lr_at(total, total, warmup, peak, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_at(total - 1, total, warmup, peak, "cosine") < peak * 1e-3
    assert lr_at(warmup + 50, total, warmup, peak, "cosine") == pytest.approx(peak / 2)  # midpoint
    assert lr_at(total + 10, total, warmup, peak, "cosine") == pytest.approx(0.0, abs=1e-12)  # clamped past end
    # exact formula at an arbitrary point
    s = warmup + 30
    assert lr_at(s, total, warmup, peak, "cosine") == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 0.3)))


def test_cosine_without_warmup_starts_at_peak():
    assert lr_at(0, 50, 0, 0.1, "cosine") == pytest.approx(0.1)


def test_constant_stays_at_peak():
    assert {lr_at(s, 100, 0, 0.3, "constant") for s in range(0, 150, 7)} == {0.3}
    assert lr_at(2, 100, 4, 0.3, "constant") == pytest.approx(0.3 * 3 / 4)


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="exponential"):
        lr_at(5, 10, 0, 0.1, "exponential")


def test_scaled_lr_linear_rule():
    assert scaled_lr(0.1, 256) == pytest.approx(0.1)
    assert scaled_lr(0.1, 1024) == pytest.approx(0.4)
    assert scaled_lr(0.4, 32) == pytest.approx(0.05)
    assert scaled_lr(0.2, 512) == pytest.approx(2 * scaled_lr(0.2, 256))


class _Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 2)
        self.frozen = nn.Linear(2, 2)
        for p in self.frozen.parameters():
            p.requires_grad_(False)


def _ids(params):
    return {id(p) for p in params}


def test_param_groups_by_module_type():
    m = _Named()
    decay, no_decay = param_groups(m, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    d, nd = _ids(decay["params"]), _ids(no_decay["params"])
    assert d == _ids([m.conv.weight, m.fc.weight])
    assert nd == _ids([m.conv.bias, m.bn.weight, m.bn.bias, m.ln.weight, m.ln.bias, m.fc.bias])
    assert not d & nd
    # frozen parameters go nowhere
    assert not (_ids(m.frozen.parameters()) & (d | nd))


def test_param_groups_cover_resnet18_exactly():
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    decay, no_decay = param_groups(model, 5e-5)
    d, nd = _ids(decay["params"]), _ids(no_decay["params"])
    everything = _ids(model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters())) == 62
    assert d | nd == everything and not d & nd
    bns = [mod for mod in model.modules() if isinstance(mod, nn.BatchNorm2d)]
    convs = [mod for mod in model.modules() if isinstance(mod, nn.Conv2d)]
    assert len(bns) == 20 and len(convs) == 20
    for bn in bns:  # named "weight", but a BatchNorm: no decay
        assert id(bn.weight) in nd and id(bn.bias) in nd
    for conv in convs:
        assert id(conv.weight) in d
    assert id(model.fc.weight) in d and id(model.fc.bias) in nd
    assert len(decay["params"]) == 21 and len(no_decay["params"]) == 41


def test_build_sgd_and_set_lr():
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    opt = build_sgd(model, lr=0.2, momentum=0.9, weight_decay=1e-4)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert all(g["lr"] == 0.2 and g["momentum"] == 0.9 and not g["nesterov"] for g in opt.param_groups)
    set_lr(opt, 0.05)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.05]


def test_no_decay_group_really_is_not_decayed():
    # One SGD step with zero gradients: decayed weights shrink, BatchNorm weights do not.
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    opt = torch.optim.SGD(param_groups(model, 0.5), lr=1.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    w_before, bn_before = model[0].weight.detach().clone(), model[1].weight.detach().clone()
    opt.step()
    assert torch.allclose(model[0].weight, w_before * 0.5)
    assert torch.equal(model[1].weight, bn_before)


# ================================================================ param_groups on a torchvision ResNet


@pytest.fixture(scope="module")
def resnet18_plain():
    """resnet18 (10 classes) built with seed 0, no tweaks; shared (its parameters are never changed)."""
    torch.manual_seed(0)
    return build_model("resnet18", num_classes=10)


def test_param_groups_without_norm_exemption_decays_everything(resnet18_plain):
    model = resnet18_plain
    groups = param_groups(model, 1e-4, no_decay_norm_and_bias=False)
    assert len(groups) == 1
    assert groups[0]["weight_decay"] == 1e-4
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.parameters()}
    opt = build_sgd(model, lr=0.1, momentum=0.9, weight_decay=1e-4, no_decay_norm_and_bias=False)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 1e-4
    bn_ids = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert bn_ids and bn_ids <= {id(p) for p in opt.param_groups[0]["params"]}
    # with the exemption (FFCV / torchvision V2): every BN parameter and the fc bias are not decayed
    _decay, no_decay = build_sgd(model, 0.1, 0.9, 1e-4).param_groups
    assert no_decay["weight_decay"] == 0.0
    assert {id(p) for p in no_decay["params"]} == bn_ids | {id(model.fc.bias)}


def test_param_groups_without_exemption_skips_frozen_params():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    model[0].bias.requires_grad_(False)
    (group,) = param_groups(model, 0.5, no_decay_norm_and_bias=False)
    assert {id(p) for p in group["params"]} == {id(model[0].weight), id(model[1].weight), id(model[1].bias)}


# ================================================================ LARS (timm's Lars)


def _lars_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def _set_grads(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_build_lars_groups_adapt_the_weights_and_exempt_norms_and_biases():
    model = _lars_model()
    opt = build_lars(model, lr=2.0, momentum=0.9, weight_decay=5e-5, trust_coeff=0.002, eps=1e-7)
    assert isinstance(opt, Lars)
    decay, exempt = opt.param_groups
    assert _ids(decay["params"]) == {id(model[0].weight)}
    assert _ids(exempt["params"]) == _ids([model[0].bias, model[1].weight, model[1].bias])
    assert (decay["weight_decay"], decay["always_adapt"]) == (5e-5, True)
    assert (exempt["weight_decay"], exempt["always_adapt"]) == (0.0, False)
    for g in opt.param_groups:
        assert (g["lr"], g["momentum"], g["trust_coeff"], g["eps"], g["nesterov"]) == (2.0, 0.9, 0.002, 1e-7, False)
        assert g["trust_clip"] is False  # LARS, not LARC


def test_one_lars_step_by_hand():
    """MLPerf's LARS: the weight moves by lr·η‖w‖/(‖g‖ + wd‖w‖ + eps)·(g + wd·w); the exempt BatchNorm
    weight and the bias by lr·g, neither adapted nor decayed (first step: momentum buffer = update)."""
    lr, wd, eta, eps = 3.0, 0.01, 0.001, 1e-8
    model = _lars_model()
    opt = build_lars(model, lr=lr, momentum=0.9, weight_decay=wd, trust_coeff=eta, eps=eps)
    _set_grads(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    opt.step()
    w, g = before["0.weight"], grads["0.weight"]
    trust = eta * w.norm() / (g.norm() + wd * w.norm() + eps)
    assert torch.allclose(model[0].weight, w - lr * trust * (g + wd * w), atol=1e-7)
    assert trust.item() < 0.01  # the weight's step really is scaled down
    for name in ("0.bias", "1.weight", "1.bias"):
        param = dict(model.named_parameters())[name]
        assert torch.allclose(param, before[name] - lr * grads[name], atol=1e-6), name


def test_lars_adapts_the_weights_without_weight_decay_too():
    model = _lars_model()
    opt = build_lars(model, lr=1.0, momentum=0.0, weight_decay=0.0)
    _set_grads(model)
    w, g = model[0].weight.detach().clone(), model[0].weight.grad.clone()
    opt.step()
    trust = 0.001 * w.norm() / (g.norm() + 1e-8)
    assert torch.allclose(model[0].weight, w - trust * g, atol=1e-7)


def test_lars_without_the_exemption_adapts_and_decays_everything():
    model = _lars_model()
    opt = build_lars(model, lr=1.0, momentum=0.9, weight_decay=1e-4, no_decay_norm_and_bias=False)
    (group,) = opt.param_groups
    assert group["always_adapt"] is True and group["weight_decay"] == 1e-4
    assert _ids(group["params"]) == _ids(model.parameters())


def test_build_optimizer_follows_optim_name():
    model = _lars_model()
    sgd = build_optimizer(model, OptimSection(), peak_lr=0.4)
    assert type(sgd) is torch.optim.SGD
    assert [g["weight_decay"] for g in sgd.param_groups] == [5e-5, 0.0] and sgd.param_groups[0]["lr"] == 0.4
    o = OptimSection(name="lars", weight_decay=1e-4, lars_trust_coeff=0.02, lars_eps=0.0, momentum=0.8)
    lars = build_optimizer(model, o, peak_lr=10.5)
    assert isinstance(lars, Lars)
    decay, exempt = lars.param_groups
    assert (decay["lr"], decay["momentum"], decay["weight_decay"], decay["trust_coeff"], decay["eps"]) == (
        10.5,
        0.8,
        1e-4,
        0.02,
        0.0,
    )
    assert exempt["weight_decay"] == 0.0 and exempt["always_adapt"] is False


def test_lars_state_round_trips_through_a_checkpoint():
    model = _lars_model()
    opt = build_lars(model, lr=1.0, momentum=0.9, weight_decay=1e-4)
    _set_grads(model)
    opt.step()
    again = build_lars(model, lr=1.0, momentum=0.9, weight_decay=1e-4)
    again.load_state_dict(opt.state_dict())
    buf = opt.state[model[0].weight]["momentum_buffer"]
    assert torch.equal(again.state[model[0].weight]["momentum_buffer"], buf)
    assert again.param_groups[1]["always_adapt"] is False
