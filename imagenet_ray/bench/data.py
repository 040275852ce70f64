"""`imagenet-ray bench data`: how fast the data pipeline is, against torchvision's, in one run.

Sections: 1. kernel (per core, ours vs torchvision vs decode-only, fresh processes), 2. e2e (Ray Data → Ray Train
vs DataLoader(ImageFolder), same cores), 3. gpu (nvJPEG), 4. variants (bytes and kernel rates per stored max side ×
quality: bench/variants.py), 5. scaling (cores, shards, prefetch: bench/scaling.py). Method: docs/benchmarks.md."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

from imagenet_ray.bench import peers as peer_readers
from imagenet_ray.bench import scaling as sweeps
from imagenet_ray.bench import variants as stored_variants
from imagenet_ray.errors import UserError
from imagenet_ray.runtime import start_local_ray, temporary_env

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
DEFAULT_SHARD_MB = 128.0  # = PrepareOptions.shard_mb: the bench's read tasks are the size the real dataset's are
WNID_PREFIX = re.compile(r"^(n\d{8})_")
FALLBACK_WNID = "n00000000"  # class of images whose names do not start with a wnid
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
Item = TypeVar("Item")  # what `interleaved` times its sides on: image bytes, or image indices (variants)


# --- inputs ----------------------------------------------------------------------------------------------------


def load_images(folder: str, limit: int | None = None) -> list[tuple[Path, bytes]]:
    """(path, bytes) of the images in `folder` (not recursive), sorted by name; Pillow must decode them."""
    from imagenet_ray.data.decode import DecodeError, decode_rgb

    if not Path(folder).is_dir():
        raise UserError(f"bench data --images {folder}: not a folder")
    paths = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    out = []
    for p in paths:
        data = p.read_bytes()
        try:
            decode_rgb(data)
        except DecodeError:
            log.warning(f"bench data: skipping {p.name}: not decodable")
            continue
        out.append((p, data))
        if limit and len(out) >= limit:
            break
    if not out:
        raise UserError(f"bench data --images {folder}: no decodable .jpeg/.jpg/.png images")
    return out


def reencode(datas: Sequence[bytes], max_side: int, quality: int) -> list[bytes]:
    """The re-encoded variant, exactly as `prepare --max-side N --quality Q` stores it."""
    from imagenet_ray.data.storage_rules import normalize_for_storage

    return [normalize_for_storage(d, max_side=max_side, quality=quality)[0] for d in datas]


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for mod in ("numpy", "PIL", "simplejpeg", "torch", "torchvision", "ray", "cv2", "turbojpeg"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    with contextlib.suppress(Exception):
        from PIL import features

        versions["libjpeg-turbo (Pillow)"] = features.version_feature("libjpeg_turbo")
    from imagenet_ray.data.decode import crop_decoder_description

    versions["train decoder"] = crop_decoder_description()  # without the C extension: whole images (slower)
    return {
        "nproc": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "versions": versions,
    }


@contextlib.contextmanager
def pinned(cores: set[int], threads: int = 1) -> Iterator[None]:
    """Pin this process (and the children it starts meanwhile) to `cores`; torch/OpenCV to `threads`."""
    import torch

    old_affinity, old_threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:
        cv2.setNumThreads(0 if threads == 1 else threads)
    try:
        yield
    finally:
        os.sched_setaffinity(0, old_affinity)
        torch.set_num_threads(old_threads)


# --- section 1: per-core kernel ---------------------------------------------------------------------------------


def reference_train_transform(crop: int) -> Callable[[Any], Any]:
    import torchvision.transforms as T

    return cast(
        Callable[[Any], Any],
        T.Compose([T.RandomResizedCrop(crop), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]),
    )


def reference_eval_transform(resize: int, crop: int) -> Callable[[Any], Any]:
    import torchvision.transforms as T

    return cast(
        Callable[[Any], Any], T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), T.Normalize(MEAN, STD)])
    )


def decoder_candidates() -> dict[str, Callable[[bytes], Any]]:
    """Full decode to RGB with every candidate library importable here (decode-only ceiling)."""
    import simplejpeg
    import torch
    from PIL import Image

    def pillow(d: bytes) -> Image.Image:
        img = Image.open(io.BytesIO(d))
        return img.convert("RGB") if img.mode != "RGB" else (img.load(), img)[1]

    def torchvision_io(d: bytes) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg

        return cast(torch.Tensor, decode_jpeg(torch.from_numpy(np.frombuffer(d, np.uint8)), mode=ImageReadMode.RGB))

    cands: dict[str, Callable[[bytes], Any]] = {
        "pillow": pillow,
        "simplejpeg": lambda d: simplejpeg.decode_jpeg(d, "RGB"),
        "torchvision.io": torchvision_io,
    }
    with contextlib.suppress(Exception):
        import cv2

        flag = getattr(cv2, "IMREAD_COLOR_RGB", None)
        if flag is not None:
            cands["opencv"] = lambda d: cv2.imdecode(np.frombuffer(d, np.uint8), flag)
        else:
            cands["opencv"] = lambda d: cv2.cvtColor(
                cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
            )
    with contextlib.suppress(Exception):
        import turbojpeg

        tj = turbojpeg.TurboJPEG()  # needs the system libturbojpeg
        cands["pyturbojpeg"] = lambda d: tj.decode(d, pixel_format=turbojpeg.TJPF_RGB)
    return cands


def _decodes(fn: Callable[[bytes], Any], data: bytes) -> bool:
    try:
        return fn(data) is not None
    except Exception:
        return False


def _with_fallback(fn: Callable[[bytes], Any], fallbacks: list[int]) -> Callable[[Sequence[bytes]], None]:
    """Run `fn` over a chunk; an image it cannot take (CMYK, PNG, ...) is decoded by Pillow and counted."""
    from imagenet_ray.data.decode import decode_rgb

    def run(chunk: Sequence[bytes]) -> None:
        for d in chunk:
            try:
                out = fn(d)
                if out is None:
                    raise ValueError("no image")
            except Exception:
                fallbacks[0] += 1
                decode_rgb(d)

    return run


def interleaved(
    sides: dict[str, Callable[[Sequence[Item]], Any]], datas: Sequence[Item], chunk: int, passes: int
) -> dict[str, dict[str, Any]]:
    """Throughput (images/s) of each side, interleaved chunk by chunk in rotating order, per pass.

    Two clocks: CPU time of this process (`best`, `median`, `passes`: images per CPU-second, what one
    core delivers; robust when other processes share the core) and wall time (`wall_*`). On an idle
    core they agree.
    """
    chunks = [datas[i : i + chunk] for i in range(0, len(datas), chunk)]
    names = list(sides)
    for name in names:  # warm-up: imports, caches, allocator
        sides[name](chunks[0])
    cpu_rates: dict[str, list[float]] = {n: [] for n in names}
    wall_rates: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(passes):
        cpu, wall = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
        for ci, c in enumerate(chunks):
            order = names[ci % len(names) :] + names[: ci % len(names)]
            for name in order:
                c0, w0 = time.process_time(), time.perf_counter()
                sides[name](c)
                cpu[name] += time.process_time() - c0
                wall[name] += time.perf_counter() - w0
        for name in names:
            cpu_rates[name].append(len(datas) / max(cpu[name], 1e-9))
            wall_rates[name].append(len(datas) / max(wall[name], 1e-9))
    return {
        n: {
            "best": max(cpu_rates[n]),
            "median": statistics.median(cpu_rates[n]),
            "passes": cpu_rates[n],
            "wall_best": max(wall_rates[n]),
            "wall_median": statistics.median(wall_rates[n]),
            "wall_passes": wall_rates[n],
        }
        for n in names
    }


def kernel_variant(
    datas: Sequence[bytes], crop: int, resize: int, eval_crop: int, batch: int, passes: int, seed: int = 0
) -> dict[str, Any]:
    """One variant (originals or re-encoded): decoders, train preset, eval preset; ratios within the run."""
    import torch
    from PIL import Image

    from imagenet_ray.data import transforms

    ref_train, ref_eval = reference_train_transform(crop), reference_eval_transform(resize, eval_crop)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)

    def as_batch(chunk: Sequence[bytes]) -> dict[str, np.ndarray]:
        arr = np.empty(len(chunk), dtype=object)
        arr[:] = list(chunk)
        return {"image": arr, "label": np.zeros(len(chunk), np.int64)}

    def pil(d: bytes) -> Image.Image:
        return Image.open(io.BytesIO(d)).convert("RGB")

    fallbacks = {name: [0] for name in decoder_candidates()}
    sides: dict[str, Callable[[Sequence[bytes]], Any]] = {
        f"decode:{name}": _with_fallback(fn, fallbacks[name]) for name, fn in decoder_candidates().items()
    }
    sides["train:torchvision"] = lambda c: torch.stack([ref_train(pil(d)) for d in c])
    sides["train:ours"] = lambda c: transforms.train_batch(as_batch(c), crop, rng)

    no_dct, whole_decode = transforms.KernelOptions(dct_downscale=False), transforms.KernelOptions(crop_decode=False)
    sides["train:ours_no_dct"] = lambda c: transforms.train_batch(as_batch(c), crop, rng, no_dct)  # full-size decode
    # whole images (simplejpeg), then the crop
    sides["train:ours_whole_decode"] = lambda c: transforms.train_batch(as_batch(c), crop, rng, whole_decode)
    sides["eval:torchvision"] = lambda c: torch.stack([ref_eval(pil(d)) for d in c])
    sides["eval:ours"] = lambda c: transforms.eval_batch(as_batch(c), resize, eval_crop)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.from_numpy of read-only bytes; torchvision.io deprecation
        res = interleaved(sides, datas, batch, passes)
    decoders = {k.split(":", 1)[1]: v for k, v in res.items() if k.startswith("decode:")}
    for name, fn in decoder_candidates().items():  # images the candidate cannot decode itself (untimed)
        decoders[name]["pillow_fallbacks"] = sum(1 for d in datas if not _decodes(fn, d))
    best_decoder = max(decoders, key=lambda k: decoders[k]["best"])
    ceiling = decoders[best_decoder]["best"]
    train_ours, train_ref = res["train:ours"]["best"], res["train:torchvision"]["best"]
    eval_ours, eval_ref = res["eval:ours"]["best"], res["eval:torchvision"]["best"]
    return {
        "images": len(datas),
        "decoders": decoders,
        "ceiling_decoder": best_decoder,
        "ceiling": ceiling,
        "train": {
            "ours": res["train:ours"],
            "torchvision": res["train:torchvision"],
            "ours_no_dct": res["train:ours_no_dct"],
            "ours_whole_decode": res["train:ours_whole_decode"],
            "crop_decode_gain": train_ours / res["train:ours_whole_decode"]["best"],
            "ours_vs_torchvision": train_ours / train_ref,
            "ours_vs_ceiling": train_ours / ceiling,
        },
        "eval": {
            "ours": res["eval:ours"],
            "torchvision": res["eval:torchvision"],
            "ours_vs_torchvision": eval_ours / eval_ref,
            "ours_vs_ceiling": eval_ours / ceiling,
        },
    }


def breakdown(datas: Sequence[bytes], crop: int, passes: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Where the time goes: CPU microseconds per image for each step of both train pipelines (the steps
    of transforms._train_into and of torchvision's reference, timed one by one; best of `passes`)."""
    import torch
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF
    from PIL import Image

    from imagenet_ray.data import transforms
    from imagenet_ray.data.decode import decode_rgb_array, decode_rgb_crop, jpeg_header

    clock = time.thread_time
    ours_steps = (
        "header + box",
        "decode the crop (libjpeg-turbo)",
        "mirror p=0.5 -> NHWC copy",
        "resize (torch AA)",
        "write into batch",
    )
    ref_steps = ("decode (Pillow)", "crop + resize (Pillow)", "flip (p=0.5)", "ToTensor", "Normalize", "collate")
    best_ours, best_ref = dict.fromkeys(ours_steps, float("inf")), dict.fromkeys(ref_steps, float("inf"))
    out = torch.empty((crop, crop, 3), dtype=torch.uint8)
    normalize = T.Normalize(MEAN, STD)
    for _ in range(max(1, passes)):
        rng = np.random.default_rng(seed)
        acc_o, acc_r = dict.fromkeys(ours_steps, 0.0), dict.fromkeys(ref_steps, 0.0)
        tensors = []
        for d in datas:
            t0 = clock()
            header = jpeg_header(d)
            if header is None:
                continue
            left, top, w, h = transforms.sample_rrc_box(header[0], header[1], rng)
            t1 = clock()
            factor = transforms.dct_factor(min(w, h), crop)
            box = transforms.snap_box(left, top, w, h, factor, -(-header[0] // factor), -(-header[1] // factor))
            region = decode_rgb_crop(d, factor, *box)
            if region is None:
                arr = decode_rgb_array(d, factor, header)
                if arr.shape[1] != header[0] or arr.shape[0] != header[1]:
                    left, top, w, h = box
                region = arr[top : top + h, left : left + w]
            elif factor > 1:
                left, top, w, h = box
            t2 = clock()
            x = torch.from_numpy(region).unsqueeze(0).permute(0, 3, 1, 2)
            x = x.flip(3) if rng.random() < 0.5 else x.contiguous(memory_format=torch.channels_last)
            t3 = clock()
            y = torch.nn.functional.interpolate(x, size=(crop, crop), mode="bilinear", antialias=True)
            y = y[0].permute(1, 2, 0)
            t4 = clock()
            out.copy_(y)
            t5 = clock()
            for k, v in zip(ours_steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                acc_o[k] += v
            # torchvision's reference on the same image, step by step (same box for comparability)
            t0 = clock()
            img = Image.open(io.BytesIO(d)).convert("RGB")
            t1 = clock()
            img = TF.resized_crop(
                img, top * factor, left * factor, h * factor, w * factor, [crop, crop], T.InterpolationMode.BILINEAR
            )
            t2 = clock()
            if rng.random() < 0.5:
                img = TF.hflip(img)
            t3 = clock()
            t = TF.to_tensor(img)
            t4 = clock()
            t = normalize(t)
            t5 = clock()
            tensors.append(t)
            if len(tensors) == _COLLATE_ROWS:
                torch.stack(tensors)
                tensors.clear()
            t6 = clock()
            for k, v in zip(ref_steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5), strict=True):
                acc_r[k] += v
        n = sum(1 for d in datas if jpeg_header(d) is not None)
        for acc, best in ((acc_o, best_ours), (acc_r, best_ref)):
            total = sum(acc.values())
            if total * 1e6 / n < sum(best.values()):
                best.update({k: v * 1e6 / n for k, v in acc.items()})
    return {"ours_us": best_ours, "torchvision_us": best_ref}


_COLLATE_ROWS = 32  # the reference side collates like a DataLoader batch (for the breakdown)


def run_kernel(
    variants: dict[str, Sequence[bytes]],
    core: int,
    crop: int,
    resize: int,
    eval_crop: int,
    batch: int,
    passes: int,
    with_breakdown: bool = True,
) -> dict[str, Any]:
    with pinned({core}, threads=1):
        results = {name: kernel_variant(d, crop, resize, eval_crop, batch, passes) for name, d in variants.items()}
        if with_breakdown:
            for name, d in variants.items():
                results[name]["breakdown"] = breakdown(d, crop, passes)
        return {"core": core, "batch": batch, "passes": passes, "variants": results}


def kernel_variants(originals: Sequence[bytes], max_side: int, quality: int) -> dict[str, Sequence[bytes]]:
    return {"original": originals, f"max_side_{max_side}": reencode(originals, max_side, quality)}


# The key ratios of a kernel run, as (preset, field) pairs of each variant's result.
KERNEL_RATIOS = (("train", "ours_vs_torchvision"), ("train", "ours_vs_ceiling"), ("eval", "ours_vs_torchvision"))


def summarise_kernel_processes(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-process key ratios and rates of several kernel runs, and their medians.

    The reference's speed differs between processes far more than between passes of one process
    (docs/benchmarks.md), so a ratio from one process is one draw; the median over fresh processes
    is the figure to compare with a target.
    """
    out: dict[str, Any] = {"count": len(runs), "variants": {}}
    for name in runs[0]["variants"]:
        per = {
            f"{preset}_{field}": [r["variants"][name][preset][field] for r in runs] for preset, field in KERNEL_RATIOS
        }
        per["train_ours_best"] = [r["variants"][name]["train"]["ours"]["best"] for r in runs]
        per["train_torchvision_best"] = [r["variants"][name]["train"]["torchvision"]["best"] for r in runs]
        out["variants"][name] = {k: {"per_process": v, "median": statistics.median(v)} for k, v in per.items()}
    return out


def run_kernel_processes(
    images: str,
    limit: int | None,
    max_side: int,
    quality: int,
    core: int,
    crop: int,
    resize: int,
    eval_crop: int,
    batch: int,
    passes: int,
    processes: int,
) -> dict[str, Any]:
    """The kernel section in `processes` fresh Python processes, one after another on the same core.

    Returns the first process's full result (with its step-by-step breakdown) plus "processes":
    every process's key ratios and their medians (summarise_kernel_processes).
    """
    import subprocess

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-kernel-") as tmp:
        for i in range(processes):
            params, result = Path(tmp) / f"params{i}.json", Path(tmp) / f"kernel{i}.json"
            params.write_text(
                json.dumps(
                    {
                        "images": images,
                        "limit": limit,
                        "max_side": max_side,
                        "quality": quality,
                        "core": core,
                        "crop": crop,
                        "resize": resize,
                        "eval_crop": eval_crop,
                        "batch": batch,
                        "passes": passes,
                        "with_breakdown": i == 0,
                    }
                )
            )
            code = "import sys; from imagenet_ray.bench.data import kernel_process; kernel_process(*sys.argv[1:])"
            done = subprocess.run([sys.executable, "-c", code, str(params), str(result)])
            if done.returncode != 0:
                raise UserError(
                    f"bench data: kernel process {i + 1} of {processes} exited {done.returncode} (its error is above)"
                )
            runs.append(json.loads(result.read_text()))
    first = dict(runs[0])
    first["processes"] = summarise_kernel_processes(runs)
    return first


def kernel_process(params_path: str, result_path: str) -> None:
    """Entry point of one fresh kernel process (run_kernel_processes): params JSON in, result JSON out."""
    p = json.loads(Path(params_path).read_text())
    originals = [d for _, d in load_images(p["images"], p["limit"])]
    result = run_kernel(
        kernel_variants(originals, p["max_side"], p["quality"]),
        p["core"],
        p["crop"],
        p["resize"],
        p["eval_crop"],
        p["batch"],
        p["passes"],
        p["with_breakdown"],
    )
    Path(result_path).write_text(json.dumps(result))


def run_variants(
    originals: Sequence[bytes],
    grid: Sequence[stored_variants.Variant],
    core: int,
    crops: Sequence[int],
    resize: int,
    eval_crop: int,
    batch: int,
    passes: int,
    gpu_rates: dict[int, float],
) -> dict[str, Any]:
    """Section 4: every stored variant's train (per crop) and eval kernel, all interleaved on one pinned core."""
    stored = stored_variants.make_variants(originals, grid)
    sides = stored_variants.kernel_sides(stored, crops, resize, eval_crop)
    with pinned({core}, threads=1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timed = interleaved(sides, range(len(originals)), batch, passes)
    out = {"core": core, "batch": batch, "passes": passes, "resize": resize, "eval_crop": eval_crop}
    return out | stored_variants.summarise(grid, stored, timed, crops, gpu_rates)


# --- section 2: end to end --------------------------------------------------------------------------------------


def wnid_of(path: Path) -> str:
    m = WNID_PREFIX.match(path.name)
    return m.group(1) if m else FALLBACK_WNID


def build_folder_layout(images: Sequence[Path], root: Path, val_images: int, repeat: int = 1) -> Path:
    """The images as a class-folder ILSVRC layout (train/<wnid>/, val/<wnid>/, LOC_synset_mapping.txt),
    hard-linked where possible; with `repeat` > 1 each train image appears that many times (under
    distinct names), so that an epoch is long enough for per-epoch start-up not to dominate. Returns the
    train folder (what ImageFolder reads)."""
    from imagenet_ray.data.layouts import KAGGLE_SYNSETS

    def place(src: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)

    for p in images:
        for r in range(repeat):
            name = p.name if r == 0 else f"{p.stem}_r{r}{p.suffix}"
            place(p, root / "train" / wnid_of(p) / name)
    for p in images[: max(1, val_images)]:
        place(p, root / "val" / wnid_of(p) / p.name)
    wnids = sorted({wnid_of(p) for p in images})
    (root / KAGGLE_SYNSETS).write_text("".join(f"{w} {w}\n" for w in wnids))
    return root / "train"


def _summarise(epochs: list[dict[str, Any]], batch_size: int) -> dict[str, Any]:
    """Epoch 1 is warm-up (process start, imports, first reads); the rates are over epochs 2..N.

    images_per_s counts everything from asking for the epoch's iterator to its last batch;
    in_epoch_images_per_s leaves out each epoch's start (up to its first batch), which a long
    (ImageNet-sized) epoch amortises; epoch_start_s is that start, averaged over epochs 2..N.
    """
    steady = epochs[1:] or epochs
    images, wall = sum(e["images"] for e in steady), sum(e["wall_s"] for e in steady)
    wait = sum(e["wait_s"] for e in steady)
    after_first = sum(e["images"] - e["first_batch_images"] for e in steady)
    after_first_s = sum(e["wall_s"] - e["first_batch_s"] for e in steady)
    return {
        "images_per_s": images / wall if wall else 0.0,
        "in_epoch_images_per_s": after_first / after_first_s if after_first_s > 0 else 0.0,
        "epoch_start_s": statistics.mean(e["first_batch_s"] for e in steady),
        "steady_epochs": len(steady),
        "time_to_first_batch_s": epochs[0]["first_batch_s"],
        "data_wait_s": wait,
        "data_wait_frac": wait / wall if wall else 0.0,
        "first_epoch_images_per_s": epochs[0]["images"] / epochs[0]["wall_s"] if epochs[0]["wall_s"] else 0.0,
        "decode_errors": sum(e.get("decode_errors", 0) for e in epochs),
        "batch_size": batch_size,
        "epochs": epochs,
    }


def consume(batches_for_epoch: Callable[[int], Any], epochs: int, step_s: float) -> list[dict[str, Any]]:
    """Iterate `epochs` epochs, timing each next(); the same loop for both sides."""
    out = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        it = iter(batches_for_epoch(epoch))
        n, wait, first, first_n, errors = 0, 0.0, None, 0, 0
        while True:
            t1 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                wait += time.perf_counter() - t1
                break
            wait += time.perf_counter() - t1
            if isinstance(batch, dict):
                n += int(batch["label"].shape[0])
                if "decode_errors" in batch:
                    errors += int(batch["decode_errors"].sum())
            else:
                n += int(batch[1].shape[0])
            if first is None:
                first, first_n = time.perf_counter() - t0, n
            if step_s:
                time.sleep(step_s)
        out.append(
            {
                "epoch": epoch,
                "started_at": t0,  # perf_counter: CLOCK_MONOTONIC, shared by processes (the S3 meter's clock)
                "images": n,
                "wall_s": time.perf_counter() - t0,
                "wait_s": wait,
                "first_batch_s": first if first is not None else 0.0,
                "first_batch_images": first_n,
                "decode_errors": errors,
            }
        )
    return out


def _ray_bench_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: iterate the train shard as the training runner does, report per-epoch timings."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")

    def batches(_epoch: int) -> Iterable[Any]:
        # As train/runner.py iterates (dtypes inferred: uint8 images, int64 labels, int32 decode_errors).
        return cast(
            Iterable[Any],
            shard.iter_torch_batches(
                batch_size=config["batch_size"],
                prefetch_batches=config["prefetch_batches"],
                local_shuffle_buffer_size=config["local_shuffle_buffer"] or None,
            ),
        )

    epochs = consume(batches, config["epochs"], config["step_s"])
    # A file, not ray.train.report: Ray Train v2 keeps metrics only with checkpoints. The bench's Ray is
    # local, so the driver reads it.
    Path(config["result_path"]).write_text(json.dumps(epochs))


class ObjectStoreMonitor:
    """Samples Ray's object store every `interval` seconds while a side runs: peak bytes in use, and
    how much was spilled to disk / restored meanwhile (the raylet's own counters, all nodes)."""

    def __init__(self, interval: float = 0.5):
        import threading

        self.interval, self.peak_used, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, name="object-store-monitor", daemon=True)

    @staticmethod
    def _stats() -> Any:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        return get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address)).store_stats

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a missed sample only lowers the peak's resolution
                self.peak_used = max(self.peak_used, int(self._stats().object_store_bytes_used))

    def __enter__(self) -> ObjectStoreMonitor:
        self._start = self._stats()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        end = self._stats()
        mib = 2**20
        self.result = {
            "capacity_mib": end.object_store_bytes_avail / mib,
            "peak_used_mib": self.peak_used / mib,
            "spilled_mib": (end.spilled_bytes_total - self._start.spilled_bytes_total) / mib,
            "spilled_objects": int(end.spilled_objects_total - self._start.spilled_objects_total),
            "restored_mib": (end.restored_bytes_total - self._start.restored_bytes_total) / mib,
        }


