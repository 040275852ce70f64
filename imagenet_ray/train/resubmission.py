"""A resubmitted job continues its MLflow run and checkpoint: what of its config may change on the way.

Refused: what makes it another experiment (model, data, recipe, evaluation) and any key not listed as
safe; allowed and recorded on the run: what only changes how or how long it runs (epochs, workers,
resources, logging). docs/reliability.md has the lists' reasons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imagenet_ray.errors import UserError

# The run was found by these: they cannot differ (a changed spelling of one finds another run).
IDENTITY = ("name", "train.storage_path", "mlflow.tracking_uri", "mlflow.experiment")

# How long, where and on what it runs, and what is logged: the same experiment either way.
SAFE_TO_CHANGE = (
    "train.epochs",
    "train.num_workers",
    "train.use_gpu",
    "train.precision",
    "train.cpus_per_worker",
    "train.node_labels",
    "train.worker_resources",
    "train.checkpoints_to_keep",
    "train.checkpoint_every_minutes",
    "train.checkpoint_on_preemption",
    "train.preemption_check_s",
    "train.max_failures",
    "train.stop_after_epochs",
    "train.throttle_images_per_s",
    "data.prefetch_batches",
    "data.local_shuffle_buffer",
    "data.node_labels",
    "data.decode_on",
    "data.deterministic",
    "data.shard_cache_dir",  # where the same bytes are kept between epochs: the rows read are the same
    "data.shard_cache_max_gb",
    "model.compile",
    "model.channels_last",
    "eval.batch_size",
    "eval.per_class",
    "mlflow.log_every_steps",
    "mlflow.progress_every_s",
    "mlflow.system_metrics",
    "mlflow.system_metrics_every_s",
    "mlflow.log_model",
    "mlflow.register_model_name",
)

CHANGES_TAG = "imagenet_ray.config_changes"  # on a training run: the safe changes its resubmissions made


@dataclass(frozen=True)
class ConfigChange:
    key: str
    old: str
    new: str

    def __str__(self) -> str:
        return f"{self.key}: {self.old} -> {self.new}"


def config_changes(old_params: dict[str, str], new_params: dict[str, Any]) -> list[ConfigChange]:
    """The config keys whose value differs between the run's logged params (MLflow keeps them as
    strings) and the resubmitted config's `flatten`; keys the old run did not log are not compared."""
    return [
        ConfigChange(key, old_params[key], str(value))
        for key, value in sorted(new_params.items())
        if key in old_params and key not in IDENTITY and old_params[key] != str(value)
    ]


def check_resubmission(run_id: str, old_params: dict[str, str], new_params: dict[str, Any]) -> list[ConfigChange]:
    """The allowed changes of a resubmission of run `run_id`; a UserError naming the refused ones."""
    changes = config_changes(old_params, new_params)
    refused = [c for c in changes if c.key not in SAFE_TO_CHANGE]
    if refused:
        raise UserError(
            f"MLflow run {run_id} was trained with another config ({'; '.join(map(str, refused))}): "
            "continuing it would mix two experiments; give the new config its own name=..."
        )
    return changes


def record(previous: str | None, changes: list[ConfigChange]) -> str:
    """The CHANGES_TAG value after this resubmission: the earlier ones, then this one's."""
    now = ", ".join(map(str, changes))
    both = now if not previous else f"{previous}; {now}"
    return both if len(both) <= _TAG_CHARS else "... " + both[-(_TAG_CHARS - 4) :]  # MLflow's limit: the latest


_TAG_CHARS = 5000
