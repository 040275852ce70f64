"""`imagenet-ray predict`: top-5 classes of every image of a folder, raw ILSVRC layout or prepared dataset, on
Ray Data: read → decode with the model's eval preset (CPU tasks, the kernel of data/transforms.py) → the model in
an actor pool (a GPU each, bf16; or CPU) → Parquet, one row per image (a broken file: its error, no prediction),
then _SUCCESS (write_predictions says how). The pure steps are plain functions; predict_local runs them in one
process (the benchmark's baseline and the tests' reference)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch
import yaml

from imagenet_ray import lifecycle, storage
from imagenet_ray.config import EvalSection
from imagenet_ray.data import transforms
from imagenet_ray.data.classes import NUM_IMAGENET_CLASSES, ClassList, imagenet_classes
from imagenet_ray.data.decode import DecodeError
from imagenet_ray.data.format import MANIFEST_NAME, DatasetSource, PreparedDataset, open_prepared
from imagenet_ray.data.layouts import IMAGE_SUFFIXES, detect_and_list, read_records
from imagenet_ray.data.pipeline import RawLayoutDataset
from imagenet_ray.errors import UserError, describe_error
from imagenet_ray.evaluate import check_weights_fit, resolve_checkpoint_url
from imagenet_ray.runtime import absolute_url, cluster_has_gpu, ensure_ray
from imagenet_ray.train.checkpoint import read_checkpoint_url
from imagenet_ray.train.device import autocast_context
from imagenet_ray.train.models import build_model

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

TOP_K = 5
DECODE_ROWS = 32  # rows per decode call (the kernel's batch; memory stays per chunk)
ROWS_PER_FILE = 50_000  # a prediction row is ~200 bytes: files of ~10 MB, not one per model batch
MARKER_NAME = "_SUCCESS"
MARKER_FORMAT = "imagenet-ray/predictions-v1"
FILE_PREFIX = "predictions"
TMP_PREFIX = "_tmp-"  # Ray Data and pyarrow skip names starting with "_" when they read a folder
SOURCES = ("auto", "prepared", "raw", "folder")
NO_LAYOUT = "no known ILSVRC layout"  # what detect_and_list says of a folder that is no layout at all
PREDICTION_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # where the image came from, relative to --images
        ("top5_index", pa.list_(pa.int64())),  # class indices, most probable first (null: broken file)
        ("top5_wnid", pa.list_(pa.string())),
        ("top5_name", pa.list_(pa.string())),
        ("top5_prob", pa.list_(pa.float32())),
        ("error", pa.string()),  # why the file did not decode; null for a predicted image
    ]
)


# --- the model --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Everything an actor needs to rebuild the model and name its outputs (pickled into each actor)."""

    architecture: str
    num_classes: int
    blurpool: bool
    state: dict[str, Any]
    wnids: tuple[str, ...]
    names: tuple[str, ...]
    resize: int
    crop: int
    mean: tuple[float, ...] = transforms.IMAGENET_MEAN
    std: tuple[float, ...] = transforms.IMAGENET_STD
    source: str = ""  # what it was loaded from (a checkpoint URL, a model directory)


def build_network(spec: ModelSpec) -> torch.nn.Module:
    """The model of `spec` with its weights, in eval mode, channels_last (training's eval layout)."""
    model = build_model(spec.architecture, spec.num_classes, blurpool=spec.blurpool)
    model.load_state_dict(spec.state)
    return model.eval().to(memory_format=torch.channels_last)


def class_names_for(num_classes: int, classes: ClassList | None) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """(wnids, names, where they come from) of a checkpoint's outputs: the input dataset's class list when it
    has as many classes, else the ILSVRC2012 classes for a 1,000-class model, else class_<i>."""
    if classes is not None and len(classes) == num_classes:
        return classes.wnids, classes.names, "the input dataset's class list"
    if num_classes == NUM_IMAGENET_CLASSES:
        known = imagenet_classes()
        return known.wnids, known.names, "the ILSVRC2012 classes"
    placeholder = tuple(f"class_{i}" for i in range(num_classes))
    return placeholder, placeholder, "placeholders class_<i> (no class list with as many classes)"


