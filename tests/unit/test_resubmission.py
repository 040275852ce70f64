"""A resubmitted job with a changed config: refused when the change makes it another experiment, allowed
and recorded on the MLflow run when it only changes how long or where it runs; checked before Ray."""

from __future__ import annotations

import pytest

from imagenet_ray.config import flatten, load_config, to_yaml
from imagenet_ray.errors import UserError
from imagenet_ray.tracking import RunSink
from imagenet_ray.train import trainer
from imagenet_ray.train.resubmission import (
    CHANGES_TAG,
    SAFE_TO_CHANGE,
    check_resubmission,
    config_changes,
    record,
)


def _params(*overrides: str) -> dict[str, str]:
    return {k: str(v) for k, v in flatten(load_config(None, list(overrides))).items()}


def test_the_same_config_is_no_change():
    assert config_changes(_params(), flatten(load_config(None, []))) == []


@pytest.mark.parametrize(
    "override",
    [
        "model.name=resnet50",
        "data.url=/elsewhere",
        "optim.lr=0.5",
        "data.batch_size=64",
        "seed=1",
        "eval.hflip=true",
        "data.mixup_alpha=0.2",
        "optim.schedule=linear",
        "train.skip_step=true",
    ],
)
def test_a_change_of_model_data_recipe_or_eval_is_refused_naming_it(override):
    key = override.split("=")[0]
    with pytest.raises(UserError) as err:
        check_resubmission("abc123", _params(), flatten(load_config(None, [override])))
    message = str(err.value)
    assert "\n" not in message and "abc123" in message and key in message and "name=" in message


def test_more_epochs_workers_and_logging_are_allowed_and_listed():
    new = flatten(load_config(None, ["train.epochs=10", "train.num_workers=[1,4]", "mlflow.log_every_steps=50"]))
    changes = check_resubmission("abc123", _params(), new)
    assert [str(c) for c in changes] == [
        "mlflow.log_every_steps: 5 -> 50",
        "train.epochs: 3 -> 10",
        "train.num_workers: 1 -> [1, 4]",
    ]
    assert record(None, changes[:1]) == "mlflow.log_every_steps: 5 -> 50"
    assert record("train.epochs: 3 -> 5", changes[1:2]) == "train.epochs: 3 -> 5; train.epochs: 3 -> 10"
    assert len(record("x" * 4990, changes)) <= 5000  # MLflow's tag limit: the latest kept


def test_the_shard_cache_settings_may_change():
    new = flatten(load_config(None, ["data.shard_cache_dir=/mnt/shard-cache", "data.shard_cache_max_gb=500"]))
    assert [str(c) for c in check_resubmission("abc123", _params(), new)] == [
        "data.shard_cache_dir: None -> /mnt/shard-cache",
        "data.shard_cache_max_gb: 100.0 -> 500.0",
    ]


def test_identity_keys_and_keys_the_old_run_never_logged_are_not_compared():
    old = _params()
    del old["eval.hflip"]  # a key added to the config after that run started
    assert config_changes(old, flatten(load_config(None, ["eval.hflip=true", "name=other"]))) == []


def test_every_safe_key_is_a_config_key():
    assert set(SAFE_TO_CHANGE) - set(flatten(load_config(None, []))) <= {"train.checkpoint_every_minutes"}


def test_a_refused_resubmission_fails_before_ray_and_an_allowed_one_is_recorded(tmp_path, monkeypatch):
    overrides = [f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"train.storage_path={tmp_path / 'runs'}"]
    cfg = load_config(None, [*overrides, "name=resub"])
    sink, _ = RunSink.find_or_create(
        cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.name, str(tmp_path / "runs"), flatten(cfg), to_yaml(cfg)
    )
    monkeypatch.setattr(trainer, "ensure_ray", lambda *a, **k: pytest.fail("must not start Ray"))
    with pytest.raises(UserError, match=r"optim\.lr: 0\.1 -> 0\.4"):
        trainer.run_training(load_config(None, [*overrides, "name=resub", "optim.lr=0.4"]))

    class Started(Exception):
        pass

    def stop_at_ray(*_a, **_k):
        raise Started

    allowed = load_config(None, [*overrides, "name=resub", "train.epochs=5"])
    plan = trainer.RunPlan("data", str(tmp_path / "runs"), sink.tracking_uri, 10, 100, 20, False)
    monkeypatch.setattr(trainer, "open_source", lambda *a, **k: object())
    monkeypatch.setattr(trainer, "ensure_ray", lambda *a, **k: None)
    monkeypatch.setattr(trainer, "decide_use_gpu", lambda *a, **k: False)
    monkeypatch.setattr(trainer, "plan_run", lambda *a, **k: plan)
    monkeypatch.setattr(trainer, "reproducibility_tags", lambda *a, **k: {})
    monkeypatch.setattr(trainer, "pin_reads_to", stop_at_ray)  # the first step after the run's tags
    with pytest.raises(Started):  # allowed: it goes on, into the same run
        trainer.run_training(allowed)
    assert sink.read()[2][CHANGES_TAG] == "train.epochs: 3 -> 5"


def test_a_bad_storage_path_fails_before_an_mlflow_run_exists(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = load_config(
        None, [f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"train.storage_path={blocker}/runs"]
    )
    monkeypatch.setattr(trainer, "ensure_ray", lambda *a, **k: pytest.fail("must not start Ray"))
    with pytest.raises(UserError):
        trainer.run_training(cfg)
    assert not (tmp_path / "mlflow.db").exists()
    with pytest.raises(UserError, match="unsupported URL scheme"):
        trainer.run_training(load_config(None, ["train.storage_path=ftp://host/runs"]))
