"""An error no retry heals, on a local Ray: the run stops at once with the reason, retries unspent."""

from __future__ import annotations

import dataclasses

import pytest
from mlflow.tracking import MlflowClient

from imagenet_ray.config import load_config
from imagenet_ray.errors import UserError
from imagenet_ray.train.fatal import fatal_url, read_fatal

pytestmark = [pytest.mark.ray]


def test_a_val_count_mismatch_fails_at_once_and_the_run_is_failed(local_ray, prepared, tmp_path, monkeypatch):
    from imagenet_ray.train import trainer

    root, _ = prepared
    real_plan_run = trainer.plan_run

    def one_val_image_too_many(*args, **kwargs):  # as if the manifest listed an image the shards lack
        plan = real_plan_run(*args, **kwargs)
        return dataclasses.replace(plan, num_val=plan.num_val + 1)

    monkeypatch.setattr(trainer, "plan_run", one_val_image_too_many)
    cfg = load_config(
        "configs/smoke.yaml",
        [
            f"data.url={root}",
            f"train.storage_path={tmp_path / 'runs'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "name=fatal",
            "train.epochs=1",
            "train.max_failures=3",  # would be spent on an error that repeats every time
            "data.batch_size=8",
            "data.train_crop=32",
            "eval.resize=40",
            "eval.crop=32",
        ],
    )
    with pytest.raises(UserError) as err:
        trainer.run_training(cfg)
    message = str(err.value)
    assert "without retrying" in message and "validation counted" in message and "\n" not in message
    assert "refusing to report" in (read_fatal(fatal_url(str(tmp_path / "runs"), "fatal")) or "")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    assert run.info.status == "FAILED"
    assert "val/top1" not in run.data.metrics  # a wrong count is never reported
