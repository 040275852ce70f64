"""The GPU decode path's functions, run on CPU tensors: same geometry as the CPU kernel."""

import io

import numpy as np
import torch
from PIL import Image

from imagenet_ray.data.device_decode import eval_batch_on_device, train_batch_on_device
from imagenet_ray.data.transforms import eval_image


def _jpeg(w, h, mode="RGB", seed=0):
    ys, xs = np.mgrid[0:h, 0:w]
    arr = np.stack([(xs * 255 / w), (ys * 255 / h), ((xs + ys) * 127 / (w + h))], -1).astype(np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_eval_on_device_matches_cpu_kernel():
    encoded = [_jpeg(500, 375), _jpeg(333, 500), _jpeg(400, 400, "L")]
    out = eval_batch_on_device(encoded, 73, 64, torch.device("cpu"))
    assert out.shape == (3, 64, 64, 3) and out.dtype == torch.uint8
    for i, data in enumerate(encoded):
        cpu = eval_image(data, 73, 64).astype(np.int16)
        diff = np.abs(out[i].numpy().astype(np.int16) - cpu)
        assert diff.mean() < 2.0, diff.mean()  # two resamplers, same source box


def test_train_on_device_shape_and_flip_randomness():
    encoded = [_jpeg(500, 375)] * 16
    rng = np.random.default_rng(0)
    out = train_batch_on_device(encoded, 32, torch.device("cpu"), rng)
    assert out.shape == (16, 32, 32, 3) and out.dtype == torch.uint8
    # different random crops of the same image give different pixels
    assert len({out[i].sum().item() for i in range(16)}) > 8
