"""Tracking URI rules and the RunSink against a real local sqlite MLflow store (no server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagenet_ray.config import flatten, load_config, to_yaml
from imagenet_ray.errors import UserError, describe_error
from imagenet_ray.tracking import (
    DATASETS_EXPERIMENT,
    RUN_NAME_TAG,
    STORAGE_TAG,
    RunSink,
    RunTracker,
    ensure_experiment,
    find_or_start_run,
    local_artifact_root,
    log_prepared_dataset,
    resolve_tracking_uri,
    set_tag,
)

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
    tracker, resumed = RunSink.find_or_create(uri, "unit-exp", cfg.name, str(tmp_path / "ckpt"), params, to_yaml(cfg))
    assert not resumed
    tracker.set_tags({"extra": "yes"})
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
    resumed = RunSink.attach(uri, tracker.run_id)
    resumed.log_metrics({"val/top1": 0.75}, step=3)
    assert [m.step for m in client.get_metric_history(tracker.run_id, "val/top1")] == [1, 2, 3]


def test_ensure_experiment_unusable_path_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError) as info:
        ensure_experiment(f"sqlite:///{blocker}/sub/mlflow.db", "x")
    assert str(blocker) in str(info.value)


def test_describe_error_is_one_cut_line():
    assert describe_error(ValueError("a\n  b\tc  ")) == "a b c"
    assert describe_error(RuntimeError("x" * 500)) == "x" * 300
    assert describe_error(RuntimeError("word " * 100), limit=9) == "word word"


def test_create_logs_params_in_batches_tags_and_texts(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    params = {f"p{i:03d}": i for i in range(250)}  # more than one MLflow batch of 100
    sink = RunSink.create(
        uri, "created-exp", "a run", params=params, tags={"kind": "unit"}, texts={"notes/readme.txt": "hello\n"}
    )
    run = MlflowClient(uri).get_run(sink.run_id)
    assert run.info.run_name == "a run" and run.info.status == "RUNNING"
    assert run.info.experiment_id == ensure_experiment(uri, "created-exp")
    assert run.data.params == {k: str(v) for k, v in params.items()}
    assert run.data.tags["kind"] == "unit" and RUN_NAME_TAG not in run.data.tags  # only training runs are keyed
    sink.log_text("more", "notes/more.txt")
    local = MlflowClient(uri).download_artifacts(sink.run_id, "notes", str(tmp_path / "dl"))
    assert sorted(p.name for p in Path(local).iterdir()) == ["more.txt", "readme.txt"]
    assert (Path(local) / "readme.txt").read_text() == "hello\n"


def test_find_or_create_resumes_by_name_and_storage(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    first, resumed = RunSink.find_or_create(uri, "exp", "run-a", "s3://b/ckpt", {"x": 1}, "x: 1\n")
    assert not resumed
    again, resumed = RunSink.find_or_create(uri, "exp", "run-a", "s3://b/ckpt", {"x": 1}, "x: 1\n")
    assert resumed and again.run_id == first.run_id
    other, resumed = RunSink.find_or_create(uri, "exp", "run-a", "s3://b/elsewhere", {"x": 1}, "x: 1\n")
    assert not resumed and other.run_id != first.run_id  # same name, other storage: another training run
    tags = MlflowClient(uri).get_run(first.run_id).data.tags
    assert tags[RUN_NAME_TAG] == "run-a" and tags[STORAGE_TAG] == "s3://b/ckpt"
    # the transition wrapper keys runs the same way
    assert find_or_start_run(uri, ensure_experiment(uri, "exp"), "run-a", "s3://b/ckpt", {}, "") == (first.run_id, True)


def test_attach_reopens_an_ended_run_and_knows_its_logged_steps(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    sink = RunSink.create(uri, "exp", "r")
    sink.log_metrics({"val/top1": 0.1}, step=1)
    sink.log_metrics({"val/top1": 0.2}, step=2)
    sink.finish("KILLED")
    client = MlflowClient(uri)
    assert client.get_run(sink.run_id).info.status == "KILLED"
    assert RunSink.attach(uri, sink.run_id).logged_steps("val/top1") == {1, 2}
    assert client.get_run(sink.run_id).info.status == "KILLED"  # attaching alone changes nothing
    reopened = RunSink.attach(uri, sink.run_id, reopen=True)
    assert client.get_run(sink.run_id).info.status == "RUNNING"
    assert reopened.logged_steps("missing") == set()
    set_tag(uri, sink.run_id, "legacy", "ok")
    assert client.get_run(sink.run_id).data.tags["legacy"] == "ok"
    assert RunTracker is RunSink


def test_mlflow_failures_are_one_user_error_naming_the_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    ensure_experiment(uri, "exp")
    sink = RunSink.attach(uri, "0" * 32)  # no such run
    for call in (
        lambda: sink.log_metrics({"a": 1.0}, step=0),
        lambda: sink.set_tags({"k": "v"}),
        lambda: sink.reopen(),
        lambda: sink.finish(),
        lambda: sink.log_dict({}, "x.json"),
    ):
        with pytest.raises(UserError) as info:
            call()
        message = str(info.value)
        assert message.startswith(f"MLflow at {uri}: ") and "\n" not in message, message
        assert len(message) <= len(f"MLflow at {uri}: ") + 300


def test_log_prepared_dataset_is_one_finished_run_with_its_input(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    out = str(tmp_path / "prepared")
    split = {"listed": 3, "written": 2, "quarantined": 1, "bytes_in": 300, "bytes_out": 200}
    report = {
        "source": "/src",
        "layout": "kaggle",
        "out": out,
        "tool_version": "1",
        "classes": 2,
        "wall_seconds": 1.5,
        "splits": {"train": split},
    }
    manifest = {"splits": {"train": {"shards": [{"sha256": "ab"}, {"sha256": "cd"}]}}}
    run_id = log_prepared_dataset(uri, report, manifest)
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == f"prepare {out}"
    assert run.info.experiment_id == ensure_experiment(uri, DATASETS_EXPERIMENT)
    assert run.data.params == {"source": "/src", "layout": "kaggle", "out": out, "tool_version": "1"}
    assert run.data.metrics["train/quarantined"] == 1 and run.data.metrics["classes"] == 2
    assert {a.path for a in client.list_artifacts(run_id)} == {"_report.json", "_manifest.json"}
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == [out]
    failed = log_prepared_dataset(uri, report, None)
    assert client.get_run(failed).info.status == "FAILED"


def test_experiments_open_in_the_model_training_view(tmp_path):
    """Tagged as the MLflow UI's custom_model_development kind (else it opens the GenAI view); an existing
    experiment gets the tag once, and a kind someone chose is kept."""
    from mlflow.tracking import MlflowClient

    from imagenet_ray.tracking import EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT, ensure_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    new = ensure_experiment(uri, "fresh")
    assert client.get_experiment(new).tags[EXPERIMENT_KIND_TAG] == MODEL_DEVELOPMENT
    untagged = client.create_experiment("made-elsewhere")
    assert ensure_experiment(uri, "made-elsewhere") == untagged
    assert client.get_experiment(untagged).tags[EXPERIMENT_KIND_TAG] == MODEL_DEVELOPMENT
    chosen = client.create_experiment("genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    ensure_experiment(uri, "genai")
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_a_finished_run_is_not_resumed_to_train_nothing(tmp_path, monkeypatch, caplog):
    """The same train command a second time: one line saying so and the run's final metrics, no Ray."""
    import logging

    from imagenet_ray.train import trainer
    from imagenet_ray.train.checkpoint import CHECKPOINT_TAG

    overrides = [f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"train.storage_path={tmp_path / 'runs'}"]
    cfg = load_config(None, [*overrides, "name=twice", "train.epochs=2"])
    assert trainer.finished_run(cfg) is None  # no store yet: nothing is created either
    assert not (tmp_path / "mlflow.db").exists()
    sink, _ = RunSink.find_or_create(
        cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.name, str(tmp_path / "runs"), flatten(cfg), to_yaml(cfg)
    )
    for epoch, top1 in ((1, 0.5), (2, 0.75)):
        sink.log_metrics({"val/top1": top1, "epoch": epoch}, step=10 * epoch)  # at the global step
    sink.set_tags({CHECKPOINT_TAG: "s3://checkpoints/runs/twice/checkpoint_000001"})
    assert trainer.finished_run(cfg) is None  # still RUNNING (a crashed or live job): resume as before
    sink.finish("FINISHED")
    assert trainer.finished_run(load_config(None, [*overrides, "name=twice", "train.epochs=3"])) is None  # more
    assert trainer.finished_run(load_config(None, [*overrides, "name=other", "train.epochs=2"])) is None

    monkeypatch.setattr(trainer, "ensure_ray", lambda *a, **k: pytest.fail("must not start Ray"))
    with caplog.at_level(logging.INFO, logger="imagenet_ray"):
        done = trainer.run_training(cfg)
    assert done["val/top1"] == 0.75 and done["epoch"] == 2 and done["mlflow_run_id"] == sink.run_id
    assert done["checkpoint_url"] == "s3://checkpoints/runs/twice/checkpoint_000001"
    (line,) = [r.getMessage() for r in caplog.records if "already trained" in r.getMessage()]
    assert "'twice' already trained its 2 epochs" in line and "name=" in line and "train.epochs=N (N > 2)" in line
