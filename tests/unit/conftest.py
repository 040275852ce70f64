"""Shared helpers for the unit layer: small synthetic images, encoded in memory.

Unit tests never start Ray or servers and generate all data in tmp_path.
"""

from __future__ import annotations

import io
import os

# No MLflow telemetry from unit tests (the tracking tests use a local sqlite store only).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import numpy as np
import pytest
from PIL import Image


def smooth_rgb(width: int, height: int) -> np.ndarray:
    """A smooth, non-constant (height, width, 3) uint8 image (no high-frequency content)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 128 + 100 * np.sin(xs / 23.0) * np.cos(ys / 31.0)
    g = 128 + 90 * np.cos(xs / 17.0 + ys / 29.0)
    b = xs / max(1, width) * 200 + ys / max(1, height) * 50
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture
def smooth_image():
    return smooth_rgb


@pytest.fixture
def encode_image():
    """encode_image(pil_image, 'PNG' | 'JPEG', **save_kwargs) → bytes."""
    return encode


@pytest.fixture
def jpeg_bytes():
    """jpeg_bytes(width, height, mode='RGB') → bytes of a smooth JPEG in that mode (RGB, L, CMYK)."""

    def make(width: int = 120, height: int = 90, mode: str = "RGB", quality: int = 92) -> bytes:
        img = Image.fromarray(smooth_rgb(width, height))
        if mode != "RGB":
            img = img.convert(mode)
        return encode(img, "JPEG", quality=quality)

    return make


@pytest.fixture
def png_bytes():
    def make(width: int = 120, height: int = 90, mode: str = "RGB") -> bytes:
        img = Image.fromarray(smooth_rgb(width, height))
        if mode != "RGB":
            img = img.convert(mode)
        return encode(img, "PNG")

    return make


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: a deselected test starts no install
def pytest_collection_modifyitems(config, items):
    """The Dockerfile's install step starts now, in the background; its test runs last (test_docker_image.py)."""
    import test_docker_image

    chosen = [item for item in items if item.name == test_docker_image.INSTALL_TEST]
    if not chosen or config.option.collectonly:
        return
    items[:] = [item for item in items if item.name != test_docker_image.INSTALL_TEST] + chosen
    test_docker_image.start_install_in_background()
