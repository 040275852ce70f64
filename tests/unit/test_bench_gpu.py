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


def test_gpu_check_needs_no_ray_mlflow_pydantic_or_timm(tmp_path):
    """The lent device has torch, torchvision and pyarrow only: the script must not import the rest."""
    import subprocess
    import sys

    blocked = ["ray", "mlflow", "pydantic", "timm"]
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None  # import of a None entry raises ImportError\n"
        "from imagenet_ray.bench import gpu\n"
        "sys.exit(gpu.main(['--batch', '2', '--steps', '1', '--size', '32', '--classes', '2', '--per-class', '2',\n"
        f"                  '--rounds', '1', '--out', {str(tmp_path)!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "results.json").read_text())["ceiling"]["images_per_s"] > 0
