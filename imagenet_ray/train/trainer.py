"""Driver side of training: check the inputs, plan the run, build the TorchTrainer, run it, summarise.

Everything that can fail because of user input (the dataset URL, the manifest, the MLflow store) is
checked here, before a single worker starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import ray.train
from ray.train.torch import TorchTrainer

from imagenet_ray import storage
from imagenet_ray.config import ExperimentConfig, flatten, to_yaml
from imagenet_ray.data.decode import CROP_DECODER_TAG, crop_decoder_description
from imagenet_ray.data.pipeline import (
    build_train_dataset,
    build_val_dataset,
    exact_val_data_config,
    open_source,
    pin_reads_to,
    plain_progress_logs,
)
from imagenet_ray.errors import UserError
from imagenet_ray.runtime import absolute_url, cluster_has_gpu, ensure_ray
from imagenet_ray.tracking import (
    RunSink,
    find_prepare_run,
    manifest_digest,
    manifest_profile,
    resolve_tracking_uri,
    val_dataset,
    when_reachable,
)
from imagenet_ray.train.checkpoint import CHECKPOINT_TAG
from imagenet_ray.train.fatal import clear_fatal, fatal_url, read_fatal
from imagenet_ray.train.model_logging import choose_checkpoints, log_models
from imagenet_ray.train.plan import WorkerPlan
from imagenet_ray.train.process_group import BoundStoreTorchConfig
from imagenet_ray.train.provenance import reproducibility_tags
from imagenet_ray.train.resubmission import CHANGES_TAG, check_resubmission, record
from imagenet_ray.train.runner import train_loop_per_worker
from imagenet_ray.train.sample_audit import audit_dir_from_env
from imagenet_ray.train.system_metrics import system_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    """What the driver derives from the config and the dataset; the config itself stays as written."""

    data_url: str
    storage_url: str
    tracking_uri: str
    num_classes: int
    num_train: int
    num_val: int
    use_gpu: bool
    classes: tuple[str, ...] = ()

    def for_workers(self, cfg: ExperimentConfig, mlflow_run_id: str) -> WorkerPlan:
        return WorkerPlan(
            config=cfg,
            num_classes=self.num_classes,
            classes=self.classes,
            num_train=self.num_train,
            num_val=self.num_val,
            tracking_uri=self.tracking_uri,
            mlflow_run_id=mlflow_run_id,
            fatal_error_url=fatal_url(self.storage_url, cfg.name),
            audit_samples_dir=audit_dir_from_env(),
        )


def plan_run(cfg: ExperimentConfig, prepared: Any, use_gpu: bool) -> RunPlan:
    num_train, num_val = prepared.num_images("train"), prepared.num_images("val")
    workers = cfg.train.max_workers
    if num_train < workers:
        raise UserError(f"{prepared.url}: {num_train} train images cannot feed {workers} workers")
    return RunPlan(
        data_url=prepared.url,
        storage_url=absolute_url(cfg.train.storage_path),
        tracking_uri=resolve_tracking_uri(cfg.mlflow.tracking_uri),
        num_classes=prepared.num_classes,
        num_train=num_train,
        num_val=num_val,
        use_gpu=use_gpu,
        classes=tuple(prepared.class_wnids),
    )


def checkpoint_url(storage_loc: storage.Location, path: str) -> str:
    """The URL of a checkpoint directory Ray reported as a path inside `storage_loc`'s filesystem."""
    if storage.is_remote(storage_loc.url):
        scheme = storage_loc.url.split("://", 1)[0]
        return f"{scheme}://{path.lstrip('/')}"
    return path


def decide_use_gpu(cfg: ExperimentConfig) -> bool:
    if cfg.train.use_gpu == "auto":
        return cluster_has_gpu()
    return bool(cfg.train.use_gpu)


def finished_run(cfg: ExperimentConfig, sink: RunSink | None = None) -> dict[str, Any] | None:
    """The final metrics of the run this config would resume (`sink`, or the one found) when that run
    already trained every epoch asked for and ended FINISHED (resuming it would train nothing), else None."""
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    if sink is None:
        sink = RunSink.find(tracking_uri, cfg.mlflow.experiment, cfg.name, absolute_url(cfg.train.storage_path))
    if sink is None:
        return None
    status, metrics, tags = sink.read()
    epochs = max(sink.logged_values("epoch"), default=0)
    if status != "FINISHED" or epochs < cfg.train.epochs:
        return None
    return {
        **metrics,
        "epoch": epochs,
        "mlflow_run_id": sink.run_id,
        "tracking_uri": tracking_uri,
        "checkpoint_url": tags.get(CHECKPOINT_TAG),
    }


