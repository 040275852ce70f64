"""A checkpoint's classifier as an MLflow logged model (weights.pt + meta.json + the eval preset as a
models-from-code pyfunc, serving_model.py), linked to its training run with its val metrics; and the
helpers that find those two files in a downloaded model."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from PIL import Image

from imagenet_ray.config import EvalSection
from imagenet_ray.data.classes import imagenet_classes
from imagenet_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from imagenet_ray.errors import UserError, describe_error
from imagenet_ray.tracking import RunSink, resolve_tracking_uri

if TYPE_CHECKING:
    from mlflow.models import ModelSignature

SERVING_MODEL_FILE = Path(__file__).with_name("serving_model.py")
# Kept equal to serving_model's (which may not import this package); tests/unit/test_lifecycle.py checks it.
WEIGHTS_ARTIFACT, META_ARTIFACT = "weights", "meta"
WEIGHTS_FILE, META_FILE = "weights.pt", "meta.json"
IMAGE_COLUMN = "image"
INCLUDE_LOGITS_PARAM = "include_logits"

# Tags on logged models and registered versions.
CHECKPOINT_URL_TAG = "imagenet_ray.checkpoint"  # the checkpoint directory the weights came from
VAL_DIGEST_TAG = "imagenet_ray.val_digest"  # digest of the val set val/top1 was measured on
ARCHITECTURE_TAG = "imagenet_ray.architecture"
MODEL_TYPE = "image-classifier"
# The pyfunc's own dependencies; imagenet_ray is not one of them.
_SERVING_DISTRIBUTIONS = ("torch", "torchvision", "pillow", "numpy", "pandas")


def classifier_meta(
    state: Mapping[str, Any],
    wnids: Sequence[str],
    *,
    val_metrics: Mapping[str, float],
    dataset_digest: str | None,
    checkpoint_url: str | None,
) -> dict[str, Any]:
    """meta.json of a checkpoint state (keys model, config_yaml): architecture, classes, eval preset, provenance."""
    try:
        cfg = yaml.safe_load(state["config_yaml"]) or {}
        model_cfg, eval_cfg = cfg.get("model") or {}, cfg.get("eval") or {}
        architecture = str(model_cfg["name"])
    except (KeyError, TypeError, AttributeError, yaml.YAMLError) as exc:
        raise UserError(f"checkpoint state: no model name in its config_yaml ({describe_error(exc, 120)})") from None
    defaults = EvalSection()
    known = imagenet_classes()
    top1, top5 = val_metrics.get("val/top1"), val_metrics.get("val/top5")
    return {
        "architecture": architecture,
        "num_classes": len(wnids),
        "blurpool": bool(model_cfg.get("blurpool", False)),
        "wnids": list(wnids),
        # a wnid outside ILSVRC2012 (a custom class list) names itself
        "names": [known.names[known.index[w]] if w in known.index else w for w in wnids],
        "resize": int(eval_cfg.get("resize", defaults.resize)),
        "crop": int(eval_cfg.get("crop", defaults.crop)),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "checkpoint_url": checkpoint_url,
        "val_top1": None if top1 is None else float(top1),
        "val_top5": None if top5 is None else float(top5),
        "dataset_digest": dataset_digest,
    }


def classifier_signature() -> ModelSignature:
    """Input: an `image` column of encoded image bytes. Output: top-1 and top-5 index, wnid, name and softmax
    probability; with params include_logits=True also every class's logit (an Array of floats)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    outputs = Schema(
        [
            ColSpec(DataType.long, "top1_index"),
            ColSpec(DataType.string, "top1_wnid"),
            ColSpec(DataType.string, "top1_name"),
            ColSpec(DataType.double, "top1_prob"),
            ColSpec(Array(DataType.long), "top5_index"),
            ColSpec(Array(DataType.string), "top5_wnid"),
            ColSpec(Array(DataType.string), "top5_name"),
            ColSpec(Array(DataType.double), "top5_prob"),
            ColSpec(Array(DataType.double), "logits", required=False),
        ]
    )
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, IMAGE_COLUMN)]),
        outputs=outputs,
        params=ParamSchema([ParamSpec(INCLUDE_LOGITS_PARAM, DataType.boolean, False)]),
    )


def example_image(size: int) -> bytes:
    """A small JPEG (a colour gradient, `size` square) for the model's input example."""
    ramp = torch.linspace(0, 255, size).to(torch.uint8)
    rgb = torch.stack(
        [ramp[None, :].expand(size, size), ramp[:, None].expand(size, size), ramp.flip(0)[None, :].expand(size, size)],
        -1,
    )
    buf = io.BytesIO()
    Image.fromarray(rgb.numpy()).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _pip_requirements() -> list[str]:
    # Versions without local labels (torch's "+cu130"): the serving machine picks its own build.
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in _SERVING_DISTRIBUTIONS]