def _num_outputs(state: dict[str, Any]) -> int:
    """Outputs of a classifier state dict: rows of its last 2-D weight (torchvision heads come last)."""
    heads = [v for k, v in state.items() if k.endswith(".weight") and getattr(v, "ndim", 0) == 2]
    if not heads:
        raise UserError("the checkpoint's model has no linear layer to count its classes from")
    return int(heads[-1].shape[0])


def spec_from_checkpoint(url: str, classes: ClassList | None) -> ModelSpec:
    """A training checkpoint directory (state.pt): architecture, BlurPool and the eval preset from its config."""
    state = read_checkpoint_url(url)
    if "model" not in state or "config_yaml" not in state:
        raise UserError(f"{url}: not an imagenet-ray training checkpoint (no model state or config)")
    cfg = yaml.safe_load(state["config_yaml"]) or {}
    model_cfg, eval_cfg = cfg.get("model") or {}, cfg.get("eval") or {}
    if "name" not in model_cfg:
        raise UserError(f"{url}: the checkpoint's config names no model")
    weights = state["model"]
    num_classes = _num_outputs(weights)
    # A BlurPool model has other module names: rebuild the architecture the checkpoint was trained with.
    blurpool = bool(model_cfg.get("blurpool", False))
    check_weights_fit(model_cfg["name"], weights, num_classes, blurpool)
    wnids, names, where = class_names_for(num_classes, classes)
    log.info("class names of %s: %s", url, where)
    defaults = EvalSection()
    return ModelSpec(
        architecture=model_cfg["name"],
        num_classes=num_classes,
        blurpool=blurpool,
        state=weights,
        wnids=wnids,
        names=names,
        resize=int(eval_cfg.get("resize", defaults.resize)),
        crop=int(eval_cfg.get("crop", defaults.crop)),
        source=url,
    )


_META_REQUIRED = ("architecture", "num_classes", "wnids", "names", "resize", "crop")


def spec_from_model_dir(model_dir: Path) -> ModelSpec:
    """A logged model's directory (imagenet_ray.lifecycle): meta.json (architecture, classes, eval preset,
    normalisation) + weights.pt (a plain state dict)."""
    meta = lifecycle.read_meta(model_dir)
    missing = [k for k in _META_REQUIRED if k not in meta]
    if missing:
        raise UserError(f"{model_dir}: meta.json lacks {', '.join(missing)}")
    num_classes = int(meta["num_classes"])
    if len(meta["wnids"]) != num_classes or len(meta["names"]) != num_classes:
        raise UserError(f"{model_dir}: meta.json's wnids and names must list {num_classes} classes each")
    if int(meta["crop"]) > int(meta["resize"]):
        raise UserError(f"{model_dir}: meta.json's crop {meta['crop']} is larger than its resize {meta['resize']}")
    weights_file = lifecycle.weights_path(model_dir)
    try:
        weights = torch.load(weights_file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{weights_file}: not a PyTorch state dict ({describe_error(exc, 160)})") from None
    blurpool = bool(meta.get("blurpool", False))
    check_weights_fit(meta["architecture"], weights, num_classes, blurpool)
    return ModelSpec(
        architecture=meta["architecture"],
        num_classes=num_classes,
        blurpool=blurpool,
        state=weights,
        wnids=tuple(meta["wnids"]),
        names=tuple(meta["names"]),
        resize=int(meta["resize"]),
        crop=int(meta["crop"]),
        mean=tuple(float(v) for v in meta.get("mean") or transforms.IMAGENET_MEAN),
        std=tuple(float(v) for v in meta.get("std") or transforms.IMAGENET_STD),
        source=str(meta.get("checkpoint_url") or model_dir),
    )


def _is_logged_model_ref(ref: str) -> bool:
    """models:/… and runs:/<id>/<path> name logged MLflow models; runs:/<id> alone names a training run."""
    if ref.startswith("models:/"):
        return True
    return ref.startswith("runs:/") and "/" in ref[len("runs:/") :].strip("/")


def _is_model_dir(ref: str) -> bool:
    """A local directory holding a logged model (as downloaded: MLmodel + artifacts, or meta.json + weights.pt)."""
    return "://" not in ref and any(os.path.isfile(os.path.join(ref, name)) for name in ("MLmodel", "meta.json"))


def _downloaded_spec(ref: str, tracking_uri: str | None) -> ModelSpec:
    if not tracking_uri:
        raise UserError(f"{ref}: an MLflow reference needs --mlflow-uri (or MLFLOW_TRACKING_URI)")
    model_dir = lifecycle.download_model(ref, tracking_uri)
    try:
        return spec_from_model_dir(model_dir)
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)  # a temporary copy; the weights are in memory now


