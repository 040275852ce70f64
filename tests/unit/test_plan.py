"""The worker plan: typed, frozen, exactly what workers read, and it survives Ray's pickling."""

from __future__ import annotations

import dataclasses
import pickle

import cloudpickle
import pytest

from imagenet_ray.config import ExperimentConfig, load_config, to_yaml
from imagenet_ray.train.plan import WorkerPlan
from imagenet_ray.train.trainer import RunPlan


def _plan(cfg: ExperimentConfig | None = None) -> WorkerPlan:
    cfg = cfg or ExperimentConfig.model_validate(
        {"name": "p", "data": {"progressive": {"start_size": 32, "end_size": 64}}}
    )
    return WorkerPlan(
        config=cfg,
        num_classes=3,
        classes=("n1", "n2", "n3"),
        num_train=30,
        num_val=12,
        tracking_uri="sqlite:////tmp/x/mlflow.db",
        mlflow_run_id="abc",
    )


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps])
def test_worker_plan_survives_pickling(dumps):
    plan = _plan()
    back = pickle.loads(dumps(plan.to_loop_config()))
    restored = WorkerPlan.from_loop_config(back)
    assert restored == plan
    assert restored.config.data.progressive == plan.config.data.progressive
    assert restored.config_yaml == to_yaml(plan.config)


def test_worker_plan_is_frozen():
    plan = _plan()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.num_val = 1  # type: ignore[misc]


def test_run_plan_hands_workers_exactly_the_worker_plan(monkeypatch):
    monkeypatch.setenv("IMAGENET_RAY_AUDIT_SAMPLES_DIR", "/audit")
    cfg = load_config(None, ["name=q"])
    run = RunPlan(
        data_url="/d",
        storage_url="/s",
        tracking_uri="sqlite:////m.db",
        num_classes=2,
        num_train=10,
        num_val=4,
        use_gpu=False,
        classes=("a", "b"),
    )
    assert run.for_workers(cfg, "run-1") == WorkerPlan(
        config=cfg,
        num_classes=2,
        classes=("a", "b"),
        num_train=10,
        num_val=4,
        tracking_uri="sqlite:////m.db",
        mlflow_run_id="run-1",
        fatal_error_url="/s/q/_fatal_error.txt",  # beside the run's checkpoints
        audit_samples_dir="/audit",  # from the driver's environment (sample_audit.py)
    )
    assert {f.name for f in dataclasses.fields(WorkerPlan)} == {
        "config",
        "num_classes",
        "classes",
        "num_train",
        "num_val",
        "tracking_uri",
        "mlflow_run_id",
        "fatal_error_url",
        "audit_samples_dir",
    }
