"""Prepare's storage rules: what is kept byte-exact, what is converted, what is quarantined (no Ray)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from imagenet_ray.data.storage_rules import Quarantined, normalize_for_storage


def _encoded(mode: str, fmt: str, size: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_plain_jpegs_are_kept_byte_exact():
    for mode, note in (("RGB", None), ("L", "grayscale")):
        data = _encoded(mode, "JPEG")
        assert normalize_for_storage(data) == (data, 48, 64, note)


def test_cmyk_jpegs_and_pngs_become_rgb_jpegs():
    for mode, fmt, note in (("CMYK", "JPEG", "cmyk"), ("RGB", "PNG", "png")):
        out, height, width, got = normalize_for_storage(_encoded(mode, fmt))
        assert got == note and (height, width) == (48, 64)
        with Image.open(io.BytesIO(out)) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (64, 48)


def test_max_side_reencodes_every_image_without_upscaling():
    out, height, width, _ = normalize_for_storage(_encoded("RGB", "JPEG", (400, 300)), max_side=100, quality=80)
    assert (height, width) == (75, 100)
    small = _encoded("RGB", "JPEG", (40, 30))
    out, height, width, _ = normalize_for_storage(small, max_side=100)
    assert (height, width) == (30, 40) and out != small  # re-encoded, not resized


@pytest.mark.parametrize(
    "data, reason", [(b"", "empty file"), (b"hello", "not an image"), (None, "truncated or corrupt image")]
)
def test_broken_inputs_are_quarantined_with_a_reason(data, reason):
    if data is None:
        full = _encoded("RGB", "JPEG")
        data = full[: len(full) // 2]
    with pytest.raises(Quarantined, match=reason):
        normalize_for_storage(data)
