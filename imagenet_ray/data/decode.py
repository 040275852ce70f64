"""Robust image decode: any JPEG/PNG (gray, CMYK, palette, RGBA) → RGB PIL image.

Pillow with libjpeg-turbo is the baseline decoder for the walking skeleton; the fast path is chosen
by measurement in the data-pipeline work (see docs/benchmarks.md).
"""

from __future__ import annotations

import io

from PIL import Image


class DecodeError(ValueError):
    """The bytes are not a decodable image."""


def decode_rgb(data: bytes) -> Image.Image:
    """Decode `data` to an RGB image; raise DecodeError for anything that is not a whole image."""
    if not data:
        raise DecodeError("empty image bytes")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ...) for bad input
        raise DecodeError(f"cannot decode image: {exc}") from None
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header only, without decoding pixels."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception as exc:
        raise DecodeError(f"cannot read image header: {exc}") from None
