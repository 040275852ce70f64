"""The cropped JPEG decoder (imagenet_ray/data/_jpeg_crop.c): bit-identical to decoding the whole image and
slicing, for every box, scale, chroma subsampling and JPEG flavour; refuses what it must not take; and the
train kernel gives the same pixels with and without it."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from imagenet_ray.data import decode, transforms
from imagenet_ray.data.decode import decode_rgb_array, decode_rgb_crop, jpeg_header


def _jpeg(width: int, height: int, **save) -> bytes:
    """A noisy JPEG: high-frequency content, so that chroma upsampling differences at edges would show."""
    mode = save.pop("mode", "RGB")
    rng = np.random.default_rng(width * 1000 + height)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 255 // width, ys * 255 // height, (xs + ys) % 256], -1)
    pixels = np.clip(base + rng.integers(-40, 40, (height, width, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


FLAVOURS = {
    "444": dict(subsampling=0),
    "422": dict(subsampling=1),
    "420": dict(subsampling=2),
    "gray": dict(mode="L"),
    "progressive-420": dict(subsampling=2, progressive=True),
    "restart-markers-420": dict(subsampling=2, restart_marker_blocks=3),
}


def _boxes(width: int, height: int, rng: np.random.Generator, count: int):
    """Random boxes plus the edge cases: whole image, single pixels at the corners, full rows/columns."""
    yield 0, 0, width, height
    yield 0, 0, 1, 1
    yield width - 1, height - 1, 1, 1
    yield 0, height // 2, width, 1
    yield width // 2, 0, 1, height
    yield width - 17, 0, 17, height  # right edge, not iMCU-aligned
    for _ in range(count):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        yield x0, y0, int(rng.integers(1, width - x0 + 1)), int(rng.integers(1, height - y0 + 1))


def test_the_crop_decoder_is_built():
    # setup.py builds it when libjpeg's headers are present, as on every machine this project supports;
    # without it the kernel still works (whole-image decode) but loses its speed, so the suite insists.
    assert decode.CROP_DECODER_BUILT, (
        "the imagenet_ray_jpeg extension did not build: install libjpeg-turbo's headers (Debian: libjpeg-dev) "
        "and reinstall the package (pip install -e .)"
    )


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.parametrize("reduce", [1, 2, 4, 8])
def test_crop_is_bit_identical_to_the_whole_decode(flavour, reduce):
    data = _jpeg(347, 261, **FLAVOURS[flavour])  # odd sizes: partial iMCUs at the right and bottom
    whole = decode_rgb_array(data, reduce)
    h, w = whole.shape[:2]
    assert (w, h) == (-(-347 // reduce), -(-261 // reduce))
    rng = np.random.default_rng(reduce)
    for left, top, bw, bh in _boxes(w, h, rng, 40):
        crop = decode_rgb_crop(data, reduce, left, top, bw, bh)
        assert crop is not None and crop.shape == (bh, bw, 3) and crop.dtype == np.uint8
        assert np.array_equal(crop, whole[top : top + bh, left : left + bw]), (flavour, reduce, (left, top, bw, bh))


def test_only_the_boxs_rows_and_the_columns_around_it_are_decoded():
    data = _jpeg(320, 240, subsampling=2)
    buf, x, y, width, height = decode._jpeg_crop.decode_crop(data, 1, 100, 50, 160, 90)
    # rows: exactly the box's; columns: widened by one pixel each side, then left to an iMCU edge (16)
    assert (y, height) == (50, 40) and x == 96 and x + width == 161 and len(buf) == width * height * 3
    crop = decode_rgb_crop(data, 1, 100, 50, 60, 40)
    assert crop.flags.writeable and crop.shape == (40, 60, 3)
    crop[:] = 0  # the caller may write into it (the resize reads a view of it)


@pytest.mark.parametrize("kind", ["truncated", "no-eoi", "cmyk", "png", "junk", "empty"])
def test_what_the_crop_decoder_refuses_goes_to_the_whole_decode(kind, png_bytes):
    good = _jpeg(200, 150, subsampling=2)
    data = {
        "truncated": good[: len(good) // 2],  # the cut lies below a box in the top rows
        "no-eoi": good + b"trailing bytes",
        "cmyk": _jpeg(200, 150, mode="CMYK"),
        "png": png_bytes(200, 150),
        "junk": b"\xff\xd8" + b"\x00" * 100 + b"\xff\xd9",
        "empty": b"",
    }[kind]
    assert decode_rgb_crop(data, 1, 0, 0, 40, 10) is None


def test_a_box_outside_the_image_is_the_callers_bug():
    data = _jpeg(200, 150)
    with pytest.raises(ValueError, match="not inside the 200x150 image"):
        decode_rgb_crop(data, 1, 150, 0, 51, 10)
    with pytest.raises(ValueError, match="not inside the 100x75 image"):
        decode_rgb_crop(data, 2, 0, 70, 10, 6)  # inside at full size, outside at 1/2


def test_train_kernel_is_the_same_with_and_without_the_crop_decoder(jpeg_bytes):
    rng = np.random.default_rng(0)
    images = [
        _jpeg(int(w), int(h), **FLAVOURS[f])
        for w, h, f in zip(rng.integers(60, 900, 24), rng.integers(60, 900, 24), list(FLAVOURS) * 4, strict=True)
    ]
    images.append(jpeg_bytes(300, 200, "CMYK"))  # Pillow's path, unaffected
    batch = {"image": np.array(images, dtype=object), "label": np.arange(len(images))}
    assert sum(jpeg_header(d) is not None for d in images) == 24
    with_crop = transforms.train_batch(batch, 224, np.random.default_rng(7))
    without = transforms.train_batch(batch, 224, np.random.default_rng(7), transforms.KernelOptions(crop_decode=False))
    assert np.array_equal(with_crop["image"], without["image"])
    assert with_crop["decode_errors"].sum() == 0


def test_truncated_jpeg_in_a_train_batch_is_still_a_counted_decode_error():
    good = _jpeg(400, 300, subsampling=2)
    batch = {"image": np.array([good, good[: len(good) // 2]], dtype=object), "label": np.array([3, 5])}
    for seed in range(10):  # whatever box is drawn, the truncation is noticed (the EOI rule)
        out = transforms.train_batch(batch, 64, np.random.default_rng(seed))
        assert out["decode_errors"].tolist() == [0, 1] and out["label"].tolist() == [3, 3]


def test_decoding_in_threads_gives_the_same_pixels():
    # The GIL is released while libjpeg works: threads must not share any state.
    datas = [_jpeg(480, 360, subsampling=s) for s in (0, 1, 2, 2)]
    expected = [simplejpeg.decode_jpeg(d, "RGB")[30:330, 40:400] for d in datas]
    failures: list[str] = []

    def work(k: int) -> None:
        for _ in range(25):
            got = decode_rgb_crop(datas[k], 1, 40, 30, 360, 300)
            if got is None or not np.array_equal(got, expected[k]):
                failures.append(f"thread {k}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(datas))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
