"""The evaluate job's pieces without Ray: ReaL counting (and its hook on the evaluation engine), weights
that do not fit, the worker plan."""

from __future__ import annotations

import pickle

import pytest
import torch
import torchvision

from imagenet_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from imagenet_ray.errors import UserError
from imagenet_ray.evaluate import EvalWorkerPlan, RealCounts, check_weights_fit, real_counts
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
