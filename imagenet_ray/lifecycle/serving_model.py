"""The logged classifier's inference code (an MLflow models-from-code pyfunc): encoded images or uint8 pixels →
the training run's eval preset → top-5 classes. Self-contained on purpose (torch, torchvision, Pillow, numpy,
pandas, mlflow): a loaded model never imports imagenet_ray. The package imports it only for its pure parts.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel
from PIL import Image

# The files of the contract with batch inference (imagenet-ray predict reads them from a downloaded model).
WEIGHTS_ARTIFACT = "weights"  # keys of the pyfunc's `artifacts` (MLmodel: python_function.artifacts)
META_ARTIFACT = "meta"
WEIGHTS_FILE = "weights.pt"  # a plain state_dict: torch.load(..., weights_only=True)
META_FILE = "meta.json"
IMAGE_COLUMN = "image"
TOP_K = 5
DEFAULT_BATCH_SIZE = 64
INCLUDE_LOGITS_PARAM = "include_logits"


class BlurPool(nn.Module):
    """imagenet_ray.train.models.BlurPool2d without timm: timm's BlurPool2d(filt_size=3, stride=1,
    pad_mode="constant"), the fixed [1, 2, 1]⊗[1, 2, 1] / 16 filter per channel. Its buffer is not
    persistent there either, so a BlurPool checkpoint's state dict loads unchanged."""

    filt: torch.Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        coeffs = torch.tensor([1.0, 2.0, 1.0]) / 4
        self.channels = channels
        kernel = (coeffs[:, None] * coeffs[None, :])[None, None].repeat(channels, 1, 1, 1)
        self.register_buffer("filt", kernel, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, [1, 1, 1, 1], mode="constant"), self.filt, stride=1, groups=self.channels)


def add_blurpool(model: nn.Module) -> int:
    """FFCV's rule, as imagenet_ray.train.models.add_blurpool: a BlurPool before every strided conv with
    ≥ 16 input channels (module names change: conv → Sequential(blur, conv)); returns how many."""
    count = 0
    for name, child in model.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(model, name, nn.Sequential(BlurPool(child.in_channels), child))
            count += 1
        else:
            count += add_blurpool(child)
    return count


def build_classifier(meta: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """The torchvision architecture meta.json names, with BlurPool if it says so, loaded (strictly), in eval mode."""
    model: nn.Module = torchvision.models.get_model(meta["architecture"], weights=None, num_classes=meta["num_classes"])
    if meta.get("blurpool"):
        add_blurpool(model)
    model.load_state_dict(state_dict)
    return model.eval()


def eval_geometry(width: int, height: int, resize: int, crop: int) -> tuple[int, int, int, int]:
    """(new_w, new_h, left, top) of Resize(resize) + CenterCrop(crop) — imagenet_ray.data.transforms'."""
    if crop > resize:
        raise ValueError(f"eval crop {crop} is larger than the resize {resize}")
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    return new_w, new_h, round((new_w - crop) / 2.0), round((new_h - crop) / 2.0)


def dct_factor(shorter_side: int, target: int) -> int:
    """Largest of 1, 2, 4, 8 that keeps `shorter_side / factor` ≥ `target` — imagenet_ray.data.transforms'."""
    k = 1
    while k < 8 and shorter_side >= 2 * k * target:
        k *= 2
    return k


def decode_image(data: bytes, resize: int) -> tuple[np.ndarray, int, int]:
    """(pixels (h, w, 3) uint8 RGB, full width, full height) of an encoded image. Large YCbCr/gray/RGB JPEGs
    come DCT-downscaled (Pillow's draft), as training's eval decodes them, so the pixels are the same."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if img.format == "JPEG" and img.mode in ("RGB", "L"):  # CMYK JPEGs: eval decodes those whole too
                factor = dct_factor(min(width, height), resize)
                if factor > 1:
                    img.draft("RGB", (width // factor, height // factor))  # libjpeg scale 1/factor, rounded up
            rgb = img.convert("RGB")
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ...) for bad input
        raise ValueError(f"cannot decode image: {exc}") from None
    return np.array(rgb), width, height


def resize_center_crop(pixels: np.ndarray, width: int, height: int, resize: int, crop: int) -> torch.Tensor:
    """(crop, crop, 3) uint8: `pixels` (the image of `width` x `height`, maybe decoded smaller) resized as
    training's eval does it (torch's antialiased uint8 bilinear on channels_last memory), then center cropped."""
    new_w, new_h, left, top = eval_geometry(width, height, resize, crop)
    # NHWC memory seen as NCHW (channels_last): the same kernel, hence the same pixels, as the eval preset.
    x = torch.from_numpy(np.ascontiguousarray(pixels)).unsqueeze(0).permute(0, 3, 1, 2)
    x = x.contiguous(memory_format=torch.channels_last)
    if x.shape[2] != new_h or x.shape[3] != new_w:
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    return x[0].permute(1, 2, 0)[top : top + crop, left : left + crop]


def as_pixels(value: Any) -> np.ndarray:
    """A (H, W, 3) uint8 RGB array from uint8-valued pixels: (H, W, 3), (H, W) gray or (H, W, 4) RGBA (alpha
    dropped, as Pillow's RGBA → RGB does); nested lists (JSON) are fine."""
    arr = np.asarray(value)
    if arr.dtype != np.uint8:
        if arr.dtype.kind not in "iu" or arr.size == 0 or arr.min() < 0 or arr.max() > 255:
            raise ValueError(f"pixels must be uint8 (0..255), got dtype {arr.dtype}")
        arr = arr.astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"pixels must be (H, W, 3), (H, W) or (H, W, 4), got shape {arr.shape}")
    return arr[:, :, :3]


