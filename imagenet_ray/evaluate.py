"""`imagenet-ray evaluate`: Top-1/Top-5 (+ per-class, + ImageNet-ReaL) of a checkpoint or a
torchvision weights file on a prepared val set, with any eval preset, as a Ray Train job logged to
MLflow. Every val image is counted exactly once across workers (same split and all-reduce as training).

Weights come from:
- a checkpoint directory URL written by `train` (`.../checkpoint_YYYY-...`, holding state.pt),
- `runs:/<run_id>`: the latest checkpoint of that training run (its `imagenet_ray.checkpoint` tag),
- `models:/<name>/<version>`: a registered model version whose source is such a checkpoint URL,
- `--weights FILE --model NAME`: a torchvision state dict (e.g. resnet50-0676ba61.pth, IMAGENET1K_V1).
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from imagenet_ray import storage
from imagenet_ray.errors import UserError

CHECKPOINT_TAG = "imagenet_ray.checkpoint"
_VAL_ID = re.compile(r"ILSVRC2012_val_(\d{8})")


@dataclass(frozen=True)
class EvalRequest:
    data_url: str
    resize: int = 256
    crop: int = 224
    hflip: bool = False
    batch_size: int = 64
    num_workers: int = 1
    use_gpu: bool | None = None  # None = when the cluster has GPUs
    real_labels_url: str | None = None
    checkpoint: str | None = None
    weights: str | None = None
    model: str | None = None
    tracking_uri: str | None = None
    experiment: str = "imagenet-ray-eval"
    storage_path: str | None = None  # result storage for Ray Train (shared URL on a multi-node cluster)


def resolve_checkpoint_url(ref: str, tracking_uri: str | None) -> str:
    """runs:/ and models:/ references → the checkpoint directory URL they point at."""
    if not ref.startswith(("runs:/", "models:/")):
        return ref
    if not tracking_uri:
        raise UserError(f"{ref}: an MLflow reference needs --mlflow-uri (or MLFLOW_TRACKING_URI)")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        if ref.startswith("runs:/"):
            run_id = ref[len("runs:/"):].strip("/").split("/")[0]
            url = client.get_run(run_id).data.tags.get(CHECKPOINT_TAG)
            if not url:
                raise UserError(f"{ref}: the run has no {CHECKPOINT_TAG} tag (not a finished imagenet-ray training run)")
            return url
        name, _, version = ref[len("models:/"):].strip("/").partition("/")
        if not version:
            raise UserError(f"{ref}: expected models:/<name>/<version>")
        return client.get_model_version(name, version).source
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{ref}: {' '.join(str(exc).split())[:200]}") from None


def load_weights(req: EvalRequest) -> tuple[str, dict[str, Any], int | None, bool]:
    """(model name, state dict, num_classes from the checkpoint or None, BlurPool used) for the request."""
    import torch
    import yaml

    if req.weights:
        if not req.model:
            raise UserError("--weights needs --model (the torchvision architecture name)")
        data = storage.read_bytes(storage.resolve(req.weights))
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"{req.weights}: not a PyTorch state dict ({exc})") from None
        return req.model, state, None, False
    if not req.checkpoint:
        raise UserError("give --checkpoint URL|runs:/ID|models:/NAME/VERSION or --weights FILE --model NAME")
    url = resolve_checkpoint_url(req.checkpoint, req.tracking_uri)
    loc = storage.resolve(url).child("state.pt")
    state = torch.load(io.BytesIO(storage.read_bytes(loc)), map_location="cpu", weights_only=False)
    cfg = yaml.safe_load(state["config_yaml"])
    model_state = state["model"]
    fc = [v for k, v in model_state.items() if k.endswith(("fc.weight", "classifier.weight", "head.weight"))]
    # A BlurPool model has other module names: rebuild the architecture the checkpoint was trained with.
    blurpool = bool(cfg["model"].get("blurpool", False))
    return req.model or cfg["model"]["name"], model_state, int(fc[-1].shape[0]) if fc else None, blurpool


def check_weights_fit(model_name: str, state: dict[str, Any], num_classes: int, blurpool: bool = False) -> None:
    """The weights load into `model_name` with `num_classes` outputs, or a UserError says why."""
    from imagenet_ray.config import classification_model_names
    from imagenet_ray.train.models import build_model

    if model_name not in classification_model_names():
        raise UserError(f"--model {model_name!r} is not a torchvision classification model")
    try:
        build_model(model_name, num_classes, blurpool=blurpool).load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as exc:
        first = " ".join(str(exc).split())[:200]
        raise UserError(f"the weights do not fit {model_name} with {num_classes} classes ({first})") from None


def real_label_table(url: str) -> list[list[int]]:
    """ImageNet-ReaL: list index i = ILSVRC2012_val_{i+1:08d}, values = sorted-wnid class indices."""
    try:
        table = json.loads(storage.read_bytes(storage.resolve(url)))
    except json.JSONDecodeError as exc:
        raise UserError(f"{url}: not JSON ({exc})") from None
    if not isinstance(table, list) or not all(isinstance(x, list) for x in table):
        raise UserError(f"{url}: expected a list of label lists (ImageNet-ReaL real.json format)")
    return table


def val_index_of(key: str) -> int:
    """0-based ILSVRC2012 val index from a source key, or -1."""
    match = _VAL_ID.search(key)
    return int(match.group(1)) - 1 if match else -1


def real_counts(predictions: list[int], val_indices: list[int], table: list[list[int]]) -> tuple[int, int]:
    """(top-1 hits, images counted) under ImageNet-ReaL: a prediction is right when it is one of the
    image's ReaL labels; images with no ReaL label (or not a val image) are not counted."""
    correct = counted = 0
    for idx, pred in zip(val_indices, predictions):
        if 0 <= idx < len(table) and table[idx]:
            counted += 1
            correct += int(pred in table[idx])
    return correct, counted


