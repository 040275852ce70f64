"""`imagenet-ray evaluate`: Top-1/Top-5 (+ per-class, + ImageNet-ReaL) of a checkpoint (URL, `runs:/<id>`,
`models:/<name>@<alias>`, `models:/<name>/<version>`) or a torchvision weights file on a prepared val set,
as a Ray Train job with training's evaluation engine, logged to MLflow (as a child of the training run).
Every val image is counted exactly once across workers (same split and all-reduce as training).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import ray.train
import ray.train.torch
import torch
import yaml
from ray.train.torch import TorchTrainer

from imagenet_ray import storage
from imagenet_ray.config import EvalSection, classification_model_names
from imagenet_ray.data.format import PreparedDataset, check_shard_sizes, open_prepared
from imagenet_ray.data.pipeline import build_val_dataset, exact_val_data_config, plain_progress_logs
from imagenet_ray.errors import ConfigError, UserError, describe_error
from imagenet_ray.lifecycle import checkpoint_url_for
from imagenet_ray.runtime import absolute_url, cluster_has_gpu, configure_worker_logging, ensure_ray
from imagenet_ray.tracking import RunSink, training_run_experiment, val_dataset
from imagenet_ray.train.checkpoint import CHECKPOINT_TAG, read_checkpoint_url
from imagenet_ray.train.device import DEVICE_DEFAULT
from imagenet_ray.train.evaluation import PerClassCounts, evaluate, val_batches
from imagenet_ray.train.metrics import all_reduce_sum
from imagenet_ray.train.models import build_model
from imagenet_ray.train.process_group import BoundStoreTorchConfig
from imagenet_ray.train.report import report_with_marker

PREFETCH_BATCHES = 2
EVALUATED_RUN_TAG = "imagenet_ray.evaluated_run"  # on an evaluation run: the training run it evaluated
FALLBACK_RESIZE, FALLBACK_CROP = 256, 224  # the torchvision preset, when no checkpoint config says otherwise
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalRequest:
    data_url: str
    resize: int | None = None  # None = the checkpoint config's eval preset (256/224 without one)
    crop: int | None = None
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


@dataclass(frozen=True)
class EvalWorkerPlan:
    """What every evaluation worker reads (pickled inside Ray Train's `train_loop_config`)."""

    model: str
    state: dict[str, Any]
    blurpool: bool
    num_classes: int
    num_val: int
    hflip: bool
    batch_size: int
    real: list[list[int]] | None  # ImageNet-ReaL label table, or None


def resolve_checkpoint_url(ref: str, tracking_uri: str | None) -> str:
    """runs:/ and models:/ references → the checkpoint directory URL they point at: `runs:/ID` (the
    run's latest checkpoint), `runs:/ID/best|final` (its logged models), `models:/NAME@ALIAS`,
    `models:/NAME/VERSION`, `models:/m-<id>`."""
    if not ref.startswith(("runs:/", "models:/")):
        return ref
    if not tracking_uri:
        raise UserError(f"{ref}: an MLflow reference needs --mlflow-uri (or MLFLOW_TRACKING_URI)")
    run_path = ref[len("runs:/") :].strip("/") if ref.startswith("runs:/") else ""
    if ref.startswith("models:/") or "/" in run_path:
        return checkpoint_url_for(ref, tracking_uri)
    from mlflow.tracking import MlflowClient

    try:
        url = MlflowClient(tracking_uri).get_run(run_path).data.tags.get(CHECKPOINT_TAG)
    except Exception as exc:
        raise UserError(f"{ref}: {describe_error(exc, 200)}") from None
    if not url:
        raise UserError(f"{ref}: the run has no {CHECKPOINT_TAG} tag (not a finished imagenet-ray training run)")
    return str(url)


class Weights(NamedTuple):
    model: str
    state: dict[str, Any]
    num_classes: int | None  # from the checkpoint; None for a bare weights file
    blurpool: bool
    training_run_id: str | None = None  # the MLflow run that wrote the checkpoint
    config_yaml: str | None = None  # the training run's resolved config; None for a bare weights file


def load_weights(req: EvalRequest) -> Weights:
    """The model name, state dict, class count and BlurPool flag (and training run) for the request."""
    if req.weights:
        if not req.model:
            raise UserError("--weights needs --model (the torchvision architecture name)")
        data = storage.read_bytes(storage.resolve(req.weights))
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"{req.weights}: not a PyTorch state dict ({exc})") from None
        return Weights(req.model, state, None, False)
    if not req.checkpoint:
        raise UserError(
            "give --checkpoint URL|runs:/ID|models:/NAME@ALIAS|models:/NAME/VERSION or --weights FILE --model NAME"
        )
    state = read_checkpoint_url(resolve_checkpoint_url(req.checkpoint, req.tracking_uri))
    config_yaml = state.get("config_yaml")
    loaded = yaml.safe_load(config_yaml) if config_yaml else None
    model_cfg = loaded.get("model") if isinstance(loaded, dict) else None
    model_cfg = model_cfg if isinstance(model_cfg, dict) else {}
    model_state = state["model"]
    fc = [v for k, v in model_state.items() if k.endswith(("fc.weight", "classifier.weight", "head.weight"))]
    # A BlurPool model has other module names: rebuild the architecture the checkpoint was trained with.
    blurpool = bool(model_cfg.get("blurpool", False))
    model_name = req.model or model_cfg.get("name")
    if not model_name:
        raise UserError(f"{req.checkpoint}: the checkpoint's config names no model; give --model")
    return Weights(
        str(model_name),
        model_state,
        int(fc[-1].shape[0]) if fc else None,
        blurpool,
        state.get("mlflow_run_id") or None,
        config_yaml or None,
    )