def load_model_spec(ref: str, tracking_uri: str | None = None, classes: ClassList | None = None) -> ModelSpec:
    """--model: a logged model (models:/NAME@ALIAS, models:/NAME/VERSION, models:/m-…, runs:/ID/PATH, or a local
    directory holding meta.json + weights.pt), or a training checkpoint (directory URL, or runs:/ID of a training
    run). `classes`: the input's class list, naming a checkpoint's outputs (see class_names_for)."""
    if not ref:
        raise UserError("--model: empty model reference")
    if _is_logged_model_ref(ref):
        return _downloaded_spec(ref, tracking_uri)
    if _is_model_dir(ref):
        return spec_from_model_dir(Path(ref))
    return spec_from_checkpoint(resolve_checkpoint_url(ref, tracking_uri), classes)


# --- the inputs -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictInputs:
    """What --images holds, listed on the driver: `count` is the exact number of images the output must have."""

    url: str
    kind: Literal["prepared", "raw", "folder"]
    count: int
    split: str | None = None  # prepared / raw: the split predicted
    data: DatasetSource | None = None  # prepared / raw
    paths: tuple[str, ...] = ()  # folder: the image files (filesystem paths)
    skipped: int = 0  # folder: files that are not images by name

    @property
    def classes(self) -> ClassList | None:
        if isinstance(self.data, RawLayoutDataset):
            return self.data.listing.classes
        if isinstance(self.data, PreparedDataset):
            manifest = self.data.manifest
            wnids = tuple(manifest["classes"])
            names = tuple(manifest.get("class_names") or [""] * len(wnids))
            return ClassList(wnids, names)
        return None

    def describe(self) -> str:
        if self.kind == "folder":
            skipped = f", {self.skipped} other files skipped" if self.skipped else ""
            return f"{self.count} image files in {self.url}{skipped}"
        return f"{self.count} {self.split} images of the {self.kind} dataset {self.url}"

    def dataset(self) -> ray.data.Dataset:
        """Ray Dataset of {key, image (encoded bytes)}, one row per input image."""
        if self.data is not None:
            assert self.split is not None
            return self.data.read(self.split, ["key", "image"])
        import ray.data

        root = storage.resolve(self.url)
        ds = ray.data.read_binary_files(list(self.paths), include_paths=True, filesystem=root.fs)
        # (the ignore: Ray's stubs do not know that fn_kwargs fill a map function's extra parameters)
        return ds.map_batches(
            _folder_rows,  # type: ignore[arg-type]
            fn_kwargs={"root_path": root.path},
            batch_size=None,
            batch_format="numpy",
        )

    def local_batches(self, rows: int) -> Iterator[dict[str, np.ndarray]]:
        """The same {key, image} rows as `dataset`, read in this process, `rows` at a time (no Ray)."""
        root = storage.resolve(self.url)
        if isinstance(self.data, PreparedDataset):
            import pyarrow.parquet as pq

            assert self.split is not None
            fs, shards = self.data.shard_paths(self.split)
            for shard in shards:
                with fs.open_input_file(shard) as f:
                    for part in pq.ParquetFile(f).iter_batches(batch_size=rows, columns=["key", "image"]):
                        yield {name: part.column(name).to_numpy(zero_copy_only=False) for name in ("key", "image")}
        elif isinstance(self.data, RawLayoutDataset):
            assert self.split is not None
            records = self.data.listing.split(self.split)
            for start in range(0, len(records), rows):
                chunk = records[start : start + rows]
                yield {
                    "key": np.array([r.key for r in chunk], dtype=object),
                    "image": _objects(read_records(root, chunk)),
                }
        else:
            for start in range(0, len(self.paths), rows):
                paths = self.paths[start : start + rows]
                images = _objects(storage.read_bytes(storage.Location(p, root.fs, p)) for p in paths)
                yield {"key": np.array([_relative(p, root.path) for p in paths], dtype=object), "image": images}