def checked_storage(storage_url: str) -> storage.Location:
    """The checkpoint storage, checked before Ray starts or an MLflow run is created: a local directory
    is created, a bucket must exist (one request), so a bad storage URL leaves no RUNNING run behind."""
    loc = storage.resolve(storage_url)
    if not storage.is_remote(loc.url):
        storage.ensure_dir(loc)
        return loc
    scheme, rest = loc.url.split("://", 1)
    bucket = storage.resolve(f"{scheme}://{rest.split('/', 1)[0]}")
    if not storage.exists(bucket):
        raise UserError(f"train.storage_path: {bucket.url} does not exist (create the bucket first)")
    return loc


PREPARE_RUN_TAG = "imagenet_ray.prepare_run"  # on a training run: the prepare run that wrote its dataset


def log_lineage(sink: RunSink, prepared: Any) -> None:
    """The prepared dataset as the run's input (train and val), the same name, digest and counts the
    prepare run logged, and a tag naming that run when this store has it."""
    manifest = getattr(prepared, "manifest", None)
    if manifest is None:  # a raw layout read directly: no manifest, no digest to share
        return
    sink.log_dataset_input(prepared.url, manifest_digest(manifest), "train", manifest_profile(manifest))
    # MLflow keeps one context per dataset in a run: the val split is its own dataset (evaluate logs it too).
    name, digest, profile = val_dataset(prepared.url, manifest)
    sink.log_dataset_input(name, digest, "val", profile)
    prepare_run = find_prepare_run(sink.tracking_uri, prepared.url)
    if prepare_run is not None:
        sink.set_tags({PREPARE_RUN_TAG: prepare_run})