@contextlib.contextmanager
def mlflow_at(tracking_uri: str) -> Iterator[None]:
    """MLflow calls that read the process-wide tracking URI (fluent log_model, initialize_logged_model; the
    registry resolving a models:/ source) see `tracking_uri` inside this block (MLflow's own helper, which
    restores the previous value; not thread-safe); MLflow errors become one line."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    try:
        with _use_tracking_uri(tracking_uri):
            yield
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"MLflow at {tracking_uri}: {describe_error(exc)}") from None


def log_classifier(
    sink: RunSink,
    state: Mapping[str, Any],
    *,
    name: str,
    wnids: Sequence[str],
    val_metrics: Mapping[str, float],
    dataset_digest: str | None,
    dataset_name: str | None = None,
    checkpoint_url: str | None = None,
) -> str:
    """Log the checkpoint's `model` weights (not the EMA: val/top1 describes these) as logged model `name`
    ("final", "best") of the sink's run; returns its URI, models:/m-<id>.

    Why a models-from-code pyfunc over state_dict + architecture name rather than mlflow.pytorch.log_model or a
    torch.export program: mlflow.pytorch's pyfunc takes tensors, not images; the batch-inference contract needs
    weights.pt + meta.json anyway, and an exported program (1.4 s, 48 MB for a ResNet-18) would store the
    weights twice. The architecture comes from torchvision; BlurPool is re-implemented in serving_model.py.

    The model output is linked to the run at step = the checkpoint's global step (where val metrics are logged), and
    `val_metrics` are logged on the model (with the val set as their dataset when name and digest are given).
    """
    from mlflow.entities import LoggedModelOutput, Metric

    meta = classifier_meta(
        state, wnids, val_metrics=val_metrics, dataset_digest=dataset_digest, checkpoint_url=checkpoint_url
    )
    weights = {k: v.detach().cpu().contiguous() for k, v in state["model"].items()}
    _check_weights_fit(meta, weights)
    uri = resolve_tracking_uri(sink.tracking_uri)
    tags = {ARCHITECTURE_TAG: meta["architecture"]}
    if checkpoint_url:
        tags[CHECKPOINT_URL_TAG] = checkpoint_url
    if dataset_digest:
        tags[VAL_DIGEST_TAG] = dataset_digest
    step = int(state.get("step", 0))  # the global optimizer step: the run's metrics' x-axis
    with tempfile.TemporaryDirectory(prefix="imagenet-ray-model-") as tmp, mlflow_at(uri):
        import mlflow
        import pandas as pd

        weights_file, meta_file = Path(tmp, WEIGHTS_FILE), Path(tmp, META_FILE)
        torch.save(weights, weights_file)
        meta_file.write_text(json.dumps(meta, indent=1))
        client = mlflow.MlflowClient(uri)
        run = client.get_run(sink.run_id)
        # Created first, without run_id: log_model would otherwise copy every run metric at `step` onto the
        # model, step curves (logged per optimizer step) included; the outputs and metrics are linked below.
        model = mlflow.initialize_logged_model(
            name=name,
            source_run_id=sink.run_id,
            tags=tags,
            params=dict(run.data.params),
            model_type=MODEL_TYPE,
            experiment_id=run.info.experiment_id,
        )
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(SERVING_MODEL_FILE),
            artifacts={WEIGHTS_ARTIFACT: str(weights_file), META_ARTIFACT: str(meta_file)},
            model_config={"device": "auto", "batch_size": 64},
            signature=classifier_signature(),
            input_example=pd.DataFrame({IMAGE_COLUMN: [example_image(meta["resize"])]}),
            pip_requirements=_pip_requirements(),
            model_id=model.model_id,
        )
        client.log_outputs(sink.run_id, [LoggedModelOutput(model.model_id, step=step)])
        with_dataset = (
            {"dataset_name": dataset_name, "dataset_digest": dataset_digest} if dataset_name and dataset_digest else {}
        )
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, step, model_id=model.model_id, run_id=sink.run_id, **with_dataset)
            for k, v in val_metrics.items()
        ]
        if metrics:
            client.log_batch(sink.run_id, metrics=metrics)
    return str(info.model_uri)


def _check_weights_fit(meta: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
    """The weights load into the architecture the pyfunc will build (MLflow only warns when its input example
    fails), or a UserError says why."""
    from imagenet_ray.lifecycle import serving_model

    try:
        serving_model.build_classifier(meta, weights)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise UserError(
            f"the weights do not fit {meta['architecture']} with {meta['num_classes']} classes"
            f" ({describe_error(exc, 200)})"
        ) from None


def _artifact_file(model_dir: str | Path, key: str, file_name: str) -> Path:
    """Where the pyfunc's artifact `key` lies in a model directory: its MLmodel says; else the one `file_name`."""
    root = Path(model_dir)
    mlmodel = root / "MLmodel"
    if mlmodel.is_file():
        pyfunc = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
        entry = (pyfunc.get("artifacts") or {}).get(key) or {}
        if entry.get("path") and (root / str(entry["path"])).is_file():
            return root / str(entry["path"])
    found = sorted(root.rglob(file_name))
    if len(found) != 1:
        raise UserError(f"{root}: expected one {file_name} in the model directory, found {len(found)}")
    return found[0]


def meta_path(model_dir: str | Path) -> Path:
    """meta.json of a downloaded model."""
    return _artifact_file(model_dir, META_ARTIFACT, META_FILE)


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    """meta.json of a downloaded model: architecture, num_classes, blurpool, wnids, names, resize, crop, mean,
    std, checkpoint_url, val_top1, val_top5, dataset_digest."""
    path = meta_path(model_dir)
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: expected a JSON object")
    return meta


def weights_path(model_dir: str | Path) -> Path:
    """weights.pt of a downloaded model: a plain state_dict (torch.load(path, weights_only=True))."""
    return _artifact_file(model_dir, WEIGHTS_ARTIFACT, WEIGHTS_FILE)