def run_ray_side(
    url: str,
    crop: int,
    epochs: int,
    batch_size: int,
    step_s: float,
    storage_dir: str,
    local_shuffle_buffer: int = 256,
    prefetch_batches: int = 2,
    shard_cache_dir: str | None = None,
) -> dict[str, Any]:
    """The pipeline exactly as the training job builds it (build_train_dataset, exact_val_data_config,
    iteration as train/runner.py with the default config's shuffle buffer and prefetch) into one worker;
    with `shard_cache_dir` (emptied first: epoch 1 is cold), an s3:// dataset's shards through the node cache."""
    import ray.train
    from ray.data import DataContext
    from ray.train.torch import TorchTrainer

    from imagenet_ray.data.format import open_prepared
    from imagenet_ray.data.pipeline import build_train_dataset, exact_val_data_config

    DataContext.get_current().enable_progress_bars = False
    result_path = str(Path(storage_dir) / "ray_side_epochs.json")
    Path(storage_dir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cache = None
    if shard_cache_dir is not None:
        from imagenet_ray.data.shard_cache import ShardCache

        shutil.rmtree(shard_cache_dir, ignore_errors=True)
        cache = ShardCache(shard_cache_dir)
    train = build_train_dataset(open_prepared(url, cache), crop, 0)  # lazy: the manifest, the read's plan
    open_s = time.perf_counter() - t0
    trainer = TorchTrainer(
        _ray_bench_loop,
        train_loop_config={
            "batch_size": batch_size,
            "epochs": epochs,
            "step_s": step_s,
            "result_path": result_path,
            "local_shuffle_buffer": local_shuffle_buffer,
            "prefetch_batches": prefetch_batches,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="bench-data", storage_path=storage_dir),
        datasets={"train": train},
        dataset_config=exact_val_data_config(),  # as the training job splits its datasets
    )
    with ObjectStoreMonitor() as store:
        trainer.fit()
    out = _summarise(json.loads(Path(result_path).read_text()), batch_size)
    out["fit_wall_s"], out["dataset_open_s"] = time.perf_counter() - t0, open_s
    out["shards_url"] = url
    out["object_store"] = store.result
    return out


LOCAL_S3 = "local"  # `--s3` without a URL: a SeaweedFS server started (and stopped) by the benchmark


@contextlib.contextmanager
def s3_location(s3: str | None, work: Path) -> Iterator[str | None]:
    """The s3:// URL to put the shards at (None without --s3), with this process's AWS_* environment
    pointing at the server while it is in use. With LOCAL_S3 the benchmark starts its own SeaweedFS
    (the project's service, on loopback, pinned to the same cores as everything else); with a URL
    it uses the server and credentials already in the AWS_* environment."""
    if s3 != LOCAL_S3:
        yield s3
        return
    from imagenet_ray.services import start_stack

    stack = start_stack(work / "services", buckets=("imagenet",), only=("s3",))
    aws = {k: v for k, v in stack.env().items() if k.startswith("AWS_")}
    try:
        with temporary_env(aws):  # the driver builds the S3 filesystem; Ray ships it to the read tasks
            yield "s3://imagenet/bench-data"
    finally:
        stack.stop()


def copy_tree(src_url: str, dst_url: str) -> float:
    """Copy a prepared dataset (shards, manifest, receipts) to another location; returns seconds."""
    import pyarrow.fs as pafs

    from imagenet_ray import storage

    t0 = time.perf_counter()
    src, dst = storage.resolve(src_url), storage.resolve(dst_url)
    try:
        pafs.copy_files(src.path, dst.path, source_filesystem=src.fs, destination_filesystem=dst.fs, use_threads=True)
    except OSError as exc:  # wrong credentials, missing bucket, unreachable endpoint: one line
        raise UserError(storage.describe_os_error(dst_url, exc)) from None
    return time.perf_counter() - t0


def run_dataloader_side(
    train_dir: Path, crop: int, epochs: int, batch_size: int, workers: int, step_s: float
) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(train_dir), transform=reference_train_transform(crop))
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
    )
    torch.manual_seed(0)
    out = _summarise(consume(lambda _e: loader, epochs, step_s), batch_size)
    out["workers"] = workers
    return out


