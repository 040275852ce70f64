"""Robust image decode: any JPEG/PNG (gray, CMYK, palette, RGBA) → RGB, as a PIL image or an array.

Fast path: libjpeg-turbo (simplejpeg; crops through the small C extension _jpeg_crop.c, bit-identical).
Everything else goes through Pillow, which decides what is undecodable (DecodeError).
"""

from __future__ import annotations

import io
from typing import cast

import numpy as np
import simplejpeg
from PIL import Image

# Colour spaces that libjpeg-turbo converts to RGB exactly as Pillow does (CMYK/YCCK differ: Adobe's
# inverted CMYK is Pillow's business).
_FAST_COLORSPACES = frozenset({"YCbCr", "Gray", "RGB"})
DCT_FACTORS = (1, 2, 4, 8)  # DCT-domain downscale factors used (others are slower than a full decode)


# The one compiled part (setup.py, source in _jpeg_crop.c). A top-level module, not one inside this
# package: a Ray job's `--working-dir .` upload shadows the installed package with a copy of the
# sources, which (like git) leaves out built files, so the installed extension is found only under a
# name of its own. Optional: an install without libjpeg's headers still works, decoding whole images.
try:
    import imagenet_ray_jpeg as _jpeg_crop
except ImportError:  # pragma: no cover - the test suite requires the extension (test_crop_decode.py)
    _jpeg_crop = None

CROP_DECODER_BUILT = _jpeg_crop is not None
CROP_DECODER_TAG = "imagenet_ray.crop_decoder"  # MLflow tag of a training run: crop_decoder_description()


def crop_decoder_description() -> str:
    """What decodes train crops here: 'libjpeg-turbo 2.1.5 (crop decode)' or the whole-image fallback."""
    if _jpeg_crop is None:
        return "not built: whole-image decode (simplejpeg)"
    return f"libjpeg-turbo {_jpeg_crop.LIBJPEG_TURBO_VERSION} (crop decode)"


class DecodeError(ValueError):
    """The bytes are not a decodable image."""


def decode_rgb(data: bytes) -> Image.Image:
    """Decode `data` to an RGB image; raise DecodeError for anything that is not a whole image."""
    if not data:
        raise DecodeError("empty image bytes")
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ...) for bad input
        raise DecodeError(f"cannot decode image: {exc}") from None
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def jpeg_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) when the fast decoder takes `data` (a JPEG in YCbCr/RGB/gray), else None."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except Exception:
        return None
    return (width, height) if colorspace in _FAST_COLORSPACES else None


def decode_rgb_array(data: bytes, reduce: int = 1, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode `data` to a writable (H, W, 3) uint8 RGB array; DecodeError when it is not an image.

    `reduce` (1, 2, 4 or 8) asks for a DCT-domain downscale: the result is then ceil(W / reduce) x
    ceil(H / reduce), but only on the fast path; the Pillow fallback returns the full size. Callers map
    coordinates with the returned shape. `size`: what jpeg_header(data) returned, if the caller has it.
    """
    if reduce not in DCT_FACTORS:
        raise ValueError(f"reduce must be one of {DCT_FACTORS}, not {reduce}")
    if size is None:
        size = jpeg_header(data)
    if size is not None:
        try:
            if reduce == 1:
                return cast(np.ndarray, simplejpeg.decode_jpeg(data, "RGB"))
            width, height = size
            return cast(
                np.ndarray,
                simplejpeg.decode_jpeg(data, "RGB", min_width=-(-width // reduce), min_height=-(-height // reduce)),
            )
        except Exception:
            pass  # strict mode refused it (truncated, recoverable warnings, ...): Pillow decides
    arr = np.asarray(decode_rgb(data))
    return arr if arr.flags.writeable else arr.copy()


def decode_rgb_crop(data: bytes, reduce: int, left: int, top: int, width: int, height: int) -> np.ndarray | None:
    """Decode only the box (left, top, width, height) of a JPEG decoded at 1/`reduce` size (box in
    those scaled coordinates) → a writable (height, width, 3) uint8 RGB view, bit-identical to the same
    box of decode_rgb_array(data, reduce). None when the crop decoder is not built or does not take
    the data (corrupt, truncated, CMYK, not a JPEG): the caller then decodes the whole image, whose
    fallback decides what is undecodable."""
    if _jpeg_crop is None:
        return None
    try:
        buf, x, _, region_w, region_h = _jpeg_crop.decode_crop(data, reduce, left, top, left + width, top + height)
    except _jpeg_crop.JpegError:  # (a box outside the image is a ValueError: the caller's bug, raised)
        return None
    region = np.frombuffer(buf, np.uint8).reshape(region_h, region_w, 3)  # a bytearray: writable
    return region[:, left - x : left - x + width]


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header only, without decoding pixels."""
    size = jpeg_header(data)
    if size is not None:
        return size
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception as exc:
        raise DecodeError(f"cannot read image header: {exc}") from None