def eval_input(value: Any, resize: int, crop: int) -> torch.Tensor:
    """One input cell → (crop, crop, 3) uint8: encoded bytes (JPEG, PNG, ...), base64 text of them, or pixels."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        pixels, width, height = decode_image(bytes(value), resize)
    elif isinstance(value, str):  # base64 text of image bytes (MLflow's JSON form: base64.encodebytes, newlines)
        try:
            data = base64.b64decode(value)
        except binascii.Error:
            raise ValueError("a text value must be base64-encoded image bytes") from None
        pixels, width, height = decode_image(data, resize)
    else:
        pixels = as_pixels(value)
        height, width = pixels.shape[:2]
    return resize_center_crop(pixels, width, height, resize, crop)


def to_model_input(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (N, H, W, 3) → normalised float (N, 3, H, W), channels_last — training's to_model_input."""
    x = images.permute(0, 3, 1, 2).float()
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1) * 255
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1) * 255
    return ((x - mean_t) / std_t).contiguous(memory_format=torch.channels_last)


def input_cells(model_input: Any) -> list[Any]:
    """The images of a pyfunc input: the `image` column (or the only column) of a DataFrame, a dict's `image`
    list, a list, one value, or a uint8 (N, H, W, 3) batch (the last three through unwrap_python_model())."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN in model_input.columns:
            return list(model_input[IMAGE_COLUMN])
        if len(model_input.columns) == 1:
            return list(model_input.iloc[:, 0])
        raise ValueError(f"expected an {IMAGE_COLUMN!r} column, got columns {list(model_input.columns)}")
    if isinstance(model_input, dict):
        return input_cells(pd.DataFrame({IMAGE_COLUMN: list(model_input[IMAGE_COLUMN])}))
    if isinstance(model_input, np.ndarray) and model_input.ndim == 4:
        return list(model_input)
    if isinstance(model_input, (list, tuple, pd.Series)):
        return list(model_input)
    return [model_input]


class ImageClassifier(PythonModel):
    """Images → top-1 and top-5 (class index, wnid, name, softmax probability), optionally the logits.

    model_config: device ("auto" = CUDA when present), batch_size. fp32, no test-time flip."""

    def load_context(self, context: Any) -> None:
        self.meta: dict[str, Any] = json.loads(Path(context.artifacts[META_ARTIFACT]).read_text())
        state = torch.load(context.artifacts[WEIGHTS_ARTIFACT], map_location="cpu", weights_only=True)
        config = dict(context.model_config or {})
        device = str(config.get("device", "auto"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.batch_size = int(config.get("batch_size", DEFAULT_BATCH_SIZE))
        model = build_classifier(self.meta, state).to(self.device)
        self.model = model.to(memory_format=torch.channels_last)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        cells = input_cells(model_input)
        if not cells:
            return self._frame(torch.zeros(0, int(self.meta["num_classes"])), False)
        logits = torch.cat(
            [self._logits(cells[i : i + self.batch_size], i) for i in range(0, len(cells), self.batch_size)]
        )
        return self._frame(logits, bool((params or {}).get(INCLUDE_LOGITS_PARAM, False)))

    @torch.inference_mode()
    def _logits(self, cells: list[Any], first_row: int) -> torch.Tensor:
        meta = self.meta
        images = []
        for row, value in enumerate(cells, first_row):
            try:
                images.append(eval_input(value, meta["resize"], meta["crop"]))
            except ValueError as exc:
                raise ValueError(f"image row {row}: {exc}") from None
        x = to_model_input(torch.stack(images).to(self.device), meta["mean"], meta["std"])
        return self.model(x).float().cpu()  # type: ignore[no-any-return]

    def _frame(self, logits: torch.Tensor, include_logits: bool) -> pd.DataFrame:
        wnids, names = self.meta["wnids"], self.meta["names"]
        probs = logits.softmax(1)
        top_p, top_i = probs.topk(min(TOP_K, probs.shape[1]), dim=1)
        index_rows, prob_rows = top_i.tolist(), top_p.tolist()
        frame = pd.DataFrame(
            {
                "top1_index": [r[0] for r in index_rows],
                "top1_wnid": [wnids[r[0]] for r in index_rows],
                "top1_name": [names[r[0]] for r in index_rows],
                "top1_prob": [p[0] for p in prob_rows],
                "top5_index": index_rows,
                "top5_wnid": [[wnids[i] for i in r] for r in index_rows],
                "top5_name": [[names[i] for i in r] for r in index_rows],
                "top5_prob": prob_rows,
            }
        )
        if include_logits:
            frame["logits"] = logits.tolist()
        return frame


set_model(ImageClassifier())
