"""The whole training driver on a local Ray: 2 workers, uneven val split, exact counts, MLflow, checkpoints."""

import pytest
from mlflow.tracking import MlflowClient

from imagenet_ray.config import load_config
from imagenet_ray.train.checkpoint import read_checkpoint_dir

pytestmark = pytest.mark.ray


def test_two_workers_count_every_val_image_once(local_ray, prepared, tmp_path):
    from imagenet_ray.train.trainer import run_training

    root, manifest = prepared
    db = tmp_path / "mlflow.db"
    cfg = load_config("configs/smoke.yaml", [
        f"data.url={root}", f"train.storage_path={tmp_path / 'runs'}", f"mlflow.tracking_uri=sqlite:///{db}",
        "train.epochs=1", "data.batch_size=4", "data.val_batch_size=4", "data.train_crop=32",
        "data.val_resize=40", "data.val_crop=32", "name=local-test",
    ])
    metrics = run_training(cfg)
    assert metrics["val/images"] == 21  # odd count over 2 workers: nothing padded, nothing dropped
    assert 0.0 <= metrics["val/top1"] <= metrics["val/top5"] <= 1.0
    # 3 classes: top-5 clamps to all classes, so every image is a top-5 hit
    assert metrics["val/top5"] == 1.0
    # train equal split: 36 images over 2 workers
    assert metrics["train/images"] == 36

    client = MlflowClient(f"sqlite:///{db}")
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "resnet18"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/top1")] == [1]
    state = read_checkpoint_dir(metrics["checkpoint_path"])
    assert state["epoch"] == 1 and state["mlflow_run_id"] == run.info.run_id


def test_raw_source_with_device_decode_path(local_ray, synth_raw, tmp_path):
    """data.source=raw + data.decode_on=gpu (run on CPU here): same exact val accounting."""
    from imagenet_ray.train.trainer import run_training

    raw, summary = synth_raw
    cfg = load_config("configs/smoke.yaml", [
        f"data.url={raw}", "data.source=raw", "data.decode_on=gpu", f"train.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "train.epochs=1", "data.batch_size=4",
        "data.val_batch_size=4", "data.train_crop=32", "data.val_resize=40", "data.val_crop=32", "name=raw-gpu-path",
    ])
    metrics = run_training(cfg)
    assert metrics["val/images"] == summary.val_images == 21
    assert metrics["train/images"] == summary.train_images
