"""One strict, typed, frozen config tree: YAML files (`extends:` for recipes as deltas) + dotted overrides.

Unknown keys, wrong types and impossible values fail before any work starts, in one line naming the
key (`ConfigError`, exit code 2). Derived values get their own names elsewhere; configs are never run state.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from imagenet_ray.errors import ConfigError, describe_error
from imagenet_ray.redact import redact_text, redact_values

Tree = dict[str, Any]  # a raw config tree as read from YAML, before validation


class _Strict(BaseModel):
    # allow_inf_nan=False: `optim.lr=.inf` (or 1e400) is an impossible value, not a very large one.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before", check_fields=False)
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1: `train.epochs=true` would silently train 1 epoch.
        field = cls.model_fields.get(info.field_name or "")
        annotation = field.annotation if field is not None else None
        kinds = set(get_args(annotation)) if get_origin(annotation) in (Union, UnionType) else {annotation}
        if isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
            raise ValueError("must be a number, not true/false")
        return value


@functools.cache
def classification_model_names() -> frozenset[str]:
    import torchvision.models

    return frozenset(torchvision.models.list_models(module=torchvision.models))


class ProgressiveResize(_Strict):
    """FFCV-style progressive resizing: the train crop grows linearly from start to end size."""

    start_size: int = Field(160, ge=8)
    end_size: int = Field(192, ge=8)
    start_epoch: int = Field(0, ge=0, description="epochs before this train at start_size")
    end_epoch: int = Field(1, ge=1, description="from this epoch on, train at end_size")
    step: int = Field(32, ge=1, description="sizes are rounded to the nearest multiple of this")

    @model_validator(mode="after")
    def _ordered(self) -> ProgressiveResize:
        if self.end_epoch <= self.start_epoch:
            raise ValueError("end_epoch must be after start_epoch")
        return self


class DataSection(_Strict):
    url: str = Field(".demo/prepared", description="prepared dataset (directory holding _manifest.json)")
    source: Literal["prepared", "raw"] = Field("prepared", description="raw = read an ILSVRC layout directly")
    decode_on: Literal["cpu", "gpu"] = Field("cpu", description="gpu = ship JPEG bytes, decode on the worker")
    train_crop: int = Field(64, ge=8, description="RandomResizedCrop output size")
    rrc_scale: tuple[float, float] = Field(
        (0.08, 1.0),
        description="RandomResizedCrop's [min, max] fraction of the image area (timm's --scale); small or "
        "fine-tuning datasets often need a larger min",
    )
    rrc_ratio: tuple[float, float] = Field(
        (3.0 / 4.0, 4.0 / 3.0), description="RandomResizedCrop's [min, max] aspect ratio, width / height (--ratio)"
    )
    progressive: ProgressiveResize | None = Field(None, description="grow the train crop over epochs")
    batch_size: int = Field(32, gt=0, description="images per worker per step")
    local_shuffle_buffer: int = Field(256, ge=0, description="rows in each worker's shuffle buffer (0 = off)")
    prefetch_batches: int = Field(2, ge=0)
    shard_cache_dir: str | None = Field(
        None,
        description="keep a remote (s3://, gs://) prepared dataset's shards in this directory on each node's own "
        "disk after their first read, so later epochs read no object storage; an absolute local path (on KubeRay "
        "an emptyDir or local NVMe mounted there); null = off",
    )
    shard_cache_max_gb: float = Field(
        100.0, gt=0, description="at most this many GiB under data.shard_cache_dir; beyond it shards read through"
    )
    auto_augment: Literal["none", "trivialaugment"] = Field("none", description="TrivialAugmentWide per image")
    random_erasing: float = Field(0.0, ge=0, lt=1, description="probability of erasing a rectangle per image")
    mixup_alpha: float = Field(0.0, ge=0, description="Mixup Beta(α, α); 0 = off")
    cutmix_alpha: float = Field(0.0, ge=0, description="CutMix Beta(α, α); 0 = off")
    node_labels: dict[str, str] = Field(
        default_factory=dict,
        description="run decoding only on Ray nodes with these labels, e.g. {imagenet-ray/node-group: decode}",
    )
    deterministic: bool = Field(
        False,
        description="order-preserving data, augmentation seeded by (seed, epoch) "
        "on the worker: resume is exact at epoch boundaries (needs decode_on=gpu; slower)",
    )

    @field_validator("shard_cache_dir")
    @classmethod
    def _local_directory(cls, value: str | None) -> str | None:
        # Each node writes its own copy: a URL or a shared path is no node-local disk, and a relative path
        # would resolve against each Ray worker's own working directory.
        if value is None:
            return value
        if "://" in value:
            raise ValueError("must be a local directory on each node (a path such as /mnt/shard-cache), not a URL")
        if "\0" in value or not os.path.isabs(value):
            raise ValueError("must be an absolute local path (such as /mnt/shard-cache)")
        return value

    @field_validator("rrc_scale", "rrc_ratio", mode="before")
    @classmethod
    def _no_bool_bounds(cls, value: Any) -> Any:
        # Per element: _no_bool_numbers sees a tuple field, and pydantic's lax mode reads true as 1.0.
        if isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value):
            raise ValueError("must be [min, max] numbers, not true/false")
        return value

    @field_validator("rrc_scale")
    @classmethod
    def _area_fraction(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError("must be [min, max] with 0 < min ≤ max ≤ 1")
        return value

    @field_validator("rrc_ratio")
    @classmethod
    def _aspect_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError("must be [min, max] with 0 < min ≤ max")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DataSection:
        if self.deterministic and self.decode_on != "gpu":
            raise ValueError(
                "deterministic needs decode_on=gpu (augmentation must run on the worker, seeded per epoch)"
            )
        if self.progressive is not None and self.progressive.end_size > self.train_crop:
            raise ValueError(
                f"progressive.end_size ({self.progressive.end_size}) must not exceed train_crop "
                f"({self.train_crop}), the size the CPU pipeline decodes to"
            )
        return self


class ModelSection(_Strict):
    name: str = Field("resnet18", description="any torchvision classification model")
    zero_init_residual: bool = Field(True, description="zero-init the last BN gamma of each residual block")
    blurpool: bool = Field(False, description="anti-aliased downsampling before strided convs (FFCV)")
    channels_last: bool = True
    compile: bool = Field(False, description="torch.compile the model")
    sync_batchnorm: bool = Field(False, description="SyncBatchNorm across workers")

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if name not in classification_model_names():
            raise ValueError(f"unknown model {name!r} (not a torchvision classification model)")
        return name


class OptimSection(_Strict):
    name: Literal["sgd", "lars"] = Field(
        "sgd", description="sgd = torch's SGD; lars = timm's Lars: SGD with a per-layer trust ratio, for large batches"
    )
    lr: float = Field(0.1, gt=0, description="peak learning rate per 256 images (scaled linearly to the global batch)")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-5, ge=0)
    no_decay_norm_and_bias: bool = Field(
        True, description="no weight decay on norm layers and biases (with lars, no trust ratio either, as MLPerf)"
    )
    lars_trust_coeff: float = Field(
        0.001, gt=0, description="lars: the trust coefficient η of ratio = η·‖w‖ / (‖g‖ + wd·‖w‖ + eps)"
    )
    lars_eps: float = Field(1e-8, ge=0, description="lars: eps in the trust ratio's denominator (timm's default)")
    clip_grad_norm: float | None = Field(
        None,
        gt=0,
        description="clip the gradients' global L2 norm to this before each optimizer step (the norm before "
        "clipping is logged as train/grad_norm); None = off",
    )
    warmup_epochs: float = Field(0.0, ge=0)
    warmup_start_factor: float = Field(0.0, ge=0, le=1, description="warmup starts at this fraction of the peak")
    schedule: Literal["cosine", "linear", "step", "constant", "poly"] = Field(
        "cosine", description="after the warmup: cosine or linear to 0, step, constant, or poly to poly_end_lr"
    )
    step_epochs: int = Field(30, gt=0, description="step schedule: multiply by step_gamma every this many epochs")
    step_gamma: float = Field(0.1, gt=0, le=1)
    poly_power: float = Field(
        2.0, gt=0, description="poly schedule: lr = end + (peak - end)·(1 - progress)^power (MLPerf: 2)"
    )
    poly_end_lr: float = Field(
        0.0, ge=0, description="poly schedule: the learning rate at the end (as is, not scaled to the batch)"
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    ema_decay: float = Field(
        0.0, ge=0, lt=1, description="EMA decay per update (every ema_every_steps steps), evaluated alongside; 0 = off"
    )
    ema_every_steps: int = Field(1, ge=1)


class TrainSection(_Strict):
    epochs: int = Field(3, gt=0)
    num_workers: int | tuple[int, int] = Field(1, description="workers, or [min, max] for elastic training")
    use_gpu: bool | Literal["auto"] = Field("auto", description="true, false or auto (GPUs if the cluster has any)")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto = bf16 autocast on GPUs, fp32 on CPU")
    cpus_per_worker: float = Field(1.0, gt=0)
    node_labels: dict[str, str] = Field(
        default_factory=dict,
        description="run training workers only on Ray nodes with these labels, e.g. {imagenet-ray/node-group: train}",
    )
    worker_resources: dict[str, float] = Field(
        default_factory=dict,
        description="extra Ray resources per worker, e.g. {stand_in_gpu: 1} on the local multi-host cluster",
    )
    storage_path: str = Field(".demo/runs", description="checkpoints go to <storage_path>/<name>")
    checkpoints_to_keep: int = Field(2, gt=0, description="best K by val/top1 (the latest is kept too)")
    max_failures: int = Field(0, ge=0, description="worker-group restarts from the latest checkpoint")
    checkpoint_every_minutes: float | None = Field(
        None,
        gt=0,
        description="also checkpoint inside an epoch after this many minutes of training, so a lost node costs "
        "at most that; a resume continues the epoch with the batches not yet trained (exact when deterministic)",
    )
    checkpoint_on_preemption: bool = Field(
        True, description="checkpoint at once when Ray Train reports a preemption notice for a worker's node"
    )
    preemption_check_s: float = Field(
        10.0,
        gt=0,
        description="ask Ray Train for a preemption notice every this many seconds of training (a barrier of "
        "all ranks, ~ms); a notice's checkpoint comes this much plus Ray's 5 s drain poll after the drain",
    )
    stop_after_epochs: int | None = Field(
        None,
        gt=0,
        description="end this job after N epochs in total (a time box); resubmit with the same name to continue",
    )
    throttle_images_per_s: float | None = Field(
        None,
        gt=0,
        description="pace each training step so that a worker consumes at most this many images/s: stands in "
        "for a GPU of that speed on CPU-only test clusters, for capacity checks (imagenet-ray plan)",
    )
    skip_step: bool = Field(
        False,
        description="consume each batch without training on it (Ray's train benchmark's skip_train_step): "
        "measures ingest alone; with throttle_images_per_s, a stand-in for a GPU of that speed",
    )

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError("must be ≥ 1, or [min, max] with 1 ≤ min ≤ max")
        return value

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @field_validator("use_gpu", mode="before")
    @classmethod
    def _gpu_choice(cls, value: Any) -> Any:
        if isinstance(value, bool) or value == "auto":
            return value
        raise ValueError("must be true, false or auto")


class EvalSection(_Strict):
    """Validation during training (and the evaluate job's defaults): the eval preset and what is counted."""

    resize: int = Field(73, ge=8, description="shorter side before the center crop")
    crop: int = Field(64, ge=8, description="center crop size")
    hflip: bool = Field(False, description="average logits over the image and its mirror")
    batch_size: int = Field(64, gt=0, description="images per worker per eval batch")
    per_class: bool = Field(True, description="log per-class top-1 as an artifact after the last epoch")

    @model_validator(mode="after")
    def _crop_fits(self) -> EvalSection:
        if self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) must not exceed resize ({self.resize})")
        return self


