"""The GPU benchmark (imagenet_ray/bench/gpu.py) runs every section on CPU with tiny settings, so the run
prepared for a lent H200 is known to work. torch.compile of even the tiny ResNet takes ~1 min on this
CPU (cold cache): the ResNet runs eager here and the compile path runs on the `probe` model."""

import json
import subprocess
import sys

import pytest
import torch

from imagenet_ray.bench import gpu
from imagenet_ray.capacity import rates

pytestmark = pytest.mark.slow

QUICK = ["--quick", "--synthetic", "6", "--sizes", "32,24"]


def _results(out):
    return json.loads((out / "results.json").read_text())


def test_every_section_runs_on_cpu_and_writes_json_and_markdown(tmp_path):
    assert gpu.main([*QUICK, "--out", str(tmp_path)]) == 0
    res = _results(tmp_path)
    assert res["device"] == "cpu" and res["finished"] and not res["skipped"]
    for key in ("eager@32", "eager@24"):
        step = res["training_step"][key]
        assert step["images_per_s"] > 0 and len(step["window_images_per_s"]) == 2, key
    assert set(res["decode"]) == {"decode_only", "rrc@32", "rrc@24"}
    assert all(d["images_per_s"] > 0 and d["cpu_cores_busy"] >= 0 for d in res["decode"].values())
    fed = res["end_to_end"]["eager@32"]  # the e2e modes run at the first size only
    assert 0 <= fed["data_wait_frac"] <= 1 and fed["images_per_s"] > 0 and fed["process_cpu_cores"] >= 0
    assert res["data"]["images"]["count"] == 6
    assert [a["images_per_s"] for a in res["anchors"]] == [2470, 7950]
    report = (tmp_path / "report.md").read_text()
    assert "eager@32" in report and "2,470 img/s" in report and "rrc@24" in report

    # The summary keys are what `imagenet-ray plan --gpu-json` reads.
    train, decode = rates.gpu_rates_from_json(str(tmp_path / "results.json"), "resnet50", 32)
    assert train.value == res["ceiling"]["images_per_s"] and res["ceiling"]["mode"] == "eager"
    assert decode is not None and decode.value == res["decode"]["rrc@32"]["images_per_s"]


def test_compile_with_cuda_graph_mode_runs_on_cpu_and_reports_compile_time(tmp_path):
    """reduce-overhead on the probe model: compile time kept out of the windows, counters recorded (on
    CPU inductor skips CUDA graphs, so cudagraph_skips counts that)."""
    argv = ["--quick", "--arch", "probe", "--modes", "reduce-overhead", "--sizes", "16", "--sections", "ceiling"]
    assert gpu.main([*argv, "--out", str(tmp_path)]) == 0
    step = _results(tmp_path)["training_step"]["reduce-overhead@16"]
    assert step["images_per_s"] > 0 and step["warmup_steps"] >= 3
    assert step["first_step_s"] > 0 and {"cudagraph_skips", "fxgraph_cache_miss"} <= set(step)


def test_a_failing_compile_is_recorded_and_the_rest_still_runs(tmp_path, monkeypatch):
    def broken_compile(model, **kwargs):
        def fails(*args):
            raise RuntimeError("inductor exploded")

        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    argv = [*QUICK, "--arch", "probe", "--modes", "eager,default", "--e2e-modes", "default", "--out", str(tmp_path)]
    assert gpu.main(argv) == 0
    res = _results(tmp_path)
    assert "inductor exploded" in res["training_step"]["default@32"]["error"]
    assert res["training_step"]["eager@24"]["images_per_s"] > 0
    assert res["decode"]["rrc@32"]["images_per_s"] > 0 and res["finished"]
    assert "end_to_end" not in res  # its step failed first
    assert "error: RuntimeError: inductor exploded" in (tmp_path / "report.md").read_text()


def test_the_time_budget_skips_measurements_and_says_which(tmp_path):
    assert gpu.main([*QUICK, "--budget-s", "0", "--out", str(tmp_path)]) == 0
    res = _results(tmp_path)
    skipped = [s["what"] for s in res["skipped"]]
    assert "training step eager@32 + end to end" in skipped and "decode rrc@24" in skipped
    assert "training_step" not in res and res["finished"]
    assert "## Skipped (time budget)" in (tmp_path / "report.md").read_text()


def test_a_missing_jpeg_folder_fails_the_data_sections_only(tmp_path):
    argv = ["--quick", "--sizes", "16", "--jpegs", str(tmp_path / "none"), "--out", str(tmp_path / "out")]
    assert gpu.main(argv) == 0
    res = _results(tmp_path / "out")
    assert "no JPEG folder" in res["data"]["images"]["error"]
    assert res["training_step"]["eager@16"]["images_per_s"] > 0
    assert "error" in res["end_to_end"]["eager@16"] and "error" in res["decode"]


def test_runs_without_ray_mlflow_pydantic_timm_or_simplejpeg(tmp_path):
    """The lent machine has torch, torchvision, pyarrow and Pillow (no simplejpeg, no built extension):
    the script and all it imports must work without the rest."""
    blocked = ["ray", "mlflow", "pydantic", "timm", "simplejpeg", "imagenet_ray_jpeg"]
    code = (
        "import importlib.abc, sys\n"
        "class Blocked(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Blocked())\n"
        "from imagenet_ray.bench import gpu\n"
        f"code = gpu.main(['--quick', '--synthetic', '4', '--sizes', '16', '--out', {str(tmp_path)!r}])\n"
        f"loaded = [m for m in sys.modules if m.split('.')[0] in {blocked[:-2]!r} and sys.modules[m] is not None]\n"
        "assert not loaded, loaded\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = _results(tmp_path)
    assert res["simplejpeg"] == "stand-in (not installed)"
    assert res["training_step"]["eager@16"]["images_per_s"] > 0 and res["end_to_end"]["eager@16"]["images_per_s"] > 0
