"""Tracking URI rules and a real MLflow round trip against a local sqlite store (no server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagenet_ray.config import flatten, load_config, to_yaml
from imagenet_ray.errors import UserError
from imagenet_ray.tracking import (RUN_NAME_TAG, RunTracker, ensure_experiment, local_artifact_root,
                                   resolve_tracking_uri)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # sqlalchemy deprecations inside mlflow


def test_relative_sqlite_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///.demo/mlflow.db") == f"sqlite:///{tmp_path}/.demo/mlflow.db"


def test_absolute_sqlite_unchanged(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"  # sqlite:////abs/path
    assert uri.startswith("sqlite:////")
    assert resolve_tracking_uri(uri) == uri


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "https://mlflow.example.com/", "databricks://profile"])
def test_remote_uris_unchanged(uri):
    assert resolve_tracking_uri(uri) == uri


def test_bare_databricks_uri_unchanged():
    assert resolve_tracking_uri("databricks") == "databricks"


def test_bare_path_becomes_sqlite_db(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("runs/tracking") == f"sqlite:///{tmp_path}/runs/tracking/mlflow.db"
    assert resolve_tracking_uri("store.db") == f"sqlite:///{tmp_path}/store.db"
    assert resolve_tracking_uri(str(tmp_path / "abs")) == f"sqlite:///{tmp_path}/abs/mlflow.db"
    assert resolve_tracking_uri(f"file://{tmp_path}/x") == f"sqlite:///{tmp_path}/x/mlflow.db"


@pytest.mark.parametrize("uri", ["ftp://host/x", "s3://bucket/mlflow", "postgresql://u@h/db"])
def test_unsupported_scheme(uri):
    with pytest.raises(UserError) as info:
        resolve_tracking_uri(uri)
    assert "mlflow.tracking_uri" in str(info.value) and "unsupported scheme" in str(info.value)


@pytest.mark.parametrize("uri", ["sqlite://", "sqlite://host/x.db"])
def test_malformed_sqlite(uri):
    with pytest.raises(UserError, match="sqlite:///path"):
        resolve_tracking_uri(uri)


def test_local_artifact_root_beside_db(tmp_path):
    assert local_artifact_root(f"sqlite:///{tmp_path}/m.db") == str(tmp_path / "mlartifacts")
    assert local_artifact_root("http://h:5000") is None


def test_mlflow_sqlite_round_trip(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(str(tmp_path / "store"))
    assert uri == f"sqlite:///{tmp_path}/store/mlflow.db"
    exp_id = ensure_experiment(uri, "unit-exp")
    assert ensure_experiment(uri, "unit-exp") == exp_id  # idempotent
    assert Path(tmp_path / "store" / "mlflow.db").is_file()

    cfg = load_config(None, ["name=unit-run", "optim.lr=0.05", "train.epochs=2"])
    params = flatten(cfg)
    tracker = RunTracker.start(uri, exp_id, cfg.name, params, to_yaml(cfg), tags={"extra": "yes"})
    tracker.log_metrics({"val/top1": 0.25, "train/loss": 2.0, "epoch": 1}, step=1)
    tracker.log_metrics({"val/top1": 0.5, "train/loss": 1.5, "epoch": 2}, step=2)
    tracker.log_dict({"a": 1}, "summary.json")
    tracker.finish("FINISHED")

    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.experiment_id == exp_id
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "unit-run"
    assert run.data.tags[RUN_NAME_TAG] == "unit-run" and run.data.tags["extra"] == "yes"
    assert run.data.params == {k: str(v) for k, v in params.items()}
    assert run.data.params["optim.lr"] == "0.05" and run.data.params["train.epochs"] == "2"

    history = client.get_metric_history(tracker.run_id, "val/top1")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.25), (2, 0.5)]
    assert run.data.metrics["train/loss"] == 1.5  # latest

    artifacts = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"config.yaml", "summary.json"} <= artifacts
    local = client.download_artifacts(tracker.run_id, "config.yaml", str(tmp_path / "dl"))
    assert load_config(local) == cfg
    # artifacts live beside the database, not in the working directory
    exp = client.get_experiment(exp_id)
    assert exp.artifact_location.startswith((tmp_path / "store" / "mlartifacts").as_uri())

    # resuming by id logs into the same run
    resumed = RunTracker(uri, tracker.run_id)
    resumed.log_metrics({"val/top1": 0.75}, step=3)
    assert [m.step for m in client.get_metric_history(tracker.run_id, "val/top1")] == [1, 2, 3]


def test_ensure_experiment_unusable_path_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError) as info:
        ensure_experiment(f"sqlite:///{blocker}/sub/mlflow.db", "x")
    assert str(blocker) in str(info.value)



def test_real_counts_and_val_index():
    from imagenet_ray.evaluate import real_counts, val_index_of

    assert val_index_of("ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_00000001.JPEG") == 0
    assert val_index_of("ILSVRC2012_img_val.tar/ILSVRC2012_val_00050000.JPEG") == 49_999
    assert val_index_of("train/n01440764/n01440764_1.JPEG") == -1
    table = [[3], [], [1, 7], [2]]
    # image 0 right, image 1 has no ReaL label (not counted), image 2 right via its second label,
    # image 3 wrong, index -1 and 9 are not val images of the table
    assert real_counts([3, 5, 7, 4, 0, 0], [0, 1, 2, 3, -1, 9], table) == (2, 3)


def test_weights_that_do_not_fit_are_one_clear_error():
    import torchvision

    from imagenet_ray.errors import UserError
    from imagenet_ray.evaluate import check_weights_fit

    state = torchvision.models.resnet18(num_classes=10).state_dict()
    check_weights_fit("resnet18", state, 10)
    with pytest.raises(UserError, match="do not fit resnet34 with 10 classes"):
        check_weights_fit("resnet34", state, 10)
    with pytest.raises(UserError, match="do not fit resnet18 with 3 classes"):
        check_weights_fit("resnet18", state, 3)
    with pytest.raises(UserError, match="not a torchvision classification model"):
        check_weights_fit("resnet9000", state, 10)