class MlflowSection(_Strict):
    tracking_uri: str = Field("sqlite:///.demo/mlflow.db", description="sqlite:///path, http://host:port or a path")
    experiment: str = Field("imagenet-ray", min_length=1)
    # 1,251 steps per ImageNet epoch at a global batch of 1,024: every 5 steps gives ~250 points an epoch.
    log_every_steps: int = Field(5, ge=1, description="rank 0 logs step curves every this many optimizer steps")
    progress_every_s: float = Field(30.0, gt=0, description="a progress line in the job log at most this often")
    system_metrics: bool = Field(
        True, description="CPU/memory/network/disk(/GPU) of every node, and Ray's object store"
    )
    system_metrics_every_s: float = Field(10.0, gt=0, description="system metrics sampling interval")
    log_model: bool = Field(True, description="log the final and the best model (pyfunc with the eval preset)")
    register_model_name: str | None = Field(
        None, min_length=1, description="register the logged model under this name; `champion` moves on improvement"
    )


class ExperimentConfig(_Strict):
    name: str = Field("local", min_length=1, pattern=r"^[A-Za-z0-9._-]+$", description="run name")
    seed: int = 0
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    mlflow: MlflowSection = MlflowSection()


def _shown(text: str) -> str:
    """`text` as it is when printable, else quoted with escapes: a key or path from a file keeps the error one line."""
    return text if text.isprintable() else repr(text)


