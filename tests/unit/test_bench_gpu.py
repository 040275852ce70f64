"""The GPU check script (imagenet_ray/bench/gpu.py) runs end to end on CPU with tiny settings, so the
one prepared for a lent H200 is known to work."""

import json

import pytest

from imagenet_ray.bench import gpu

pytestmark = pytest.mark.slow


def test_gpu_check_runs_on_cpu(tmp_path):
    assert (
        gpu.main(
            [
                "--batch",
                "4",
                "--steps",
                "2",
                "--size",
                "32",
                "--classes",
                "2",
                "--per-class",
                "4",
                "--rounds",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["device"] == "cpu"
    for section in ("ceiling", "gpu_decode", "end_to_end_gpu_decode"):
        assert res[section]["images_per_s"] > 0, section
    assert 0 <= res["end_to_end_gpu_decode"]["data_wait_frac"] <= 1