def _eval_with_index(batch, resize: int, crop: int):
    import numpy as np

    from imagenet_ray.data import transforms

    out = transforms.eval_batch(batch, resize, crop)
    out["val_index"] = np.array([val_index_of(str(k)) for k in batch["key"]], dtype=np.int64)
    return out


def eval_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entrypoint: evaluate this worker's share of val, all-reduce, report once."""
    import ray.train
    import ray.train.torch
    import torch

    from imagenet_ray.train.loop import to_model_input
    from imagenet_ray.train.metrics import EvalTotals, all_reduce_sum, topk_correct
    from imagenet_ray.train.models import build_model

    device = ray.train.torch.get_device()
    model = build_model(config["model"], config["num_classes"], blurpool=config["blurpool"])
    model.load_state_dict(config["state"])
    model = model.to(device, memory_format=torch.channels_last).eval()
    num_classes = config["num_classes"]
    real = config["real"]
    totals = EvalTotals()
    per_class = torch.zeros(2, num_classes, dtype=torch.float64, device=device)
    real_hits = torch.zeros(2, dtype=torch.float64, device=device)  # [correct, images with labels]
    shard = ray.train.get_dataset_shard("val")
    with torch.inference_mode():
        for batch in shard.iter_torch_batches(batch_size=config["batch_size"], device=device):
            labels = batch["label"].long()
            x = to_model_input(batch["image"])
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else \
                torch.autocast("cpu", enabled=False)
            with autocast:
                logits = model(x).float()
                if config["hflip"]:
                    logits = (logits + model(x.flip(-1)).float()) / 2
            totals.add(torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item(), labels.shape[0],
                       topk_correct(logits, labels))
            pred = logits.argmax(1)
            per_class[0].index_add_(0, labels, (pred == labels).double())
            per_class[1].index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
            if real is not None:
                correct, counted = real_counts(pred.tolist(), batch["val_index"].tolist(), real)
                real_hits += torch.tensor([correct, counted], dtype=torch.float64, device=device)
    reduced = totals.reduced(device)
    per_class = all_reduce_sum(per_class).cpu()
    real_hits = all_reduce_sum(real_hits).tolist()
    if reduced.samples != config["num_val"]:
        raise RuntimeError(f"evaluation counted {reduced.samples} images, the manifest lists {config['num_val']}")
    metrics = reduced.as_metrics("eval")
    if real is not None:
        metrics["eval/real_top1"] = real_hits[0] / max(1.0, real_hits[1])
        metrics["eval/real_images"] = real_hits[1]
    metrics["per_class_top1"] = json.dumps((per_class[0] / per_class[1].clamp(min=1)).tolist())
    # Ray Train (V2) returns the metrics of the last *checkpointed* report: attach a tiny one.
    report_with_marker(metrics)