def run_e2e(
    images: Sequence[Path],
    work: Path,
    cores: set[int],
    crop: int,
    epochs: int,
    batch_size: int,
    dataloader_workers: int,
    step_ms: float,
    shard_mb: float,
    s3: str | None,
    repeat: int = 1,
    val_images: int = 50,
    peer_sides: Sequence[str] = (),
    peer_decoders: Sequence[str] = peer_readers.DECODERS,
) -> dict[str, Any]:
    """Ray Data → Ray Train from local Parquet (and from S3 with --s3) vs DataLoader, same cores."""
    import ray

    from imagenet_ray.data.prepare import PrepareOptions, prepare

    layout = work / "layout"
    train_dir = build_folder_layout(images, layout, val_images, repeat)
    local_url = str(work / "prepared")
    step_s = step_ms / 1000.0
    result: dict[str, Any] = {
        "cores": sorted(cores),
        "epochs": epochs,
        "batch_size": batch_size,
        "step_ms": step_ms,
        "images": len(images) * repeat,
        "repeat": repeat,
    }
    with pinned(cores, threads=1), s3_location(s3, work) as s3_url:
        started_ray = not ray.is_initialized()
        if started_ray:
            # The training worker reserves 1 logical CPU and mostly waits; Ray Data gets len(cores), like
            # the DataLoader's workers. Every process (and the S3 server) is pinned to the same cores.
            start_local_ray(address="local", num_cpus=len(cores) + 1, log_to_driver=False, configure_logging=False)
        result["ray_resources"] = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        result["ray_started_by_bench"] = started_ray
        try:
            t0 = time.perf_counter()
            prep = prepare(str(layout), local_url, PrepareOptions(shard_mb=shard_mb, max_quarantine_frac=1.0))
            if not prep.ok or prep.manifest is None:
                raise RuntimeError(f"prepare failed: {prep.problems}")
            train_split = prep.manifest["splits"]["train"]
            result["prepare"] = {
                "wall_s": time.perf_counter() - t0,
                "shards": len(train_split["shards"]),
                "train_images": train_split["num_images"],
                "shard_mb": shard_mb,
                "shard_bytes_mean": float(np.mean([sh["bytes"] for sh in train_split["shards"]])),
            }
            result["ray"] = run_ray_side(local_url, crop, epochs, batch_size, step_s, str(work / "ray_results"))
            if s3_url:
                result["s3_copy_s"] = copy_tree(local_url, s3_url)  # the same shards, byte for byte
                result["ray_s3"] = peer_readers.observed(  # + its S3 bytes and CPU split
                    lambda: run_ray_side(s3_url, crop, epochs, batch_size, step_s, str(work / "ray_results_s3"))
                )
                result["ray_s3_cached"] = peer_readers.observed(  # shards on local disk after epoch 1, as the peers
                    lambda: run_ray_side(
                        s3_url,
                        crop,
                        epochs,
                        batch_size,
                        step_s,
                        str(work / "ray_results_s3_cached"),
                        shard_cache_dir=str(work / "shard-cache"),
                    )
                )
                result["s3_server"] = "SeaweedFS started by the benchmark" if s3 == LOCAL_S3 else "AWS_* environment"
        finally:
            if started_ray:
                ray.shutdown()
        if s3_url and peer_sides:  # after Ray is gone, while the S3 server is up
            result["peers"] = peer_readers.run_peer_sides(
                local_url,
                s3_url,
                work,
                crop,
                batch_size,
                dataloader_workers,
                lambda batches: _summarise(consume(batches, epochs, step_s), batch_size),
                peer_sides,
                peer_decoders,
            )
    with pinned(cores, threads=1):  # after Ray and the S3 server are gone: the same cores, to itself
        result["dataloader"] = run_dataloader_side(train_dir, crop, epochs, batch_size, dataloader_workers, step_s)
    for side in ("ray", "ray_s3", "ray_s3_cached"):
        if side not in result:
            continue
        for suffix, key in (("", "images_per_s"), ("_in_epoch", "in_epoch_images_per_s")):
            theirs = result["dataloader"][key]
            result[f"{side}_vs_dataloader{suffix}"] = result[side][key] / theirs if theirs else 0.0
    if "peers" in result:
        result["peers"]["summary"] = peer_readers.summarise(result)
    return result