def checkpoint_eval_preset(config_yaml: str | None) -> tuple[int, int] | None:
    """(resize, crop) a checkpoint's config validated with: its `eval:` section (or, in configs from before
    that section, `data.val_resize`/`data.val_crop`); a key left out is the EvalSection default the run
    resolved it to. None when there is no config or it has no eval preset."""
    if not config_yaml:
        return None
    try:
        cfg = yaml.safe_load(config_yaml)
    except yaml.YAMLError:
        return None
    if not isinstance(cfg, dict):
        return None
    default_resize, default_crop = EvalSection.model_fields["resize"].default, EvalSection.model_fields["crop"].default
    for section, resize_key, crop_key in (("eval", "resize", "crop"), ("data", "val_resize", "val_crop")):
        values = cfg.get(section)
        if isinstance(values, dict) and (resize_key in values or crop_key in values):
            resize, crop = values.get(resize_key, default_resize), values.get(crop_key, default_crop)
            if all(isinstance(v, int) and not isinstance(v, bool) for v in (resize, crop)):
                return resize, crop
    return None


def eval_preset(checkpoint_config_yaml: str | None, resize: int | None, crop: int | None) -> tuple[int, int, str]:
    """(resize, crop, where they came from): an explicit --resize/--crop wins, else the checkpoint config's
    eval preset, else (a weights file, a checkpoint without a config) the 256/224 torchvision preset."""
    from_ckpt = checkpoint_eval_preset(checkpoint_config_yaml)
    fallback = from_ckpt or (FALLBACK_RESIZE, FALLBACK_CROP)
    origin = "the checkpoint's config" if from_ckpt else "the 256/224 default: no checkpoint config with an eval preset"
    r = resize if resize is not None else fallback[0]
    c = crop if crop is not None else fallback[1]
    if resize is not None and crop is not None:
        source = "from --resize/--crop"
    elif resize is None and crop is None:
        source = f"from {origin}"
    elif resize is not None:
        source = f"resize from --resize, crop from {origin}"
    else:
        source = f"crop from --crop, resize from {origin}"
    if c > r:
        raise ConfigError(f"evaluate: crop {c} must not exceed resize {r} ({source})")
    return r, c, source