def _objects(items: Iterable[bytes]) -> np.ndarray:
    """A 1-D object array of bytes (np.array would make a fixed-width bytes array of them)."""
    values = list(items)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _relative(path: str, root_path: str) -> str:
    """A file's key: its path below the --images root (its name when --images is the file itself)."""
    base = root_path.rstrip("/") + "/"
    return path[len(base) :] if path.startswith(base) else posixpath.basename(path)


def _folder_rows(batch: dict[str, np.ndarray], root_path: str) -> dict[str, np.ndarray]:
    """read_binary_files' {bytes, path} → {key, image}."""
    keys = np.array([_relative(str(p), root_path) for p in batch["path"]], dtype=object)
    return {"key": keys, "image": batch["bytes"]}


def _is_image_file(path: str, root_path: str) -> bool:
    rel = _relative(path, root_path)
    return path.lower().endswith(IMAGE_SUFFIXES) and not any(part.startswith(".") for part in rel.split("/"))


def list_folder(url: str) -> PredictInputs:
    """Every *.jpg / *.jpeg / *.png (any case) below `url`, recursively; hidden files are left out."""
    root = storage.resolve(url)
    files = storage.list_files(root)
    paths = sorted(f.path for f in files if _is_image_file(f.path, root.path))
    if not paths:
        raise UserError(f"{url}: no image files there ({', '.join(IMAGE_SUFFIXES)}; found {len(files)} other files)")
    return PredictInputs(url, "folder", len(paths), paths=tuple(paths), skipped=len(files) - len(paths))


def _is_file(loc: storage.Location) -> bool:
    try:
        return bool(loc.fs.get_file_info(loc.path).type == pafs.FileType.File)
    except OSError as exc:
        raise UserError(storage.describe_os_error(loc.url, exc)) from None


def _with_split(url: str, kind: Literal["prepared", "raw"], data: DatasetSource, split: str | None) -> PredictInputs:
    split = split or "val"
    try:
        count = data.num_images(split)
    except KeyError:
        raise UserError(f"{url}: the {kind} dataset has no {split} split") from None
    if count == 0:
        raise UserError(f"{url}: the {split} split of the {kind} dataset is empty")
    return PredictInputs(url, kind, count, split=split, data=data)


def open_inputs(url: str, source: str = "auto", split: str | None = None) -> PredictInputs:
    """What --images is. auto: a prepared dataset when it has _manifest.json, else an ILSVRC layout when one is
    detected, else a plain folder of image files. A dataset's `split` defaults to val; a folder has none."""
    if source not in SOURCES:
        raise UserError(f"--source must be one of {', '.join(SOURCES)}, not {source!r}")
    if split is not None and split not in ("train", "val"):
        raise UserError(f"--split must be train or val, not {split!r}")
    root = storage.resolve(url)
    if not storage.exists(root):
        raise UserError(f"{url}: not found")
    if source == "prepared" or (source == "auto" and storage.exists(root.child(MANIFEST_NAME))):
        return _with_split(url, "prepared", open_prepared(url), split)
    if source == "auto" and _is_file(root):
        source = "folder"  # one image file: a folder of one
    if source in ("auto", "raw"):
        try:
            listing = detect_and_list(url)
        except UserError as exc:
            if source == "raw" or NO_LAYOUT not in str(exc):
                raise UserError(f"{exc} (to predict every image file below it, pass --source folder)") from None
        else:
            return _with_split(url, "raw", RawLayoutDataset(url, listing), split)
    if split is not None:
        raise UserError(f"--split {split}: {url} is a plain folder of images, it has no splits")
    return list_folder(url)


