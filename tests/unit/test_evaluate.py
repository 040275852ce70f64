"""The evaluate job's pieces without Ray: ReaL counting (and its hook on the evaluation engine), weights
that do not fit, the worker plan, the eval preset (checkpoint config vs --resize/--crop)."""

from __future__ import annotations

import pickle

import pytest
import torch
import torchvision

from imagenet_ray.cli import build_parser
from imagenet_ray.config import load_config, to_yaml
from imagenet_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from imagenet_ray.errors import ConfigError, UserError
from imagenet_ray.evaluate import (
    EvalRequest,
    EvalWorkerPlan,
    RealCounts,
    check_weights_fit,
    checkpoint_eval_preset,
    eval_preset,
    real_counts,
)
from imagenet_ray.train.evaluation import evaluate

CPU = torch.device("cpu")


class _PredictsItsPixel(torch.nn.Module):
    """Predicts class k for an image whose pixels are all k (0..4), undoing to_model_input's normalisation."""

    def forward(self, x):
        red = x[:, 0, 0, 0] * IMAGENET_STD[0] * 255 + IMAGENET_MEAN[0] * 255
        return torch.nn.functional.one_hot(red.round().long().clamp(0, 4), 5).float()


def test_real_hook_counts_each_batch_by_val_index():
    table = [[1], [], [2, 3], [0]]  # val image 1 has no ReaL label: not counted
    hook = RealCounts(table, CPU)
    predictions = torch.tensor([1, 1, 3, 2, 0])  # for val indices 0, 1, 2, 3, -1
    images = predictions.view(-1, 1, 1, 1).expand(-1, 2, 2, 3).to(torch.uint8)
    labels = torch.zeros(5, dtype=torch.int64)
    batches = [
        {"image": images[:3], "label": labels[:3], "val_index": torch.tensor([0, 1, 2])},
        {"image": images[3:], "label": labels[3:], "val_index": torch.tensor([3, -1])},
    ]
    evaluate(_PredictsItsPixel(), batches, CPU, hooks=[hook])
    # idx 0: 1 ∈ [1] hit; idx 1: no labels; idx 2: 3 ∈ [2, 3] hit; idx 3: 2 ∉ [0]; idx -1: not a val image
    assert hook.hits.tolist() == [2.0, 3.0]


def test_eval_worker_plan_pickles():
    plan = EvalWorkerPlan(
        model="resnet18",
        state={"w": torch.ones(2)},
        blurpool=False,
        num_classes=5,
        num_val=7,
        hflip=True,
        batch_size=4,
        real=[[1], []],
    )
    back = pickle.loads(pickle.dumps({"plan": plan}))["plan"]
    assert back.model == "resnet18" and torch.equal(back.state["w"], torch.ones(2)) and back.real == [[1], []]


def test_real_counts():
    table = [[3], [], [1, 7], [2]]
    # image 0 right, image 1 has no ReaL label (not counted), image 2 right via its second label,
    # image 3 wrong, index -1 and 9 are not val images of the table
    assert real_counts([3, 5, 7, 4, 0, 0], [0, 1, 2, 3, -1, 9], table) == (2, 3)


def test_weights_that_do_not_fit_are_one_clear_error():
    state = torchvision.models.resnet18(num_classes=10).state_dict()
    check_weights_fit("resnet18", state, 10)
    with pytest.raises(UserError, match="do not fit resnet34 with 10 classes"):
        check_weights_fit("resnet34", state, 10)
    with pytest.raises(UserError, match="do not fit resnet18 with 3 classes"):
        check_weights_fit("resnet18", state, 3)
    with pytest.raises(UserError, match="not a torchvision classification model"):
        check_weights_fit("resnet9000", state, 10)


# --- the eval preset: the checkpoint's, unless --resize/--crop say otherwise ------------------------------

CKPT_YAML = to_yaml(load_config(None, ["eval.resize=160", "eval.crop=128"]))  # what a checkpoint stores


def test_eval_preset_is_the_checkpoints():
    assert eval_preset(CKPT_YAML, None, None) == (160, 128, "from the checkpoint's config")


def test_explicit_resize_and_crop_win_over_the_checkpoint():
    assert eval_preset(CKPT_YAML, 256, 224) == (256, 224, "from --resize/--crop")
    # one flag: the other value is still the checkpoint's
    assert eval_preset(CKPT_YAML, 144, None) == (144, 128, "resize from --resize, crop from the checkpoint's config")
    assert eval_preset(CKPT_YAML, None, 96) == (160, 96, "crop from --crop, resize from the checkpoint's config")


@pytest.mark.parametrize("config_yaml", [None, "", "name: x\nmodel: {name: resnet18}\n", "[not, a, mapping]"])
def test_no_checkpoint_config_falls_back_to_256_224_and_says_so(config_yaml):
    resize, crop, source = eval_preset(config_yaml, None, None)
    assert (resize, crop) == (256, 224)
    assert "256/224 default" in source and "no checkpoint config" in source
    assert eval_preset(config_yaml, 288, None)[:2] == (288, 224)


def test_checkpoint_preset_of_older_configs():
    # before the eval section, the preset was data.val_resize/data.val_crop
    assert checkpoint_eval_preset("data: {val_resize: 232, val_crop: 208}\n") == (232, 208)
    # a key left out is the EvalSection default the run resolved it to (73/64)
    assert checkpoint_eval_preset("eval: {resize: 96}\n") == (96, 64)
    assert checkpoint_eval_preset("eval: {resize: [1]}\n") is None
    assert checkpoint_eval_preset(":\n  - [") is None  # not YAML


def test_a_crop_larger_than_the_resolved_resize_is_a_config_error():
    with pytest.raises(ConfigError, match=r"crop 224 must not exceed resize 160 \(crop from --crop"):
        eval_preset(CKPT_YAML, None, 224)


def test_evaluate_cli_defaults_mean_from_the_checkpoint():
    args = build_parser().parse_args(["evaluate", "--data", "d", "--checkpoint", "c"])
    assert (args.resize, args.crop) == (None, None)
    assert (EvalRequest(data_url="d").resize, EvalRequest(data_url="d").crop) == (None, None)
    args = build_parser().parse_args(
        ["evaluate", "--data", "d", "--checkpoint", "c", "--resize", "232", "--crop", "200"]
    )
    assert (args.resize, args.crop) == (232, 200)
