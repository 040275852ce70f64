"""The whole training driver on a local Ray: 2 workers, uneven val split, exact counts, MLflow, checkpoints."""

import pytest
from mlflow.tracking import MlflowClient

from imagenet_ray.config import load_config
from imagenet_ray.tracking import RunSink
from imagenet_ray.train.checkpoint import read_checkpoint_dir

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def trained(local_ray, prepared, tmp_path_factory):
    from imagenet_ray.train.trainer import run_training

    root, _ = prepared
    tmp_path = tmp_path_factory.mktemp("trained")
    db = tmp_path / "mlflow.db"
    cfg = load_config(
        "configs/smoke.yaml",
        [
            f"data.url={root}",
            f"train.storage_path={tmp_path / 'runs'}",
            f"mlflow.tracking_uri=sqlite:///{db}",
            "train.epochs=1",
            "data.batch_size=4",
            "eval.batch_size=4",
            "data.train_crop=32",
            "eval.resize=40",
            "eval.crop=32",
            "name=local-test",
        ],
    )
    return run_training(cfg), db, tmp_path


def test_two_workers_count_every_val_image_once(trained):
    metrics, db, _ = trained
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
    assert [e for e, _ in RunSink(f"sqlite:///{db}", run.info.run_id).epoch_history("val/top1")] == [1]
    state = read_checkpoint_dir(metrics["checkpoint_path"])
    assert state["epoch"] == 1 and state["mlflow_run_id"] == run.info.run_id


def test_raw_source_with_device_decode_path(local_ray, synth_raw, prepared, tmp_path):
    """data.source=raw + data.decode_on=gpu (run on CPU here): same exact val accounting."""
    from imagenet_ray.train.trainer import run_training

    raw, summary = synth_raw
    cfg = load_config(
        "configs/smoke.yaml",
        [
            f"data.url={raw}",
            "data.source=raw",
            "data.decode_on=gpu",
            f"train.storage_path={tmp_path / 'runs'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "train.epochs=1",
            "data.batch_size=4",
            "eval.batch_size=4",
            "data.train_crop=32",
            "eval.resize=40",
            "eval.crop=32",
            "name=raw-gpu-path",
            # the recipe mechanics, all on at once: V2 augmentations, EMA, FFCV resizing/TTA, accumulation
            "data.auto_augment=trivialaugment",
            "data.random_erasing=0.5",
            "data.mixup_alpha=0.2",
            "data.cutmix_alpha=1.0",
            "optim.ema_decay=0.9",
            "eval.hflip=true",
            "optim.grad_accum_steps=2",
            "data.progressive={start_size: 16, end_size: 32, start_epoch: 0, end_epoch: 2, step: 16}",
            "model.blurpool=true",
            "optim.label_smoothing=0.1",
        ],
    )
    metrics = run_training(cfg)
    assert metrics["val/images"] == summary.val_images == 21
    assert metrics["val_ema/images"] == 21  # EMA weights evaluated on the same exact split
    assert metrics["train/images"] == summary.train_images
    assert metrics["train/crop_size"] == 16  # epoch 0 of a 16 → 32 ramp

    # evaluate rebuilds the BlurPool architecture the checkpoint was trained with
    from imagenet_ray.evaluate import EvalRequest, run_evaluation

    evaluated = run_evaluation(
        EvalRequest(
            data_url=str(prepared[0]),
            checkpoint=metrics["checkpoint_path"],
            resize=40,
            crop=32,
            hflip=True,
            batch_size=8,
            num_workers=1,
        )
    )
    assert evaluated["eval/images"] == 21


def test_evaluate_reproduces_the_training_val_numbers(trained, prepared, tmp_path):
    """evaluate (checkpoint URL, runs:/ reference, plain weights file) = the last epoch's val metrics."""
    import torch

    from imagenet_ray.evaluate import EvalRequest, resolve_checkpoint_url, run_evaluation

    metrics, db, _ = trained
    root, _ = prepared
    uri = f"sqlite:///{db}"
    common = dict(data_url=str(root), resize=40, crop=32, batch_size=5, num_workers=2, tracking_uri=uri)
    by_ref = run_evaluation(EvalRequest(checkpoint=f"runs:/{metrics['mlflow_run_id']}", **common))
    assert by_ref["eval/images"] == 21
    assert by_ref["eval/top1"] == metrics["val/top1"] and by_ref["eval/top5"] == metrics["val/top5"]
    # The evaluation is a child of the training run, in its experiment, with the val set as its input.
    eval_run = MlflowClient(uri).get_run(by_ref["mlflow_run_id"])
    train_run = MlflowClient(uri).get_run(metrics["mlflow_run_id"])
    assert eval_run.data.tags["mlflow.parentRunId"] == train_run.info.run_id
    assert eval_run.info.experiment_id == train_run.info.experiment_id
    assert [d.dataset.name for d in eval_run.inputs.dataset_inputs] == [f"{root}#val"]

    weights = tmp_path / "resnet18-3cls.pth"
    torch.save(read_checkpoint_dir(metrics["checkpoint_path"])["model"], weights)
    by_file = run_evaluation(EvalRequest(weights=str(weights), model="resnet18", **{**common, "num_workers": 1}))
    assert by_file["eval/top1"] == metrics["val/top1"]
    client = MlflowClient(uri)
    assert client.get_run(by_file["mlflow_run_id"]).data.metrics["eval/top1"] == metrics["val/top1"]

    # models:/ — a registered model version whose source is the checkpoint
    client.create_registered_model("smoke-resnet18")
    version = client.create_model_version(
        "smoke-resnet18", source=metrics["checkpoint_path"], run_id=metrics["mlflow_run_id"]
    ).version
    # it names the same checkpoint that runs:/ evaluated above (the evaluation itself is the same code)
    assert resolve_checkpoint_url(f"models:/smoke-resnet18/{version}", uri) == metrics["checkpoint_path"]
