"""What the driver hands every training worker: the config and the values derived from the dataset
and the MLflow run, typed and frozen (it travels pickled inside Ray Train's `train_loop_config`)."""

from __future__ import annotations

from dataclasses import dataclass

from imagenet_ray.config import ExperimentConfig, to_yaml


@dataclass(frozen=True)
class WorkerPlan:
    config: ExperimentConfig
    num_classes: int
    classes: tuple[str, ...]  # class wnids in label order (the per-class artifact names them)
    num_train: int  # batch, LR and steps per epoch follow it and the actual world size
    num_val: int  # validation must count exactly this many images
    tracking_uri: str
    mlflow_run_id: str  # the run the driver created or found; rank 0 is its only writer during training
    fatal_error_url: str = ""  # where a worker records an error no retry can heal (fatal.py)
    audit_samples_dir: str = ""  # sample_audit.py: where each rank lists the training samples it trained on

    @property
    def config_yaml(self) -> str:
        """The config as written into each checkpoint."""
        return to_yaml(self.config)

    def to_loop_config(self) -> dict[str, WorkerPlan]:
        """Ray Train's `train_loop_config` for `train_loop_per_worker`."""
        return {"plan": self}

    @staticmethod
    def from_loop_config(loop_config: dict[str, WorkerPlan]) -> WorkerPlan:
        return loop_config["plan"]
