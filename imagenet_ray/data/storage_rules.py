"""Prepare's storage rules: which source images enter a prepared dataset, and as which bytes.

Plain JPEGs are kept byte-exact; CMYK/YCCK JPEGs and non-JPEG files become RGB JPEGs; broken inputs are
Quarantined (the reason goes into prepare's report).
"""

from __future__ import annotations

import io

from PIL import Image

from imagenet_ray.errors import describe_error


class Quarantined(ValueError):
    """An input that must not enter the dataset; the message is the reason shown in the report."""


STORE_QUALITY = 95  # re-encoding quality for converted inputs (CMYK, PNG, ...): visually lossless


def _encode_jpeg(img: Image.Image, quality: int, subsampling: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


def normalize_for_storage(
    data: bytes, max_side: int | None = None, quality: int = STORE_QUALITY
) -> tuple[bytes, int, int, str | None]:
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
        img: Image.Image = Image.open(io.BytesIO(data))
        fmt = img.format
        img.load()  # full decode: catches truncated files that a header check misses
    except Exception as exc:
        kind = "truncated or corrupt image" if data[:2] == b"\xff\xd8" or data[:4] == b"\x89PNG" else "not an image"
        raise Quarantined(f"{kind} ({describe_error(exc, 120)})") from None
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
        # 4:2:0 chroma, as most ImageNet originals: it decodes faster than 4:4:4 (docs/benchmarks.md)
        out = _encode_jpeg(img, quality, subsampling=2)
    elif out is None:
        out = _encode_jpeg(img, quality, subsampling=0)  # a conversion keeps full chroma resolution
    return out, img.height, img.width, note