def check_weights_fit(model_name: str, state: dict[str, Any], num_classes: int, blurpool: bool = False) -> None:
    """The weights load into `model_name` with `num_classes` outputs, or a UserError says why."""
    if model_name not in classification_model_names():
        raise UserError(f"--model {model_name!r} is not a torchvision classification model")
    try:
        build_model(model_name, num_classes, blurpool=blurpool).load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as exc:
        raise UserError(
            f"the weights do not fit {model_name} with {num_classes} classes ({describe_error(exc, 200)})"
        ) from None


def real_label_table(url: str) -> list[list[int]]:
    """ImageNet-ReaL: list index i = ILSVRC2012_val_{i+1:08d}, values = sorted-wnid class indices."""
    try:
        table = json.loads(storage.read_bytes(storage.resolve(url)))
    except json.JSONDecodeError as exc:
        raise UserError(f"{url}: not JSON ({exc})") from None
    if not isinstance(table, list) or not all(isinstance(x, list) for x in table):
        raise UserError(f"{url}: expected a list of label lists (ImageNet-ReaL real.json format)")
    return table


def real_counts(predictions: list[int], val_indices: list[int], table: list[list[int]]) -> tuple[int, int]:
    """(top-1 hits, images counted) under ImageNet-ReaL: a prediction is right when it is one of the
    image's ReaL labels; images with no ReaL label (or not a val image) are not counted."""
    correct = counted = 0
    for idx, pred in zip(val_indices, predictions, strict=False):
        if 0 <= idx < len(table) and table[idx]:
            counted += 1
            correct += int(pred in table[idx])
    return correct, counted