# --- section 3: GPU decode --------------------------------------------------------------------------------------


def run_gpu(variants: dict[str, Sequence[bytes]], batch: int, passes: int) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    from torchvision.io import ImageReadMode, decode_jpeg

    from imagenet_ray.data.decode import jpeg_header

    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "batch": batch, "variants": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, datas in variants.items():
            tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas if jpeg_header(d)]
            chunks = [tensors[i : i + batch] for i in range(0, len(tensors), batch)]
            decode_jpeg(chunks[0], mode=ImageReadMode.RGB, device="cuda")
            torch.cuda.synchronize()
            rates = []
            for _ in range(passes):
                t0 = time.perf_counter()
                for c in chunks:
                    decode_jpeg(c, mode=ImageReadMode.RGB, device="cuda")
                torch.cuda.synchronize()
                rates.append(len(tensors) / (time.perf_counter() - t0))
            out["variants"][name] = {
                "images": len(tensors),
                "best": max(rates),
                "median": statistics.median(rates),
                "passes": rates,
            }
    return out


# --- report -----------------------------------------------------------------------------------------------------


def format_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"machine: {m['cpu_model']}, nproc {m['nproc']}; {report['images']['count']} images from "
        f"{report['images']['folder']}",
        f"train decoder: {m['versions'].get('train decoder', '?')}",
    ]
    k = report.get("kernel")
    if k:
        lines.append(
            f"\n1. kernel, images per CPU-second on one core (core {k['core']}, best of {k['passes']} "
            f"interleaved passes; wall-clock figures in the JSON)"
        )
        lines.append(f"{'':24s}" + "".join(f"{v:>22s}" for v in k["variants"]))
        vs = list(k["variants"].values())
        dec_names = list(vs[0]["decoders"])
        for d in dec_names:
            lines.append(f"{'decode ' + d:24s}" + "".join(f"{v['decoders'][d]['best']:22.0f}" for v in vs))
        rows = [
            ("train torchvision", lambda v: f"{v['train']['torchvision']['best']:.0f}"),
            ("train ours", lambda v: f"{v['train']['ours']['best']:.0f}"),
            ("  ours / torchvision", lambda v: f"{v['train']['ours_vs_torchvision']:.2f}x"),
            ("  ours / decode ceiling", lambda v: f"{v['train']['ours_vs_ceiling']:.2f}x ({v['ceiling_decoder']})"),
            ("train ours, no DCT scale", lambda v: f"{v['train']['ours_no_dct']['best']:.0f}"),
            ("train ours, whole decode", lambda v: f"{v['train']['ours_whole_decode']['best']:.0f}"),
            ("  crop decode gain", lambda v: f"{v['train']['crop_decode_gain']:.2f}x"),
            ("eval torchvision", lambda v: f"{v['eval']['torchvision']['best']:.0f}"),
            ("eval ours", lambda v: f"{v['eval']['ours']['best']:.0f}"),
            ("  ours / torchvision", lambda v: f"{v['eval']['ours_vs_torchvision']:.2f}x"),
            ("  ours / decode ceiling", lambda v: f"{v['eval']['ours_vs_ceiling']:.2f}x"),
        ]
        for label, fmt in rows:
            lines.append(f"{label:24s}" + "".join(f"{fmt(v):>22s}" for v in vs))
        if all("breakdown" in v for v in vs):
            lines.append("where the time goes, train, CPU us per image (step by step; same boxes on both sides)")
            for side in ("ours_us", "torchvision_us"):
                for step in vs[0]["breakdown"][side]:
                    lines.append(
                        f"{('  ' + side.split('_')[0] + ': ' + step)[:40]:40s}"
                        + "".join(f"{v['breakdown'][side][step]:14.0f}" for v in vs)
                    )
                lines.append(
                    f"{'  ' + side.split('_')[0] + ': total':40s}"
                    + "".join(f"{sum(v['breakdown'][side].values()):14.0f}" for v in vs)
                )
        procs = k.get("processes")
        if procs:
            lines.append(f"over {procs['count']} fresh processes (the table above is process 1): per process -> median")
            for preset, field in KERNEL_RATIOS:
                label = f"{preset} " + ("ours / torchvision" if field == "ours_vs_torchvision" else "ours / ceiling")
                cells = [
                    f"{name}: "
                    + " ".join(f"{x:.2f}" for x in v[f"{preset}_{field}"]["per_process"])
                    + f" -> {v[f'{preset}_{field}']['median']:.2f}x"
                    for name, v in procs["variants"].items()
                ]
                lines.append(f"  {label:26s}" + "   ".join(cells))
    e = report.get("e2e")
    if e:
        lines.append(
            f"\n2. end to end on cores {e['cores']}: {e['images']} images ({e['repeat']}x each) x "
            f"{e['epochs']} epochs (rates over epochs 2..{e['epochs']}), batch {e['batch_size']}, "
            f"step {e['step_ms']} ms; {e['prepare']['shards']} shards of "
            f"{e['prepare']['shard_bytes_mean'] / 2**20:.0f} MB"
        )
        lines.append(
            f"{'':40s}{'images/s':>10s}{'in epoch':>10s}{'epoch start s':>15s}{'1st batch s':>13s}{'wait frac':>11s}"
        )
        sides = [
            ("ray", "Ray Data -> Ray Train, local Parquet"),
            ("ray_s3", "Ray Data -> Ray Train, Parquet on S3"),
            ("ray_s3_cached", "  the same, shards cached on the node"),
            ("dataloader", f"DataLoader(ImageFolder), {e['dataloader']['workers']} workers"),
        ]
        for side, label in sides:
            if side not in e:
                continue
            s = e[side]
            lines.append(
                f"{label:40s}{s['images_per_s']:10.0f}{s['in_epoch_images_per_s']:10.0f}"
                f"{s['epoch_start_s']:15.2f}{s['time_to_first_batch_s']:13.2f}{s['data_wait_frac']:11.2f}"
            )
        for side in ("ray", "ray_s3", "ray_s3_cached"):
            if side in e:
                o = e[side]["object_store"]
                lines.append(
                    f"  {side}: object store peak {o['peak_used_mib']:.0f} of {o['capacity_mib']:.0f} MiB, "
                    f"spilled {o['spilled_mib']:.0f} MiB ({o['spilled_objects']} objects), "
                    f"restored {o['restored_mib']:.0f} MiB"
                )
        ratio_rows = [("ray", "  Ray (local) / DataLoader"), ("ray_s3", "  Ray (S3) / DataLoader")]
        for side, label in [*ratio_rows, ("ray_s3_cached", "  Ray (S3, node cache) / DataLoader")]:
            if f"{side}_vs_dataloader" in e:
                lines.append(
                    f"{label:40s}{e[f'{side}_vs_dataloader']:9.2f}x{e[f'{side}_vs_dataloader_in_epoch']:9.2f}x"
                )
    if e and "peers" in e:
        lines += peer_readers.format_table(e)
    if "e2e_skipped" in report:
        lines.append(f"\n2. end to end: skipped: {report['e2e_skipped']}")
    g = report.get("gpu", {})
    if "skipped" in g:
        lines.append(f"\n3. GPU decode: skipped: {g['skipped']}")
    elif g:
        lines.append(f"\n3. GPU decode (torchvision.io.decode_jpeg on {g['device']}, batch {g['batch']}), images/s")
        for name, v in g["variants"].items():
            lines.append(f"{name:24s}{v['best']:10.0f}")
    if report.get("variants"):
        lines += stored_variants.format_table(report["variants"])
    if report.get("scaling"):
        lines += sweeps.format_scaling(report["scaling"])
    return "\n".join(lines)


