"""Driver side of training: resolve the run plan, build the TorchTrainer, run it, summarise.

Everything that can fail because of user input (the dataset URL, the manifest, the MLflow store) is
checked here, before a single worker starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from imagenet_ray import storage
from imagenet_ray.config import ExperimentConfig, flatten, to_yaml
from imagenet_ray.data.decode import CROP_DECODER_TAG, crop_decoder_description
from imagenet_ray.data.pipeline import build_train_dataset, build_val_dataset, exact_val_data_config, open_source
from imagenet_ray.errors import UserError
from imagenet_ray.tracking import ensure_experiment, find_or_start_run, resolve_tracking_uri, set_tag
from imagenet_ray.train.optim import scale_for_world


@dataclass(frozen=True)
class RunPlan:
    """Values derived from the config and the dataset; the config itself stays as written."""

    data_url: str
    storage_url: str
    tracking_uri: str
    experiment_id: str
    num_classes: int
    num_train: int
    num_val: int
    global_batch: int
    peak_lr: float
    steps_per_epoch: int
    use_gpu: bool

    classes: tuple[str, ...] = ()
    mlflow_run_id: str = ""

    def for_workers(self, cfg: ExperimentConfig) -> dict[str, Any]:
        return {**self.__dict__, "classes": list(self.classes), "params": flatten(cfg), "config_yaml": to_yaml(cfg)}


def absolute_url(url: str) -> str:
    """Local paths become absolute (a Ray job's cwd is a temporary copy of the working dir)."""
    return url if "://" in url else os.path.abspath(url)


def plan_run(cfg: ExperimentConfig, prepared, use_gpu: bool) -> RunPlan:
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    num_train, num_val = prepared.num_images("train"), prepared.num_images("val")
    workers = cfg.train.max_workers
    if num_train < workers:
        raise UserError(f"{prepared.url}: {num_train} train images cannot feed {workers} workers")
    scale = scale_for_world(num_train, workers, cfg.data.batch_size, cfg.optim.grad_accum_steps, cfg.optim.lr)
    return RunPlan(
        data_url=prepared.url, storage_url=absolute_url(cfg.train.storage_path), tracking_uri=tracking_uri,
        experiment_id=ensure_experiment(tracking_uri, cfg.mlflow.experiment),
        num_classes=prepared.num_classes, num_train=num_train, num_val=num_val, global_batch=scale.global_batch,
        peak_lr=scale.peak_lr, steps_per_epoch=scale.steps_per_epoch, use_gpu=use_gpu,
        classes=tuple(prepared.class_wnids),
    )


def checkpoint_url(storage_loc: storage.Location, path: str) -> str:
    """The URL of a checkpoint directory Ray reported as a path inside `storage_loc`'s filesystem."""
    if storage.is_remote(storage_loc.url):
        scheme = storage_loc.url.split("://", 1)[0]
        return f"{scheme}://{path.lstrip('/')}"
    return path


def ensure_ray(min_cpus: float) -> None:
    """Connect to the cluster this runs in (a Ray job or RAY_ADDRESS), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "")
    if address.startswith(("http://", "https://")):
        raise UserError(f"RAY_ADDRESS={address} is a job-API URL: submit with `ray job submit --address {address} "
                        "--working-dir . -- python jobs/train.py ...`, or unset RAY_ADDRESS to run on a local Ray")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Training workers reserve their CPUs; Ray Data needs at least one more for decoding.
        # A local Ray is private to this process tree: bind it to loopback.
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(min_cpus) + 1), include_dashboard=False,
                 log_to_driver=True, _node_ip_address="127.0.0.1")


def decide_use_gpu(cfg: ExperimentConfig) -> bool:
    import ray

    if cfg.train.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return bool(cfg.train.use_gpu)


def run_training(cfg: ExperimentConfig) -> dict[str, Any]:
    """Train per `cfg`; returns the final reported metrics (including `mlflow_run_id`)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from imagenet_ray.train.loop import train_loop_per_worker

    data_url = absolute_url(cfg.data.url)
    prepared = open_source(data_url, cfg.data.source)  # fails early, naming the URL, if the data is missing
    ensure_ray(cfg.train.max_workers * cfg.train.cpus_per_worker)
    plan = plan_run(cfg, prepared, decide_use_gpu(cfg))
    run_id, resumed = find_or_start_run(plan.tracking_uri, plan.experiment_id, cfg.name, plan.storage_url,
                                        flatten(cfg), to_yaml(cfg))
    plan = dataclasses.replace(plan, mlflow_run_id=run_id)
    print(f"{'resuming' if resumed else 'started'} MLflow run {run_id} ({cfg.mlflow.experiment}/{cfg.name})")
    # Which CPU train decoder this environment has (the job's workers import the same): without the
    # compiled crop decoder the pipeline still works, decoding whole images, only slower.
    set_tag(plan.tracking_uri, run_id, CROP_DECODER_TAG, crop_decoder_description())
    storage_loc = storage.resolve(plan.storage_url)
    if not storage.is_remote(storage_loc.url):
        storage.ensure_dir(storage_loc)

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(), "plan": plan.for_workers(cfg)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=plan.use_gpu,  # an int, or (min, max): elastic
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if plan.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage_loc.path,
            storage_filesystem=storage_loc.fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.checkpoints_to_keep,
                checkpoint_score_attribute="val/top1", checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        ),
        datasets={
            "train": build_train_dataset(prepared, cfg.data.train_crop, cfg.seed, cfg.data.decode_on,
                                         cfg.data.deterministic),
            "val": build_val_dataset(prepared, cfg.data.val_resize, cfg.data.val_crop, cfg.data.decode_on),
        },
        dataset_config=exact_val_data_config(preserve_order=cfg.data.deterministic,
                                             node_labels=cfg.data.node_labels),
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    metrics["checkpoint_path"] = result.checkpoint.path if result.checkpoint else None
    if result.checkpoint is not None:
        # `evaluate --checkpoint runs:/<id>` finds the weights through this tag.
        from imagenet_ray.evaluate import CHECKPOINT_TAG

        set_tag(plan.tracking_uri, run_id, CHECKPOINT_TAG, checkpoint_url(storage_loc, result.checkpoint.path))
    metrics["tracking_uri"] = plan.tracking_uri
    return metrics
