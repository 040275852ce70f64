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


def test_copy_to_an_unreachable_s3_endpoint_is_one_line(tmp_path, monkeypatch):
    from imagenet_ray.bench.data import copy_tree
    from imagenet_ray.services.ports import free_ports

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("shard")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")  # nothing listens there
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    # One attempt: the default 10 (storage.py) would spend ~80 s of backoff on a port nobody listens on.
    monkeypatch.setenv("IMAGENET_RAY_S3_MAX_ATTEMPTS", "1")
    with pytest.raises(UserError, match="s3://bucket/prefix: cannot connect") as err:
        copy_tree(str(tmp_path / "src"), "s3://bucket/prefix")
    assert "\n" not in str(err.value)


def test_kernel_processes_must_be_positive(tmp_path):
    with pytest.raises(UserError, match="--kernel-processes 0: must be at least 1"):
        run_data_bench(str(tmp_path), kernel_processes=0, kernel=True, e2e=False, gpu=False)


def test_kernel_process_summary_is_per_process_and_median():
    from imagenet_ray.bench.data import summarise_kernel_processes

    def run(train_ratio, ceiling_ratio, eval_ratio, ours, ref):
        variant = {
            "train": {
                "ours_vs_torchvision": train_ratio,
                "ours_vs_ceiling": ceiling_ratio,
                "ours": {"best": ours},
                "torchvision": {"best": ref},
            },
            "eval": {"ours_vs_torchvision": eval_ratio},
        }
        return {"variants": {"original": variant}}

    summary = summarise_kernel_processes(
        [run(4.1, 0.5, 2.0, 2700, 660), run(3.5, 0.6, 2.4, 2650, 760), run(4.6, 0.4, 2.2, 2750, 600)]
    )
    assert summary["count"] == 3
    v = summary["variants"]["original"]
    assert v["train_ours_vs_torchvision"] == {"per_process": [4.1, 3.5, 4.6], "median": 4.1}
    assert v["train_ours_vs_ceiling"]["median"] == 0.5 and v["eval_ours_vs_torchvision"]["median"] == 2.2
    assert v["train_torchvision_best"] == {"per_process": [660, 760, 600], "median": 660}


def test_kernel_core_must_be_one_of_this_process_cores(tmp_path):
    import os

    bad = max(os.sched_getaffinity(0)) + 1
    with pytest.raises(UserError, match=f"--core {bad}: not one of the cores"):
        run_data_bench(str(tmp_path), core=bad, kernel=True, e2e=False, gpu=False)