# --- the pure steps: bytes → arrays → rows ---------------------------------------------------------------------


def decode_batch(batch: dict[str, np.ndarray], resize: int, crop: int) -> dict[str, np.ndarray]:
    """{key, image: encoded bytes} → {key, image: uint8 (N, crop, crop, 3), error: str (N,)}, N = the input rows.

    The eval preset of data/transforms.py (Resize + CenterCrop, the project's kernel). A row that does not decode
    keeps its key, a zero image and its error message ('' for a decoded row): never dropped, never replaced.
    """
    encoded = batch["image"]
    out = np.zeros((len(encoded), crop, crop, 3), np.uint8)
    errors = np.full(len(encoded), "", dtype=object)
    for i, data in enumerate(encoded):
        try:
            out[i] = transforms.eval_image(data, resize, crop)
        except DecodeError as exc:
            errors[i] = describe_error(exc, 300) or "cannot decode image"
    return {"key": np.asarray(batch["key"], dtype=object), "image": out, "error": errors}


def model_input(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, H, W, 3) → normalised float NCHW in channels_last, as train.device.to_model_input does with the
    model's own mean/std (ImageNet's for every model this project trains)."""
    x = images.permute(0, 3, 1, 2).float()
    mean_t = torch.tensor(tuple(mean), device=x.device).view(1, 3, 1, 1) * 255
    std_t = torch.tensor(tuple(std), device=x.device).view(1, 3, 1, 1) * 255
    return ((x - mean_t) / std_t).contiguous(memory_format=torch.channels_last)


def top_k(logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities float32 (N, k), class indices int64 (N, k)) of the k most probable classes, descending."""
    probs, indices = torch.softmax(logits.float(), dim=1).topk(k, dim=1)
    return probs.cpu().numpy().astype(np.float32), indices.cpu().numpy().astype(np.int64)


def prediction_table(
    keys: Sequence[str],
    errors: Sequence[str],
    probs: np.ndarray,
    indices: np.ndarray,
    wnids: Sequence[str],
    names: Sequence[str],
) -> pa.Table:
    """Rows of PREDICTION_SCHEMA. `probs` / `indices` (M, k) are the predictions of the rows whose error is ''
    (in order); the other rows get their error and null predictions."""
    broken = np.array([bool(e) for e in errors], dtype=bool)
    if len(probs) != int((~broken).sum()) or len(indices) != len(probs):
        raise ValueError(f"{len(probs)} predictions for {int((~broken).sum())} decoded rows")
    k = indices.shape[1] if indices.ndim == 2 else 0
    offsets = pa.array(np.concatenate([[0], np.cumsum(np.where(broken, 0, k))]).astype(np.int32))
    mask = pa.array(broken)
    flat = indices.reshape(-1)
    wnid_values = np.asarray(wnids, dtype=object)[flat] if len(flat) else np.array([], dtype=object)
    name_values = np.asarray(names, dtype=object)[flat] if len(flat) else np.array([], dtype=object)

    def lists(values: pa.Array) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, values, mask=mask)

    columns = [
        pa.array([str(key) for key in keys], pa.string()),
        lists(pa.array(flat, pa.int64())),
        lists(pa.array(wnid_values, pa.string())),
        lists(pa.array(name_values, pa.string())),
        lists(pa.array(probs.reshape(-1), pa.float32())),
        pa.array([str(e) if e else None for e in errors], pa.string()),
    ]
    return pa.Table.from_arrays(columns, schema=PREDICTION_SCHEMA)


