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


class Quarantined(ValueError):
    """An input that must not enter the dataset; the message is the reason shown in the report."""


STORE_QUALITY = 95  # re-encoding quality for converted inputs (CMYK, PNG, ...): visually lossless


def _encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    return buf.getvalue()


def normalize_for_storage(data: bytes, max_side: int | None = None,
                          quality: int = STORE_QUALITY) -> tuple[bytes, int, int, str | None]:
    """Validate one source image and return (stored bytes, height, width, note).

    Plain JPEGs (RGB or grayscale) are kept byte-exact, so that any baseline JPEG decoder reads the
    dataset; CMYK/YCCK JPEGs and non-JPEG files (ImageNet has a PNG named .JPEG) become RGB JPEGs.
    `note` records what was done: None, "grayscale" (kept as is), "cmyk", "png", ... With `max_side`
    every image is re-encoded with its longer side at most `max_side` (aspect kept, never upscaled).
    Raises Quarantined for empty, truncated, corrupt or non-image inputs.
    """
    if not data:
        raise Quarantined("empty file")
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        img.load()  # full decode: catches truncated files that a header check misses
    except Exception as exc:
        kind = "truncated or corrupt image" if data[:2] == b"\xff\xd8" or data[:4] == b"\x89PNG" else "not an image"
        raise Quarantined(f"{kind} ({' '.join(str(exc).split())[:120]})") from None
    note: str | None = None
    if fmt == "JPEG" and img.mode in ("RGB", "L"):
        note = "grayscale" if img.mode == "L" else None
        out = data
    else:
        note = "cmyk" if img.mode in ("CMYK", "YCCK") else (fmt or "unknown").lower()
        img = img.convert("RGB")
        out = None
    if max_side is not None:
        w, h = img.size
        scale = max_side / max(w, h)
        if scale < 1:
            img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
        out = _encode_jpeg(img, quality)
    elif out is None:
        out = _encode_jpeg(img, quality)
    return out, img.height, img.width, note