# --- entry points -----------------------------------------------------------------------------------------------


def add_bench_data_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--images", required=True, help="folder of JPEGs (e.g. ../shared/imagenet-samples)")
    p.add_argument("--limit", type=int, default=None, help="use the first N images (sorted by name)")
    p.add_argument("--crop", type=int, default=224, help="train RandomResizedCrop size")
    p.add_argument("--resize", type=int, default=256, help="eval: shorter side")
    p.add_argument("--eval-crop", type=int, default=224, help="eval: center crop")
    p.add_argument("--max-side", type=int, default=256, help="re-encoded variant: longer side at most N")
    p.add_argument("--quality", type=int, default=90, help="re-encoded variant: JPEG quality")
    p.add_argument("--passes", type=int, default=3, help="kernel, variants: timed passes per side (best reported)")
    p.add_argument("--core", type=int, default=None, help="kernel, variants: the core to pin to (default: last)")
    p.add_argument(
        "--kernel-processes",
        type=int,
        default=3,
        help="kernel: run it in N fresh processes, one after another, and report the median ratios "
        "(the reference's speed differs between processes); 1 = in this process",
    )
    p.add_argument("--epochs", type=int, default=3, help="e2e: epochs per side (epoch 1 is warm-up)")
    p.add_argument("--batch-size", type=int, default=64, help="e2e: training batch size")
    p.add_argument(
        "--repeat",
        type=int,
        default=20,
        help="e2e: each image this many times per epoch (epochs long enough for many shards per core)",
    )
    p.add_argument("--dataloader-workers", type=int, default=None, help="e2e: DataLoader workers (default: --cores)")
    p.add_argument("--step-ms", type=float, default=0.0, help="e2e: sleep per batch, a stand-in for a training step")
    p.add_argument(
        "--shard-mb", type=float, default=DEFAULT_SHARD_MB, help="e2e: shard size for prepare (default: prepare's own)"
    )
    p.add_argument(
        "--s3",
        nargs="?",
        const=LOCAL_S3,
        default=None,
        metavar="URL",
        help="e2e: also read the same shards from S3: from a SeaweedFS server the benchmark starts on "
        "127.0.0.1 (no URL), or at this s3:// URL (server and credentials from the AWS_* "
        "environment; use a fresh prefix per run)",
    )
    p.add_argument(
        "--variants",
        default=",".join(map(str, stored_variants.DEFAULT_MAX_SIDES)),
        metavar="N,N,...",
        help="variants: the max sides to re-encode (with each --variant-qualities) next to the originals",
    )
    p.add_argument(
        "--variant-qualities",
        default=",".join(map(str, stored_variants.DEFAULT_QUALITIES)),
        metavar="Q,Q,...",
        help="variants: JPEG qualities",
    )
    p.add_argument(
        "--variant-gpu-rates",
        default=",".join(f"{c}={r:g}" for c, r in stored_variants.DEFAULT_GPU_IMAGES_PER_S.items()),
        metavar="CROP=IMG_S,...",
        help="variants: images/s one GPU consumes per train crop, for cores per GPU (default: round figures for "
        "an H100-class GPU training ResNet-50, assumed; other crops: time per image affine in pixels)",
    )
    peer_readers.add_peer_args(p)
    sweeps.add_scaling_args(p)
    p.add_argument("--skip-kernel", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--skip-gpu", action="store_true")
    p.add_argument("--skip-variants", action="store_true")
    p.add_argument("--work-dir", default=None, help="keep the layout and shards here (default: a temp dir)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the full report as JSON")
    return p


def run_data_bench(
    images: str,
    limit: int | None = None,
    crop: int = 224,
    resize: int = 256,
    eval_crop: int = 224,
    max_side: int = 256,
    quality: int = 90,
    passes: int = 3,
    core: int | None = None,
    cores: int = 2,
    epochs: int = 3,
    batch_size: int = 64,
    dataloader_workers: int | None = None,
    step_ms: float = 0.0,
    shard_mb: float | None = None,
    s3: str | None = None,
    repeat: int = 1,
    kernel: bool = True,
    e2e: bool = True,
    gpu: bool = True,
    work_dir: str | None = None,
    kernel_batch: int | None = None,
    kernel_processes: int = 1,
    variants: bool = True,
    variant_max_sides: Sequence[int] = stored_variants.DEFAULT_MAX_SIDES,
    variant_qualities: Sequence[int] = stored_variants.DEFAULT_QUALITIES,
    variant_crops: Sequence[int] | None = None,
    variant_gpu_rates: dict[int, float] | None = None,
    peer_sides: Sequence[str] = peer_readers.SIDES,
    peer_decoders: Sequence[str] = peer_readers.DECODERS,
    scaling: sweeps.ScalingPlan | None = None,
) -> dict[str, Any]:
    """Run the sections and return the report (see the module doc)."""
    from imagenet_ray.data.pipeline import DECODE_BATCH_ROWS

    if s3 not in (None, LOCAL_S3) and not s3.startswith("s3://"):
        raise UserError(f"bench data --s3 {s3}: not an s3:// URL (or give --s3 alone for a local SeaweedFS)")
    if kernel_processes < 1:
        raise UserError(f"bench data --kernel-processes {kernel_processes}: must be at least 1")
    allowed = sorted(os.sched_getaffinity(0))
    if (kernel or variants) and core is not None and core not in allowed:
        raise UserError(f"bench data --core {core}: not one of the cores this process may use {allowed}")
    loaded = load_images(images, limit)
    paths, originals = [p for p, _ in loaded], [d for _, d in loaded]
    if scaling is not None and scaling.wanted:  # before the other sections, not after them
        sweeps.check_plan(scaling, len(paths) * repeat)
    kernel_sets = kernel_variants(originals, max_side, quality)
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "machine": machine_info(),
        "images": {
            "folder": str(images),
            "count": len(originals),
            "mean_bytes": {k: float(np.mean([len(d) for d in v])) for k, v in kernel_sets.items()},
        },
        "settings": {"crop": crop, "resize": resize, "eval_crop": eval_crop, "max_side": max_side, "quality": quality},
    }
    if kernel:
        kernel_core, batch_rows = allowed[-1] if core is None else core, kernel_batch or DECODE_BATCH_ROWS
        if kernel_processes == 1:
            report["kernel"] = run_kernel(kernel_sets, kernel_core, crop, resize, eval_crop, batch_rows, passes)
        else:
            report["kernel"] = run_kernel_processes(
                images,
                limit,
                max_side,
                quality,
                kernel_core,
                crop,
                resize,
                eval_crop,
                batch_rows,
                passes,
                kernel_processes,
            )
    if e2e:
        if len(allowed) < cores:
            report["e2e_skipped"] = f"needs {cores} cores, this process may use {len(allowed)}"
        else:
            tmp = None if work_dir else tempfile.TemporaryDirectory(prefix="bench-data-")
            work = Path(tmp.name if tmp is not None else str(work_dir))
            work.mkdir(parents=True, exist_ok=True)
            try:
                report["e2e"] = run_e2e(
                    paths,
                    work,
                    set(allowed[:cores]),
                    crop,
                    epochs,
                    batch_size,
                    dataloader_workers if dataloader_workers is not None else cores,
                    step_ms,
                    shard_mb or DEFAULT_SHARD_MB,
                    s3,
                    repeat,
                    peer_sides=peer_sides,
                    peer_decoders=peer_decoders,
                )
            finally:
                if tmp is not None:
                    tmp.cleanup()
    if scaling is not None and scaling.wanted:
        harness = sweeps.Harness(
            pinned,
            build_folder_layout,
            run_ray_side,
            lambda b: _summarise(consume(b, epochs, step_ms / 1000.0), batch_size),
        )
        report["scaling"] = sweeps.run_scaling(
            paths, scaling, harness, work_dir, crop, epochs, batch_size, step_ms, shard_mb or DEFAULT_SHARD_MB, repeat
        )
    if gpu:
        report["gpu"] = run_gpu(kernel_sets, 64, passes)
    if variants:
        report["variants"] = run_variants(
            originals,
            stored_variants.variant_grid(variant_max_sides, variant_qualities),
            allowed[-1] if core is None else core,
            variant_crops or stored_variants.train_crops(crop),
            resize,
            eval_crop,
            kernel_batch or DECODE_BATCH_ROWS,
            passes,
            variant_gpu_rates or stored_variants.DEFAULT_GPU_IMAGES_PER_S,
        )
    return report


