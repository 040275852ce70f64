"""GPU benchmark for a lent H200 (`python -m imagenet_ray.bench.gpu --out DIR`); also runs on CPU (--quick).

ResNet-50 training-step images/s (eager vs torch.compile modes, several sizes), nvJPEG decode + crop on the
device, and that decode feeding the step; results.json + report.md in --out, within --budget-s. Needs only
torch, torchvision, pyarrow and Pillow (no Ray, MLflow, pydantic). What it measures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: `--help` stays fast
    import torch

DEFAULT_JPEGS = "../shared/imagenet-samples"  # the 1,000 sample JPEGs beside the checkout (shared/README.md)
ANCHORS = [
    {"what": "NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5, AMP, 224 px, 1× A100", "images_per_s": 2470},
    {"what": "MLPerf Training v4.0 ResNet-50, per H200 (MXNet + DALI)", "images_per_s": 7950},
]
STEP_GOALS = {224: 4500, 160: 7000}  # images/s on one H200
DATA_WAIT_GOAL = 0.05
SECTIONS = ("ceiling", "decode", "e2e")
QUICK = dict(arch="resnet-tiny", batch=4, sizes="32,24", warmup_steps=1, windows=2, window_steps=2, modes="eager")
PRIOR_STEP_S = 0.5  # budget guess for one step before any step was timed
PRIOR_DECODE_IMAGES_PER_S = 1000.0
AUTOTUNE_COMPILE_FACTOR = 3.0  # max-autotune compiles take several times the default's


@dataclass
class Budget:
    """Skips a measurement whose estimate exceeds the time left, and records what it skipped."""

    total_s: float
    start: float = field(default_factory=time.perf_counter)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, what: str, estimate_s: float) -> bool:
        left = self.total_s - self.elapsed()
        if estimate_s <= left:
            return True
        self.skipped.append({"what": what, "estimate_s": round(estimate_s, 1), "left_s": round(left, 1)})
        print(f"[{self.elapsed():6.0f} s] skipped {what}: needs ~{estimate_s:.0f} s, {left:.0f} s left", flush=True)
        return False


def error_entry(exc: BaseException) -> dict[str, Any]:
    return {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-3000:]}


def stand_in_for_missing_simplejpeg() -> bool:
    """data/decode.py imports simplejpeg at the top for the CPU kernel; the device machine lacks it and
    the GPU path never calls it, so a missing one becomes a module that fails only if used."""
    import types

    try:
        import simplejpeg  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("simplejpeg")

        def missing(name: str) -> Any:
            raise AttributeError(f"simplejpeg is not installed here (simplejpeg.{name})")

        stand_in.__dict__["__getattr__"] = missing  # PEP 562: attribute access raises, import works
        sys.modules["simplejpeg"] = stand_in
        return True
    return False


class GpuBench:
    """Runs the planned measurements in priority order, each guarded and within the budget, saving the
    results after each one (a run cut short still leaves them)."""

    def __init__(self, args: argparse.Namespace, device: torch.device, results: dict[str, Any]) -> None:
        from imagenet_ray.bench.gpu_step import Timing

        self.args, self.device, self.results = args, device, results
        self.budget = Budget(args.budget_s)
        results["skipped"] = self.budget.skipped
        self.timing = Timing(args.warmup_steps, args.windows, args.window_steps)
        self.decode_timing = Timing(2, args.windows, max(1, args.decode_images // args.decode_batch))
        self.step_s: dict[int, float] = {}  # measured seconds per step, by size
        self.compile_s: dict[str, float] = {}  # first-step seconds of compiled modes
        self.encoded: list[bytes] | None = None
        self.labels: list[int] = []
        self.read_cpu_s_per_image: float | None = None

    def log(self, text: str) -> None:
        print(f"[{self.budget.elapsed():6.0f} s] {text}", flush=True)

    def save(self) -> None:
        from imagenet_ray.bench.gpu_report import markdown_report

        self.results["elapsed_s"] = round(self.budget.elapsed(), 1)
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(self.results, indent=1))
        (out / "report.md").write_text(markdown_report(self.results))

    def guarded(self, section: str, key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        from imagenet_ray.bench.gpu_step import release_device_memory

        try:
            entry = fn()
        except Exception as exc:  # one failing measurement (a compile, an OOM) must not stop the others
            entry = error_entry(exc)
            release_device_memory(self.device)
        self.record(section, key, entry)
        return entry

    def record(self, section: str, key: str, entry: dict[str, Any]) -> None:
        if "error" in entry:
            self.log(f"{section} {key}: FAILED {entry['error'].splitlines()[0]}")
        self.results.setdefault(section, {})[key] = entry
        self.save()

    # Estimates for the budget: measured step time scaled ∝ pixels, measured compile time.
    def estimate_step_s(self, size: int) -> float:
        if not self.step_s:
            return PRIOR_STEP_S
        known, seconds = max(self.step_s.items())
        return seconds * (size / known) ** 2

    def estimate_compile_s(self, mode: str) -> float:
        from imagenet_ray.bench.gpu_step import AUTOTUNE_MODES, EAGER

        if mode == EAGER:
            return 0.0
        if mode in self.compile_s:
            return self.compile_s[mode]
        plain = max(self.compile_s.values(), default=self.args.compile_estimate_s)
        return plain * AUTOTUNE_COMPILE_FACTOR if mode in AUTOTUNE_MODES else plain

    def run(self) -> None:
        from imagenet_ray.bench.gpu_step import AUTOTUNE_MODES, EAGER

        a = self.args
        modes, sizes = a.modes.split(","), [int(s) for s in a.sizes.split(",")]
        sections = set(a.sections.split(","))
        if sections & {"decode", "e2e"}:
            self.prepare_images()
        plan = [(EAGER, s) for s in sizes if EAGER in modes]
        for s in sizes:
            plan += [(m, s) for m in modes if m != EAGER and (m not in AUTOTUNE_MODES or s == sizes[0])]
        decode_done = "decode" not in sections
        for mode, size in plan:
            if mode != EAGER and not decode_done:
                self.decode_section(sizes)  # cheap: before the first compile
                decode_done = True
            fed = "e2e" in sections and mode in a.e2e_modes.split(",") and size == sizes[0]
            if "ceiling" in sections or fed:
                self.step_task(mode, size, "ceiling" in sections, fed)
        if not decode_done:
            self.decode_section(sizes)
        self.summarise(sizes)
        self.results["finished"] = True
        self.save()

    def prepare_images(self) -> None:
        from imagenet_ray.bench.gpu_feed import (
            describe_images,
            list_jpegs,
            prepare_shards,
            read_shards,
            synthetic_jpegs,
        )

        def prepare() -> dict[str, Any]:
            with tempfile.TemporaryDirectory() as tmp:
                work = Path(tmp)
                if self.args.synthetic:
                    jpegs, source = synthetic_jpegs(work / "synthetic", self.args.synthetic), "synthetic"
                else:
                    jpegs, source = list_jpegs(Path(self.args.jpegs)), str(Path(self.args.jpegs).resolve())
                if self.args.max_images:
                    jpegs = jpegs[: self.args.max_images]
                t0 = time.perf_counter()
                self.encoded, self.labels, read_cpu_s = read_shards(prepare_shards(jpegs, work))
                prepare_s = time.perf_counter() - t0
            self.read_cpu_s_per_image = read_cpu_s / len(self.encoded)
            entry = {"source": source, **describe_images(self.encoded), "prepare_s": round(prepare_s, 1)}
            entry["parquet_read_cpu_ms_per_image"] = round(self.read_cpu_s_per_image * 1e3, 4)
            return entry

        entry = self.guarded("data", "images", prepare)
        if "error" not in entry:
            self.log(f"images: {entry['count']} from {entry['source']}, mean {entry['mean_kb']} KB")

    def decode_section(self, sizes: list[int]) -> None:
        from imagenet_ray.bench.gpu_feed import measure_decode

        encoded = self.encoded
        if encoded is None:
            self.results["decode"] = {"error": "no images (see data.images)"}
            return
        for size in [None, *sizes]:
            key = "decode_only" if size is None else f"rrc@{size}"
            runs = self.decode_timing.steps * self.args.decode_batch
            if self.budget.allows(f"decode {key}", runs / PRIOR_DECODE_IMAGES_PER_S):
                measure = functools.partial(
                    measure_decode, self.device, encoded, self.args.decode_batch, size, self.decode_timing
                )
                entry = self.guarded("decode", key, measure)
                if "error" not in entry:
                    self.log(f"decode {key}: {entry['images_per_s']:,.0f} img/s")

    def step_task(self, mode: str, size: int, ceiling: bool, fed: bool) -> None:
        from imagenet_ray.bench.gpu_step import BenchStep, release_device_memory

        key = f"{mode}@{size}"
        step_s = self.estimate_step_s(size)
        estimate = self.estimate_compile_s(mode) + self.timing.steps * step_s * (int(ceiling) + 2 * int(fed)) + 5
        if not self.budget.allows(f"training step {key}" + (" + end to end" if fed else ""), estimate):
            return
        t0 = time.perf_counter()
        try:
            step = BenchStep(self.args.arch, mode, self.device)
        except Exception as exc:
            self.record("training_step", key, error_entry(exc))
            return
        try:
            if ceiling:
                entry = self.guarded("training_step", key, lambda: self.measure_ceiling(step, size))
                if "error" in entry:
                    return
                self.log(
                    f"step {key}: {entry['images_per_s']:,.0f} img/s (first step {entry['first_step_s']} s, "
                    f"{time.perf_counter() - t0:.0f} s in all)"
                )
            if fed:
                entry = self.guarded("end_to_end", key, lambda: self.measure_fed(step, size))
                if "error" not in entry:
                    self.log(f"end to end {key}: {entry['images_per_s']:,.0f} img/s, wait {entry['data_wait_frac']}")
        finally:
            step.close()
            release_device_memory(self.device)

    def measure_ceiling(self, step: Any, size: int) -> dict[str, Any]:
        from imagenet_ray.bench.gpu_step import EAGER, measure_step

        entry = measure_step(step, self.args.batch, size, self.timing)
        self.step_s[size] = min(self.step_s.get(size, 1e9), self.args.batch / entry["images_per_s"])
        if step.mode != EAGER:
            self.compile_s[step.mode] = entry["first_step_s"]
        if size in STEP_GOALS:
            entry["goal_images_per_s"] = STEP_GOALS[size]
            entry["ratio_to_goal"] = round(entry["images_per_s"] / STEP_GOALS[size], 3)
        return entry

    def measure_fed(self, step: Any, size: int) -> dict[str, Any]:
        from imagenet_ray.bench.gpu_feed import measure_fed_step

        if self.encoded is None:
            raise RuntimeError("no images (see data.images)")
        entry = measure_fed_step(step, self.encoded, self.labels, self.args.batch, size, self.timing)
        entry["data_wait_goal"] = DATA_WAIT_GOAL
        entry["data_wait_goal_met"] = entry["data_wait_frac"] < DATA_WAIT_GOAL
        synthetic = self.results.get("training_step", {}).get(f"{step.mode}@{size}", {})
        if "images_per_s" in synthetic:
            # The share of the step's throughput that feeding costs (decode shares the GPU with it).
            entry["slowdown_vs_ceiling"] = round(1 - entry["images_per_s"] / synthetic["images_per_s"], 4)
        if self.read_cpu_s_per_image is not None:
            per_image = self.read_cpu_s_per_image
            entry["parquet_read_cores_at_this_rate"] = round(per_image * entry["images_per_s"], 3)
            entry["parquet_read_cores_at_goal"] = round(per_image * STEP_GOALS.get(size, entry["images_per_s"]), 3)
        return entry

    def summarise(self, sizes: list[int]) -> None:
        """`ceiling` and `gpu_decode`, as `imagenet-ray plan --gpu-json` reads them (capacity/rates.py):
        the best mode that training can use (model.compile: eager or default) at the first size."""
        steps = self.results.get("training_step", {})
        usable = [steps.get(f"{m}@{sizes[0]}", {}) for m in ("eager", "default")]
        usable = [e for e in usable if "images_per_s" in e]
        if usable:
            best = max(usable, key=lambda e: e["images_per_s"])
            self.results["ceiling"] = {k: best[k] for k in ("images_per_s", "size", "batch", "mode")}
        decode = self.results.get("decode", {}).get(f"rrc@{sizes[0]}", {})
        if "images_per_s" in decode:
            self.results["gpu_decode"] = {k: decode[k] for k in ("images_per_s", "batch", "size")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from imagenet_ray.bench.gpu_step import ARCHS, COMPILE_MODES, EAGER

    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--out", required=True, help="folder for results.json and report.md")
    p.add_argument("--jpegs", default=DEFAULT_JPEGS, help=f"folder of JPEGs (default {DEFAULT_JPEGS})")
    p.add_argument("--synthetic", type=int, default=0, help="use N generated JPEGs instead of --jpegs")
    p.add_argument("--max-images", type=int, default=0, help="use at most N of the JPEGs (0: all)")
    p.add_argument("--arch", choices=ARCHS, default="resnet50", help="resnet-tiny/probe: for CPU tests")
    p.add_argument(
        "--modes",
        default="eager,default,reduce-overhead,max-autotune-no-cudagraphs",
        help="eager and torch.compile modes, in priority order (max-autotune* at the first size only)",
    )
    p.add_argument("--sizes", default="224,160,192", help="square crop sizes, in priority order")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--windows", type=int, default=5, help="timed windows; the median is reported")
    p.add_argument("--window-steps", type=int, default=20, help="training steps per window")
    p.add_argument("--decode-batch", type=int, default=256)
    p.add_argument("--decode-images", type=int, default=1024, help="images per decode window")
    p.add_argument("--e2e-modes", default="eager,reduce-overhead", help="modes also timed fed by GPU decode")
    p.add_argument("--sections", default="ceiling,decode,e2e", help=f"any of {', '.join(SECTIONS)}")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip what would end after this")
    p.add_argument("--compile-estimate-s", type=float, default=120.0, help="budget guess for the first compile")
    p.add_argument("--quick", action="store_true", help="tiny model, batch and sizes (CPU tests)")
    if "--quick" in (argv if argv is not None else sys.argv[1:]):
        p.set_defaults(**QUICK, decode_batch=4, decode_images=8)
    args = p.parse_args(argv)
    for option, value, known in (
        ("--modes", args.modes, (EAGER, *COMPILE_MODES)),
        ("--e2e-modes", args.e2e_modes, (EAGER, *COMPILE_MODES)),
        ("--sections", args.sections, SECTIONS),
    ):
        unknown = set(value.split(",")) - set(known)
        if unknown:
            p.error(f"{option}: unknown {', '.join(sorted(unknown))} (known: {', '.join(known)})")
    return args


def environment(device: torch.device) -> dict[str, Any]:
    import torch
    import torchvision

    return {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,  # the project's default (off)
    }


def main(argv: list[str] | None = None) -> int:
    stand_in = stand_in_for_missing_simplejpeg()  # before any project module that imports data/decode.py
    args = parse_args(argv)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[str, Any] = {
        **environment(device),
        "simplejpeg": "stand-in (not installed)" if stand_in else "installed",
        "argv": sys.argv[1:] if argv is None else argv,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "anchors": ANCHORS,
        "goals": {"training_step_images_per_s": STEP_GOALS, "data_wait_frac": DATA_WAIT_GOAL},
        "finished": False,
    }
    bench = GpuBench(args, device, results)
    bench.log(f"device {results['device']}, torch {results['torch']}, budget {args.budget_s:.0f} s")
    bench.run()
    bench.log(f"done: {Path(args.out) / 'results.json'}, {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