class RealCounts:
    """Evaluation hook: ReaL [top-1 hits, images with labels] from each batch's `val_index` column."""

    def __init__(self, table: list[list[int]], device: torch.device) -> None:
        self.table = table
        self.hits = torch.zeros(2, dtype=torch.float64, device=device)

    def add(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        correct, counted = real_counts(logits.argmax(1).tolist(), batch["val_index"].tolist(), self.table)
        self.hits += torch.tensor([correct, counted], dtype=torch.float64, device=self.hits.device)


def eval_loop_per_worker(config: dict[str, EvalWorkerPlan]) -> None:
    """Ray Train entrypoint: evaluate this worker's share of val, all-reduce, report once."""
    configure_worker_logging()
    plan = config["plan"]
    device = ray.train.torch.get_device()
    model = build_model(plan.model, plan.num_classes, blurpool=plan.blurpool)
    model.load_state_dict(plan.state)
    model = model.to(device).to(memory_format=torch.channels_last)
    per_class = PerClassCounts(plan.num_classes, device)
    real = RealCounts(plan.real, device) if plan.real is not None else None
    batches = val_batches(ray.train.get_dataset_shard("val"), plan.batch_size, PREFETCH_BATCHES, device)
    reduced = evaluate(
        model, batches, device, DEVICE_DEFAULT, plan.hflip, hooks=[per_class] if real is None else [per_class, real]
    ).reduced(device)
    counts = per_class.reduced()
    real_hits = all_reduce_sum(real.hits).tolist() if real is not None else None
    if reduced.samples != plan.num_val:
        raise RuntimeError(f"evaluation counted {reduced.samples} images, the manifest lists {plan.num_val}")
    metrics: dict[str, Any] = dict(reduced.as_metrics("eval"))
    if real_hits is not None:
        metrics["eval/real_top1"] = real_hits[0] / max(1.0, real_hits[1])
        metrics["eval/real_images"] = real_hits[1]
    metrics["per_class_top1"] = json.dumps((counts[0] / counts[1].clamp(min=1)).tolist())
    report_with_marker(metrics)  # Ray Train (V2) returns the metrics of the last *checkpointed* report


def run_evaluation(req: EvalRequest) -> dict[str, Any]:
    data = open_prepared(absolute_url(req.data_url))
    check_shard_sizes(data, splits=["val"])  # a missing or truncated shard: one line, before any worker
    weights = load_weights(req)
    resize, crop, preset_source = eval_preset(weights.config_yaml, req.resize, req.crop)
    log.info("eval preset: resize %d, crop %d (%s)", resize, crop, preset_source)
    req = dataclasses.replace(req, resize=resize, crop=crop)  # what the val set is decoded with, and logged
    model_name, state, ckpt_classes, blurpool = weights.model, weights.state, weights.num_classes, weights.blurpool
    num_classes = data.num_classes
    if ckpt_classes is not None and ckpt_classes != num_classes:
        raise UserError(f"the model has {ckpt_classes} outputs but {req.data_url} has {num_classes} classes")
    check_weights_fit(model_name, state, num_classes, blurpool)  # fail here, in one line, not inside a worker
    real = real_label_table(req.real_labels_url) if req.real_labels_url else None
    if real is not None and num_classes != 1000:
        raise UserError(f"ReaL labels index the 1,000 ImageNet classes; {req.data_url} has {num_classes}")
    ensure_ray(req.num_workers, job="jobs/evaluate.py")
    plain_progress_logs()
    use_gpu = req.use_gpu if req.use_gpu is not None else cluster_has_gpu()
    plan = EvalWorkerPlan(
        model=model_name,
        state=state,
        blurpool=blurpool,
        num_classes=num_classes,
        num_val=data.num_images("val"),
        hflip=req.hflip,
        batch_size=req.batch_size,
        real=real,
    )
    trainer = TorchTrainer(
        eval_loop_per_worker,
        train_loop_config={"plan": plan},
        torch_config=BoundStoreTorchConfig(),  # the rendezvous store on the node's address only
        scaling_config=ray.train.ScalingConfig(num_workers=req.num_workers, use_gpu=use_gpu),
        datasets={"val": build_val_dataset(data, resize, crop, decode_on="cpu", with_val_index=True)},
        dataset_config=exact_val_data_config(equal_split=()),
        run_config=ray.train.RunConfig(  # type: ignore[call-arg]  # Train V2's (the stubs name V1's)
            name=f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
            storage_path=req.storage_path or tempfile.mkdtemp(prefix="imagenet-ray-eval-"),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # as training: no report dumps
        ),
    )
    metrics = dict(trainer.fit().metrics or {})
    if req.tracking_uri:
        metrics["mlflow_run_id"] = _log(req.tracking_uri, req, model_name, metrics, data, weights.training_run_id)
    metrics["eval_preset"] = {"resize": resize, "crop": crop, "source": preset_source}  # after _log: not a metric
    return metrics


def _log(
    tracking_uri: str,
    req: EvalRequest,
    model_name: str,
    metrics: dict[str, Any],
    data: PreparedDataset,
    training_run_id: str | None = None,
) -> str:
    """One MLflow run per evaluation: the request as params, the metrics, the per-class artifact, the val
    set as its input. The evaluation of a checkpoint whose training run is in this store is that run's
    child, in its experiment (the UI nests it under the run and compares them side by side)."""
    params = {
        "checkpoint": req.checkpoint or "",
        "weights": req.weights or "",
        "model": model_name,
        "data": req.data_url,
        "resize": req.resize,
        "crop": req.crop,
        "hflip": req.hflip,
        "real_labels": req.real_labels_url or "",
    }
    parent = training_run_experiment(tracking_uri, training_run_id)
    if parent is not None:
        sink = RunSink.create_in_experiment(
            tracking_uri,
            parent,
            f"evaluate {model_name}",
            params=params,
            tags={"mlflow.parentRunId": str(training_run_id), EVALUATED_RUN_TAG: str(training_run_id)},
        )
    else:
        sink = RunSink.create(tracking_uri, req.experiment, f"evaluate {model_name}", params=params)
    name, digest, profile = val_dataset(data.url, data.manifest)
    sink.log_dataset_input(name, digest, "eval", profile)  # the val set training logged
    sink.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=0)
    sink.log_dict({"classes": data.class_wnids, "top1": json.loads(metrics["per_class_top1"])}, "per_class_top1.json")
    sink.finish()
    return sink.run_id