def run_bench_data(args: argparse.Namespace) -> int:
    report = run_data_bench(
        args.images,
        limit=args.limit,
        crop=args.crop,
        resize=args.resize,
        eval_crop=args.eval_crop,
        max_side=args.max_side,
        quality=args.quality,
        passes=args.passes,
        core=args.core,
        epochs=args.epochs,
        batch_size=args.batch_size,
        dataloader_workers=args.dataloader_workers,
        step_ms=args.step_ms,
        shard_mb=args.shard_mb,
        s3=args.s3,
        repeat=args.repeat,
        kernel=not args.skip_kernel,
        e2e=not args.skip_e2e,
        gpu=not args.skip_gpu,
        work_dir=args.work_dir,
        kernel_processes=args.kernel_processes,
        variants=not args.skip_variants,
        variant_max_sides=stored_variants.parse_int_list(args.variants, "--variants", 1),
        variant_qualities=stored_variants.parse_int_list(args.variant_qualities, "--variant-qualities", 1, 100),
        variant_gpu_rates=stored_variants.parse_gpu_rates(args.variant_gpu_rates),
        **peer_readers.peer_options(args),
        **sweeps.scaling_options(args),
    )
    print(format_report(report))  # the command's result (stdout); messages go through logging
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        log.info(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imagenet-ray bench data", description=__doc__.splitlines()[0])
    return run_bench_data(add_bench_data_args(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