def report_with_marker(metrics: dict[str, Any]) -> None:
    import tempfile

    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if ray.train.get_context().get_world_rank() == 0:
            with open(f"{tmp}/metrics.json", "w") as f:
                json.dump(metrics, f)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def run_evaluation(req: EvalRequest) -> dict[str, Any]:
    import ray.train
    from ray.train.torch import TorchTrainer

    from imagenet_ray.data.pipeline import exact_val_data_config, open_prepared
    from imagenet_ray.train.trainer import absolute_url, ensure_ray

    data = open_prepared(absolute_url(req.data_url))
    model_name, state, ckpt_classes, blurpool = load_weights(req)
    num_classes = data.num_classes
    if ckpt_classes is not None and ckpt_classes != num_classes:
        raise UserError(f"the model has {ckpt_classes} outputs but {req.data_url} has {num_classes} classes")
    check_weights_fit(model_name, state, num_classes, blurpool)  # fail here, in one line, not inside a worker
    real = real_label_table(req.real_labels_url) if req.real_labels_url else None
    if real is not None and num_classes != 1000:
        raise UserError(f"ReaL labels index the 1,000 ImageNet classes; {req.data_url} has {num_classes}")
    ensure_ray(req.num_workers)
    import ray

    use_gpu = req.use_gpu if req.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    fs, paths = data.shard_paths("val")
    val = ray.data.read_parquet(paths, filesystem=fs).select_columns(["image", "label", "key"]).map_batches(
        _eval_with_index, fn_kwargs={"resize": req.resize, "crop": req.crop}, batch_size=32, batch_format="numpy")
    trainer = TorchTrainer(
        eval_loop_per_worker,
        train_loop_config={"model": model_name, "state": state, "blurpool": blurpool, "num_classes": num_classes, "real": real,
                           "hflip": req.hflip, "batch_size": req.batch_size, "num_val": data.num_images("val")},
        scaling_config=ray.train.ScalingConfig(num_workers=req.num_workers, use_gpu=use_gpu),
        datasets={"val": val},
        dataset_config=exact_val_data_config(equal_split=()),
        run_config=ray.train.RunConfig(name=f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                                       storage_path=_storage_path(req)),
    )
    metrics = dict(trainer.fit().metrics or {})
    if req.tracking_uri:
        metrics["mlflow_run_id"] = _log(req, model_name, metrics, data)
    return metrics


def _storage_path(req: EvalRequest) -> str:
    """Where the evaluation's (tiny) result checkpoint goes: a shared URL on a cluster, else a temp dir."""
    if req.storage_path:
        return req.storage_path
    import tempfile

    return tempfile.mkdtemp(prefix="imagenet-ray-eval-")


def _log(req: EvalRequest, model_name: str, metrics: dict[str, Any], data) -> str:
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from imagenet_ray.tracking import RunTracker, ensure_experiment, resolve_tracking_uri

    uri = resolve_tracking_uri(req.tracking_uri)
    client = MlflowClient(uri)
    run = client.create_run(ensure_experiment(uri, req.experiment), run_name=f"evaluate {model_name}")
    params = {"checkpoint": req.checkpoint or "", "weights": req.weights or "", "model": model_name,
              "data": req.data_url, "resize": req.resize, "crop": req.crop, "hflip": req.hflip,
              "real_labels": req.real_labels_url or ""}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    tracker = RunTracker(uri, run.info.run_id)
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=0)
    tracker.log_dict({"classes": list(data.manifest["classes"]), "top1": json.loads(metrics["per_class_top1"])},
                     "per_class_top1.json")
    tracker.finish()
    return run.info.run_id