def _format_validation_error(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown config key {key!r}"
    key = _shown(key)
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{source}: {key}: {msg}{shown}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (['a','b','c'], value parsed as a YAML scalar)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except Exception:  # YAMLError, and PyYAML's constructors raise ValueError (2024-13-45), RecursionError ([[[...)
        value = raw
    return key.strip().split("."), value


def apply_overrides(tree: Tree, overrides: list[str]) -> Tree:
    """Return a copy of `tree` with each dotted override applied; unknown keys fail."""
    result = _deep_copy(tree)
    for text in overrides:
        path, value = parse_override(text)
        raw_text = text.partition("=")[2].strip()
        node: Any = ExperimentConfig
        target = result
        for depth, part in enumerate(path):
            fields = node.model_fields if isinstance(node, type) and issubclass(node, BaseModel) else None
            if fields is None or part not in fields:
                raise ConfigError(f"override {text!r}: unknown config key {'.'.join(path[: depth + 1])!r}")
            node = fields[part].annotation
            # An optional section (`ProgressiveResize | None`) still has keys: data.progressive.start_size=160.
            node = next((a for a in get_args(node) if isinstance(a, type) and issubclass(a, BaseModel)), node)
            if depth == len(path) - 1:
                # String fields take the text as written: name=2024 is the name "2024", not a number (nor a
                # date, 2024-01-01, nor a list, -); YAML quotes still work, and null still clears `str | None`.
                text_field = node is str or set(get_args(node)) == {str, type(None)}
                keep = isinstance(value, str) or (value is None and node is not str)
                target[part] = raw_text if text_field and not keep else value
            else:
                existing = target.get(part)
                if not isinstance(existing, dict):
                    existing = {}
                    target[part] = existing
                target = existing
    return result


def _deep_copy(tree: Tree) -> Tree:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


EXTENDS_KEY = "extends"


def _read_yaml_mapping(path: Path) -> Tree:
    source = str(path)
    if not path.is_file():
        raise ConfigError(f"config file {source} not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: not readable as UTF-8 text ({describe_error(exc, 200)})") from None
    try:
        loaded = yaml.safe_load(text)
    except Exception as exc:  # YAMLError; PyYAML's constructors also raise ValueError (2024-13-45, !!int x),
        # AttributeError (!!timestamp x) and RecursionError (deep nesting)
        raise ConfigError(f"{source}: invalid YAML ({describe_error(exc, 200)})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{source}: top level must be a mapping")
    try:
        return _deep_copy(loaded)
    except RecursionError:  # an alias inside the mapping it names (`&a {data: *a}`): no end to merge
        raise ConfigError(f"{source}: a YAML alias makes a mapping contain itself") from None


def merge_trees(base: Tree, delta: Tree) -> Tree:
    """`delta` over `base`: mappings merge key by key, every other value replaces (a copy; inputs untouched)."""
    merged = _deep_copy(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_trees(merged[key], value)
        else:
            merged[key] = _deep_copy(value) if isinstance(value, dict) else value
    return merged


def load_tree(path: str | os.PathLike[str], _chain: tuple[Path, ...] = ()) -> Tree:
    """The raw tree of a config file with its `extends:` bases (paths relative to the file) merged under it."""
    key = Path(path).resolve()
    if key in _chain:
        cycle = " -> ".join(str(c) for c in (*_chain, key))
        raise ConfigError(f"{path}: extends cycle ({cycle})")
    if _chain and not key.is_file():
        raise ConfigError(f"{_chain[-1]}: extends {_shown(str(key))}, which is not found")
    tree = _read_yaml_mapping(Path(path))
    bases = tree.pop(EXTENDS_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    # A NUL byte is no path (Path.resolve raises ValueError on it).
    if not isinstance(bases, list) or not all(isinstance(b, str) and b and "\0" not in b for b in bases):
        raise ConfigError(f"{path}: {EXTENDS_KEY} must be a file path or a list of them")
    merged: Tree = {}
    for base in bases:
        merged = merge_trees(merged, load_tree(key.parent / base, (*_chain, key)))
    return merge_trees(merged, tree)


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load a YAML config (or the embedded defaults when path is None), its bases, then the overrides."""
    source = str(path) if path is not None else "<defaults>"
    tree = load_tree(path) if path is not None else {}
    tree = apply_overrides(tree, list(overrides))
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def flatten(cfg: BaseModel, prefix: str = "") -> dict[str, Any]:
    """{'optim.lr': 0.1, ...}: the config as flat params (for MLflow); sections recurse, values are leaves.
    A URL's password in any value is masked (`user:***@host`)."""
    out: dict[str, Any] = {}
    for key in type(cfg).model_fields:
        value = getattr(cfg, key)
        if isinstance(value, BaseModel):
            out.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (dict, tuple, list)):
            out[f"{prefix}{key}"] = redact_text(yaml.safe_dump(_plain(value), default_flow_style=True).strip())
        elif isinstance(value, str):
            out[f"{prefix}{key}"] = redact_text(value)
        else:
            out[f"{prefix}{key}"] = value
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_yaml(cfg: ExperimentConfig) -> str:
    """The config as YAML (an MLflow artifact, each checkpoint's copy), URL passwords masked."""
    return yaml.safe_dump(redact_values(cfg.model_dump()), sort_keys=False)