def run_training(cfg: ExperimentConfig) -> dict[str, Any]:
    """Train per `cfg`; returns the final reported metrics (including `mlflow_run_id`)."""
    # Everything a user can get wrong is checked before Ray starts and before an MLflow run exists.
    storage_url = absolute_url(cfg.train.storage_path)
    storage_loc = checked_storage(storage_url)
    found = RunSink.find(resolve_tracking_uri(cfg.mlflow.tracking_uri), cfg.mlflow.experiment, cfg.name, storage_url)
    changes = check_resubmission(found.run_id, found.params(), flatten(cfg)) if found is not None else []
    done = finished_run(cfg, found) if found is not None else None
    if done is not None:
        log.info(
            f"run {cfg.name!r} already trained its {done['epoch']} epochs (MLflow run {done['mlflow_run_id']}, "
            f"FINISHED): nothing to train. Start another with a new name=..., or continue this one with "
            f"train.epochs=N (N > {done['epoch']})"
        )
        return done
    data_url = absolute_url(cfg.data.url)
    # Fails early, naming the URL, if the data is missing; s3:// shards are cached on each node if asked.
    prepared = open_source(data_url, cfg.data.source, cfg.data.shard_cache_dir, cfg.data.shard_cache_max_gb)
    ensure_ray(cfg.train.max_workers * cfg.train.cpus_per_worker)
    plan = plan_run(cfg, prepared, decide_use_gpu(cfg))
    # The driver creates (or finds) the run and tags it; during fit() rank 0 is its only writer.
    sink, resumed = RunSink.find_or_create(
        plan.tracking_uri, cfg.mlflow.experiment, cfg.name, plan.storage_url, flatten(cfg), to_yaml(cfg)
    )
    log.info(f"{'resuming' if resumed else 'started'} MLflow run {sink.run_id} ({cfg.mlflow.experiment}/{cfg.name})")
    if resumed and changes:
        log.info(f"MLflow run {sink.run_id} continues with: {', '.join(map(str, changes))}")
        sink.set_tags({CHANGES_TAG: record(sink.read()[2].get(CHANGES_TAG), changes)})
    # Which CPU train decoder this environment has (the job's workers import the same): without the
    # compiled crop decoder the pipeline still works, decoding whole images, only slower.
    sink.set_tags({CROP_DECODER_TAG: crop_decoder_description(), **reproducibility_tags(cfg, plan.use_gpu)})
    if not resumed:
        log_lineage(sink, prepared)

    fatal = fatal_url(plan.storage_url, cfg.name)
    clear_fatal(fatal)  # an earlier attempt's: the data may have been fixed since
    pin_reads_to(cfg.data.node_labels)
    plain_progress_logs()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=plan.for_workers(cfg, sink.run_id).to_loop_config(),
        torch_config=BoundStoreTorchConfig(),  # the rendezvous store on rank 0's node address only
        # Train V2's ScalingConfig at run time; the stubs name V1's, which lacks label_selector.
        scaling_config=ray.train.ScalingConfig(  # type: ignore[call-arg]
            # an int, or (min, max): elastic (Ray's type hints predate the tuple form)
            num_workers=cfg.train.num_workers,  # type: ignore[arg-type]
            use_gpu=plan.use_gpu,
            resources_per_worker={
                "CPU": cfg.train.cpus_per_worker,
                **({"GPU": 1} if plan.use_gpu else {}),
                **cfg.train.worker_resources,
            },
            label_selector=dict(cfg.train.node_labels) or None,
        ),
        run_config=ray.train.RunConfig(  # type: ignore[call-arg]  # Train V2's (the stubs name V1's)
            name=cfg.name,
            storage_path=storage_loc.path,
            storage_filesystem=storage_loc.fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.checkpoints_to_keep,
                checkpoint_score_attribute="val/top1",
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            # Ray Train's INFO lines (a ~700-character dump of every report, per worker per epoch) bury the
            # job's own progress lines; its warnings and errors still show.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets={
            "train": build_train_dataset(
                prepared,
                cfg.data.train_crop,
                cfg.seed,
                cfg.data.decode_on,
                cfg.data.deterministic,
                cfg.data.rrc_scale,
                cfg.data.rrc_ratio,
            ),
            "val": build_val_dataset(prepared, cfg.eval.resize, cfg.eval.crop, cfg.data.decode_on),
        },
        dataset_config=exact_val_data_config(preserve_order=cfg.data.deterministic, node_labels=cfg.data.node_labels),
    )
    with system_metrics(
        sink.run_id, plan.tracking_uri, cfg.mlflow.system_metrics_every_s, enabled=cfg.mlflow.system_metrics
    ):
        try:
            result = trainer.fit()
            reason = read_fatal(fatal)
        except BaseException as exc:
            # A RUNNING run whose job has ended would mislead (a resubmission reopens it).
            when_reachable(lambda: sink.finish("FAILED"), "run status FAILED", wait_s=10)
            reason = read_fatal(fatal) if isinstance(exc, Exception) else None
            if reason is None:
                raise
            raise UserError(f"training stopped without retrying: {reason}") from None
        if reason is not None:  # the workers ended on it (fatal.py); they did not finish the run
            when_reachable(lambda: sink.finish("FAILED"), "run status FAILED", wait_s=10)
            raise UserError(f"training stopped without retrying: {reason}")
    metrics = dict(result.metrics or {})
    metrics["checkpoint_path"] = result.checkpoint.path if result.checkpoint else None  # inside storage's fs
    metrics["checkpoint_url"] = checkpoint_url(storage_loc, result.checkpoint.path) if result.checkpoint else None
    if result.checkpoint is not None:
        # After fit() the driver writes again: `evaluate --checkpoint runs:/<id>` finds the weights by this tag.
        # MLflow may be briefly away as the run ends (its queued metrics waited for it too): retry.
        tags = {CHECKPOINT_TAG: metrics["checkpoint_url"]}
        when_reachable(lambda: sink.set_tags(tags), f"tag {CHECKPOINT_TAG}={metrics['checkpoint_url']}")
    if cfg.mlflow.log_model and result.checkpoint is not None:
        best = [(checkpoint_url(storage_loc, c.path), m) for c, m in (result.best_checkpoints or [])]
        choices = choose_checkpoints((metrics["checkpoint_url"], metrics), best)
        metrics.update(
            log_models(
                sink,
                choices,
                wnids=list(plan.classes),
                data_url=plan.data_url,
                manifest=getattr(prepared, "manifest", None),
                register_name=cfg.mlflow.register_model_name,
            )
        )
    metrics["tracking_uri"] = plan.tracking_uri  # the CLI prints it through its redacting log filter
    return metrics
