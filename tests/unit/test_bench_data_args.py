"""`bench data` input errors are one-line UserErrors, raised before any work (no Ray needed)."""

import pytest

from imagenet_ray.bench.data import load_images, run_data_bench
from imagenet_ray.errors import UserError


def test_missing_or_empty_image_folder(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        load_images(str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match="no decodable"):
        load_images(str(tmp_path))


def test_s3_must_be_an_s3_url(tmp_path):
    with pytest.raises(UserError, match="not an s3:// URL"):
        run_data_bench(str(tmp_path), s3="/some/local/path", kernel=False, e2e=True, gpu=False)