class Predictor:
    """The model on one device, as a Ray Data actor (`map_batches` with a class) or in-process: a decoded batch
    {key, image, error} → a PREDICTION_SCHEMA table (bf16 autocast on a GPU, fp32 on the CPU)."""

    def __init__(self, spec: ModelSpec, use_gpu: bool = False, threads: int | None = None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("a GPU predictor was placed where torch sees no CUDA device")
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model = build_network(spec).to(self.device)
        self.k = min(TOP_K, spec.num_classes)  # a model of fewer classes ranks them all
        self.mean, self.std, self.wnids, self.names = spec.mean, spec.std, spec.wnids, spec.names

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = [str(e) for e in batch["error"]]
        ok = np.array([not e for e in errors], dtype=bool)
        probs, indices = np.empty((0, self.k), np.float32), np.empty((0, self.k), np.int64)
        if ok.any():
            images = batch["image"] if ok.all() else batch["image"][ok]
            # Ray's zero-copy batches are read-only; torch wants a writable array to wrap.
            array = images if images.flags.writeable else images.copy()
            # uint8 to the device, normalised there: a quarter of the bytes of float input
            x = model_input(torch.from_numpy(array).to(self.device), self.mean, self.std)
            with autocast_context(self.device):
                logits = self.model(x).float()
            probs, indices = top_k(logits, self.k)
        return prediction_table(list(batch["key"]), errors, probs, indices, self.wnids, self.names)


def predict_local(inputs: PredictInputs, spec: ModelSpec, batch_size: int = 64, threads: int | None = None) -> pa.Table:
    """The whole prediction in this process, without Ray: read, decode, model, rows (same kernel, same model)."""
    predictor = Predictor(spec, use_gpu=False, threads=threads)
    tables = [predictor(decode_batch(b, spec.resize, spec.crop)) for b in inputs.local_batches(batch_size)]
    return pa.concat_tables(tables) if tables else PREDICTION_SCHEMA.empty_table()


# --- accounting and output --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictSummary:
    images: int  # inputs = rows written
    broken: int  # rows with an error (no prediction)
    seconds: float  # the pipeline: first read to published output
    out_url: str
    files: tuple[str, ...] = ()
    broken_keys: tuple[str, ...] = field(default=(), repr=False)

    @property
    def predicted(self) -> int:
        return self.images - self.broken

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        first = f" (first: {self.broken_keys[0]})" if self.broken_keys else ""
        return (
            f"predicted {self.predicted} of {self.images} images, {self.broken} broken{first}, "
            f"{self.images_per_s:.1f} images/s, to {self.out_url}"
        )


def account(expected: int, keys: Sequence[str], errors: Sequence[str | None]) -> tuple[int, list[str]]:
    """(rows with a prediction, keys of the broken rows) of a written output; a RuntimeError unless every input
    appears exactly once (rows + broken == inputs)."""
    if len(keys) != expected:
        raise RuntimeError(f"the predictions have {len(keys)} rows, the input lists {expected} images")
    if len(set(keys)) != len(keys):
        raise RuntimeError(f"the predictions repeat {len(keys) - len(set(keys))} keys")
    broken = sorted(str(k) for k, e in zip(keys, errors, strict=True) if e is not None)
    return len(keys) - len(broken), broken


def _is_ours(rel: str) -> bool:
    """A file `predict` writes into --out (temporary prefix, predictions, marker)."""
    if rel.startswith(TMP_PREFIX):
        return True
    return "/" not in rel and (rel == MARKER_NAME or (rel.startswith(FILE_PREFIX + "_") and rel.endswith(".parquet")))


def claim_out(out: storage.Location) -> None:
    """Make --out ready: refused when it holds finished predictions or files `predict` did not write; files
    left by an unfinished run (no _SUCCESS) are deleted."""
    files = storage.list_files(out)
    rels = [_relative(f.path, out.path) for f in files]
    if MARKER_NAME in rels:
        raise UserError(
            f"{out.url}: already holds finished predictions ({MARKER_NAME}); delete it or pick another --out"
        )
    foreign = [r for r in rels if not _is_ours(r)]
    if foreign:
        raise UserError(
            f"{out.url}: holds {len(foreign)} files that predict did not write (first: {foreign[0]}); "
            "use a new or empty --out"
        )
    for info in files:
        try:
            out.fs.delete_file(info.path)
        except OSError as exc:
            raise UserError(storage.describe_os_error(out.url, exc)) from None
    if files:
        log.info("%s: removed %d files of an unfinished run", out.url, len(files))


def _remove_tree(loc: storage.Location) -> None:
    # Best effort: whatever is left is under _tmp-*, which claim_out clears and readers skip.
    with contextlib.suppress(OSError):
        loc.fs.delete_dir(loc.path)


@dataclass(frozen=True)
class PipelineOptions:
    batch_size: int = 128  # images per model call
    workers: int = 1  # actors (each one GPU, or one CPU); the pool starts with this many
    use_gpu: bool = False
    max_workers: int | None = None  # > workers: Ray Data grows the pool up to it (GPU nodes that autoscale)
    decode_rows: int = DECODE_ROWS

    @property
    def concurrency(self) -> int | tuple[int, int]:
        if self.max_workers is None or self.max_workers == self.workers:
            return self.workers
        return self.workers, self.max_workers

    def describe(self) -> str:
        count = f"{self.workers}-{self.max_workers}" if self.concurrency != self.workers else str(self.workers)
        return f"{count} {'GPU' if self.use_gpu else 'CPU'} actor(s)"


def parse_workers(text: str) -> tuple[int, int]:
    """--workers: N (a pool of N actors) or MIN:MAX (a pool that Ray Data grows from MIN to MAX)."""
    low, sep, high = text.partition(":")
    try:
        pair = (int(low), int(high) if sep else int(low))
    except ValueError:
        raise UserError(f"--workers {text}: expected N or MIN:MAX") from None
    if not 1 <= pair[0] <= pair[1]:
        raise UserError(f"--workers {text}: need 1 ≤ MIN ≤ MAX")
    return pair


def prediction_dataset(inputs: PredictInputs, spec: ModelSpec, options: PipelineOptions) -> ray.data.Dataset:
    """The Ray Data pipeline: read → decode (CPU tasks) → model (actor pool) → PREDICTION_SCHEMA rows."""
    # (the ignore: Ray's stubs do not know that fn_kwargs fill a map function's extra parameters)
    decoded = inputs.dataset().map_batches(
        decode_batch,  # type: ignore[arg-type]
        fn_kwargs={"resize": spec.resize, "crop": spec.crop},
        batch_size=options.decode_rows,
        batch_format="numpy",
    )
    # One CPU per actor either way; a CPU actor computes with that one thread (the rest decode).
    threads = None if options.use_gpu else 1
    return decoded.map_batches(
        Predictor,
        fn_constructor_kwargs={"spec": spec, "use_gpu": options.use_gpu, "threads": threads},
        batch_size=options.batch_size,
        batch_format="numpy",
        concurrency=options.concurrency,
        num_cpus=1,
        num_gpus=1 if options.use_gpu else None,
    )


def write_predictions(
    inputs: PredictInputs, spec: ModelSpec, out: storage.Location, options: PipelineOptions, model_ref: str = ""
) -> PredictSummary:
    """Run the pipeline into `out` (claim_out it first):

      predictions_<write uuid>_<task>.parquet: one row per input image, PREDICTION_SCHEMA: key, top5_index
          (list<int64>), top5_wnid, top5_name (list<string>), top5_prob (list<float32>, softmax, descending; a
          model of fewer than 5 classes ranks them all), error (string). A file that does not decode is a row
          with its decode error and null predictions: rows = inputs, exactly; the broken ones: error IS NOT NULL.
      _SUCCESS, written last (JSON: counts, broken keys, files, model): the output is complete only when it exists.

    The files are written under a temporary `_tmp-<id>/` prefix (which readers of a folder of Parquet skip),
    counted (rows + broken == inputs, every key once), and only then moved into `out`: a failed run leaves no
    _SUCCESS and at most a partial move, which the next run into the same `out` clears (claim_out).
    """
    import pyarrow.dataset as pads
    from ray.data.datasource import FilenameProvider

    tmp = out.child(f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}")
    start = time.perf_counter()
    try:
        prediction_dataset(inputs, spec, options).write_parquet(
            tmp.path,
            filesystem=tmp.fs,
            filename_provider=FilenameProvider(dataset_uuid=FILE_PREFIX, file_format="parquet"),
            min_rows_per_file=ROWS_PER_FILE,
        )
        written = sorted(f.path for f in storage.list_files(tmp) if f.path.endswith(".parquet"))
        counted = pads.dataset(written, filesystem=tmp.fs, format="parquet").to_table(columns=["key", "error"])
        _, broken = account(inputs.count, counted.column("key").to_pylist(), counted.column("error").to_pylist())
        names = [posixpath.basename(p) for p in written]
        for path, name in zip(written, names, strict=True):
            tmp.fs.move(path, out.child(name).path)
    except BaseException:
        _remove_tree(tmp)
        raise
    _remove_tree(tmp)
    seconds = time.perf_counter() - start
    summary = PredictSummary(inputs.count, len(broken), seconds, out.url, tuple(names), tuple(broken))
    marker = {
        "format": MARKER_FORMAT,
        "images": summary.images,
        "predicted": summary.predicted,
        "broken": summary.broken,
        "broken_keys": list(broken),
        "files": list(names),
        "input": inputs.url,
        "input_kind": inputs.kind,
        "split": inputs.split,
        "model": model_ref or spec.source,
        "model_source": spec.source,
        "architecture": spec.architecture,
        "resize": spec.resize,
        "crop": spec.crop,
        "seconds": round(seconds, 3),
        "images_per_s": round(summary.images_per_s, 2),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_bytes_atomic(out.child(MARKER_NAME), json.dumps(marker, indent=1).encode())
    return summary


# --- the command ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictRequest:
    model: str
    images: str
    out: str
    split: str | None = None  # prepared / raw datasets: default val
    source: str = "auto"
    batch_size: int = 128
    workers: str | None = None  # N or MIN:MAX (parse_workers); None: one per GPU (GPU), cluster CPUs - 1 (CPU)
    gpu: str = "auto"  # auto | true | false
    tracking_uri: str | None = None


def use_gpu_for(choice: str) -> bool:
    """--gpu: auto = when the connected cluster has GPUs; true also on a cluster whose GPU nodes autoscale."""
    if choice not in ("auto", "true", "false"):
        raise UserError(f"--gpu must be auto, true or false, not {choice!r}")
    return cluster_has_gpu() if choice == "auto" else choice == "true"


def default_workers(use_gpu: bool) -> int:
    """One actor per GPU of the cluster; on CPU one per CPU but one (left for decoding)."""
    import ray

    resources = ray.cluster_resources()
    if use_gpu:
        return max(1, int(resources.get("GPU", 0)))
    return max(1, int(resources.get("CPU", 1)) - 1)


def check_cpu_room(max_workers: int, use_gpu: bool) -> None:
    """On a CPU-only cluster each model actor holds a CPU: as many actors as CPUs leave none for the read
    tasks, and the pipeline stalls. Say so instead."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 0))
    if not use_gpu and max_workers >= cpus:
        raise UserError(
            f"--workers {max_workers}: a CPU-only cluster of {cpus} CPUs needs at least one CPU for reading "
            f"(use --workers {max(1, cpus - 1)} or fewer)"
        )


def run_predict(req: PredictRequest) -> PredictSummary:
    if req.batch_size < 1:
        raise UserError("--batch-size must be ≥ 1")
    workers = parse_workers(req.workers) if req.workers is not None else None
    inputs = open_inputs(absolute_url(req.images), req.source, req.split)
    spec = load_model_spec(req.model, req.tracking_uri, inputs.classes)
    out = storage.resolve(absolute_url(req.out))
    claim_out(out)  # before starting Ray: a bad --out fails in one line, at once
    ensure_ray(1, job="jobs/predict.py")
    use_gpu = use_gpu_for(req.gpu)
    low, high = workers or (default_workers(use_gpu),) * 2
    check_cpu_room(high, use_gpu)
    options = PipelineOptions(batch_size=req.batch_size, workers=low, max_workers=high, use_gpu=use_gpu)
    log.info(
        "predicting %s with %s (%s, %d classes, resize %d crop %d) on %s",
        inputs.describe(),
        req.model,
        spec.architecture,
        spec.num_classes,
        spec.resize,
        spec.crop,
        options.describe(),
    )
    return write_predictions(inputs, spec, out, options, model_ref=req.model)
