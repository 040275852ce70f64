"""`bench data` section 5, scaling: images/s vs cores (Ray and the DataLoader floor, with the efficiency), epoch
start and time to first batch vs the number of shards (same images, same bytes), object-store peak vs prefetch,
and the PNG plot of the three. bench/data.py lends its sides (Harness) and calls run_scaling / format_scaling.
Method and results: docs/benchmarks.md, "Scaling with work and cores (issue 14 §2)".
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imagenet_ray.bench.parquet_loader import Measure, run_parquet_loader_side
from imagenet_ray.bench.peers import format_or_dash
from imagenet_ray.bench.variants import parse_int_list
from imagenet_ray.errors import UserError

DEFAULT_PREFETCH = 2  # run_ray_side's prefetch_batches, the training runner's default
SWEEP_VAL_IMAGES = 1  # prepare writes a val split; nothing here reads it
MIB = 2**20
SWEEP_FLAGS = "--cores N,N,... (two or more), --shard-counts or --prefetch"


@dataclass(frozen=True)
class ScalingPlan:
    """What the section runs: a cores sweep when there are several core counts, the other sweeps when given."""

    core_counts: tuple[int, ...]  # ascending; the largest is also the e2e section's count
    shard_counts: tuple[int, ...] = ()
    prefetch: tuple[int, ...] = ()
    plot: str | None = None

    @property
    def cores_sweep(self) -> bool:
        return len(self.core_counts) > 1

    @property
    def wanted(self) -> bool:
        return self.cores_sweep or bool(self.shard_counts) or bool(self.prefetch)


@dataclass(frozen=True)
class Harness:
    """bench/data.py's pieces the section runs (data.py imports this module, so it lends them: no import cycle)."""

    pinned: Callable[[set[int], int], contextlib.AbstractContextManager[None]]
    build_folder_layout: Callable[[Sequence[Path], Path, int, int], Path]
    run_ray_side: Callable[..., dict[str, Any]]  # data.run_ray_side
    measure: Measure  # the timed epoch loop every DataLoader side goes through


# --- arguments --------------------------------------------------------------------------------------------------


def add_scaling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cores",
        default="2",
        metavar="N[,N,...]",
        help="cores given to each side (the first N this process may use); a list (e.g. 1,2,4) also runs the "
        "scaling section for each count, and e2e uses the largest",
    )
    p.add_argument(
        "--shard-counts",
        default="",
        metavar="N,N,...",
        help="scaling: the same train images prepared into each number of shards (same bytes), epoch start and "
        "time to first batch for each (default: off; e.g. 16,64,256,1024)",
    )
    p.add_argument(
        "--prefetch",
        default="",
        metavar="N,N,...",
        help=f"scaling: prefetch_batches values of iter_torch_batches, object-store peak and images/s for each "
        f"(default: off; e.g. 1,2,4,8; {DEFAULT_PREFETCH} is the training default)",
    )
    p.add_argument(
        "--plot", default=None, metavar="PATH", help=f"scaling: write its plot here (PNG); needs {SWEEP_FLAGS}"
    )


def parse_core_counts(text: str, allowed: int) -> tuple[int, ...]:
    """'1,2' → (1, 2) (ascending); each ≥ 1 and at most the `allowed` cores; a one-line UserError otherwise."""
    counts = tuple(sorted(parse_int_list(text, "--cores", 1)))
    if counts[-1] > allowed:
        raise UserError(
            f"bench data --cores {text!r}: {counts[-1]} is more than the {allowed} cores this process may use"
        )
    return counts


def parse_optional_list(text: str, flag: str, low: int) -> tuple[int, ...]:
    """'' → () (the sweep is off); else parse_int_list's checks."""
    return parse_int_list(text, flag, low) if text.strip() else ()


def scaling_options(args: argparse.Namespace) -> dict[str, Any]:
    """run_data_bench's keyword arguments from the command line: the e2e core count and the section's plan."""
    plan = ScalingPlan(
        core_counts=parse_core_counts(args.cores, len(os.sched_getaffinity(0))),
        shard_counts=tuple(sorted(parse_optional_list(args.shard_counts, "--shard-counts", 1))),
        prefetch=tuple(sorted(parse_optional_list(args.prefetch, "--prefetch", 0))),
        plot=args.plot,
    )
    if plan.plot and not plan.wanted:
        raise UserError(f"bench data --plot {plan.plot}: nothing to plot without {SWEEP_FLAGS}")
    return {"cores": plan.core_counts[-1], "scaling": plan if plan.wanted else None}


def check_plan(plan: ScalingPlan, train_images: int) -> None:
    """What would stop the section, checked before any section runs: a Ray already in this process (each count
    starts its own, and a process holds one), a shard count above the images (a shard holds at least one)."""
    import ray

    if ray.is_initialized():
        raise UserError(f"bench data {SWEEP_FLAGS}: the scaling section starts its own Ray; this process has one")
    check_shard_counts(plan.shard_counts, train_images)


def check_shard_counts(counts: Sequence[int], train_images: int) -> None:
    if counts and max(counts) > train_images:
        raise UserError(
            f"bench data --shard-counts {','.join(map(str, counts))}: {max(counts)} is more than the {train_images} "
            "train images (images × --repeat); each shard holds at least one"
        )


# --- arithmetic -------------------------------------------------------------------------------------------------


def efficiencies(rates: Mapping[int, float]) -> dict[int, float]:
    """rate(n) / (n × rate(n_min) / n_min): 1.0 is linear in cores from the smallest count measured."""
    n_min = min(rates)
    per_core = rates[n_min] / n_min
    return {n: (rate / (n * per_core) if per_core > 0 else 0.0) for n, rate in rates.items()}


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of log y on log x (1 = linear growth, ≤ 1 at most linear); None under two x values."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len({x for x, _ in points}) < 2:
        return None
    return float(np.polyfit([x for x, _ in points], [y for _, y in points], 1)[0])


def per_unit_cost(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Slope of the straight-line fit y = a + b·x: what each extra unit (a shard) adds; None under two x values."""
    if len(set(xs)) < 2:
        return None
    return float(np.polyfit(list(xs), list(ys), 1)[0])


def target_bytes_for(records: Sequence[Any], count: int, seed: int) -> int:
    """A shard target whose cut (prepare's own plan_shards) gives `count` train shards, or the count nearest it.

    The greedy cut closes a shard before the image that would overflow it, so total / count gives one shard
    too many; bisection on the same cut finds the smallest target with at most `count`. A cut can jump past
    `count` (a few images per shard), so the target just below is taken when its count is nearer."""
    from imagenet_ray.data.prepare import plan_shards

    cut = tuple(records)

    def shards(target: int) -> int:
        return len(plan_shards(cut, target, seed))

    lo, hi = 1, max(1, sum(r.size for r in records))
    while lo < hi:  # the shard count never grows with the target (next-fit in a fixed order)
        mid = (lo + hi) // 2
        if shards(mid) <= count:
            hi = mid
        else:
            lo = mid + 1
    if lo > 1 and shards(lo) != count and shards(lo - 1) - count < count - shards(lo):
        return lo - 1
    return lo


# --- the section ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def own_ray(cores: int) -> Iterator[None]:
    """A local Ray for one core count, as run_e2e starts it: Ray Data gets `cores`, the train worker 1 more."""
    import ray

    from imagenet_ray.runtime import start_local_ray

    start_local_ray(address="local", num_cpus=cores + 1, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def work_folder(work_dir: str | None) -> Iterator[Path]:
    if work_dir:
        path = Path(work_dir) / "scaling"
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        yield Path(tmp)


def prepare_shards(layout: Path, listing: Any, url: str, target_bytes: int) -> dict[str, Any]:
    """prepare of the layout at a shard target; what it wrote (the train split's shards)."""
    from imagenet_ray.data.prepare import PrepareOptions, prepare

    t0 = time.perf_counter()
    opts = PrepareOptions(shard_mb=target_bytes / MIB, max_quarantine_frac=1.0)  # exact: bytes = shard_mb × 2**20
    prep = prepare(str(layout), url, opts, listing=listing)
    if not prep.ok or prep.manifest is None:
        raise RuntimeError(f"prepare failed: {prep.problems}")
    shards = prep.manifest["splits"]["train"]["shards"]
    return {
        "url": url,
        "shard_mb": opts.shard_mb,
        "shards": len(shards),
        "train_images": prep.manifest["splits"]["train"]["num_images"],
        "image_bytes": sum(r.size for r in listing.train),  # the same in every cut; Parquet adds per-shard bytes
        "total_bytes": int(sum(s["bytes"] for s in shards)),
        "shard_bytes_mean": float(np.mean([s["bytes"] for s in shards])),
        "prepare_s": time.perf_counter() - t0,
    }


def _object_store_limit_mib() -> float | None:
    """Ray Data's configured object-store limit (None: unset, Ray Data then takes its share of the store)."""
    from ray.data import DataContext

    limit = DataContext.get_current().execution_options.resource_limits.object_store_memory
    return None if limit is None or math.isinf(limit) else float(limit) / MIB


@dataclass(frozen=True)
class Sides:
    """The two sides as every sweep point runs them: same settings, each point in a folder of its own."""

    harness: Harness
    work: Path
    crop: int
    epochs: int
    batch_size: int
    step_s: float

    def ray(self, url: str, prefetch: int, name: str) -> dict[str, Any]:
        where = str(self.work / name)
        return self.harness.run_ray_side(
            url, self.crop, self.epochs, self.batch_size, self.step_s, where, prefetch_batches=prefetch
        )

    def floor(self, url: str, workers: int) -> dict[str, Any]:
        return run_parquet_loader_side(url, self.crop, self.batch_size, workers, self.harness.measure)


def run_scaling(
    images: Sequence[Path],
    plan: ScalingPlan,
    harness: Harness,
    work_dir: str | None,
    crop: int,
    epochs: int,
    batch_size: int,
    step_ms: float,
    shard_mb: float,
    repeat: int,
) -> dict[str, Any]:
    """The sweeps, each count on the first N allowed cores with its own local Ray (shut down after)."""
    check_plan(plan, len(images) * repeat)
    allowed, top = sorted(os.sched_getaffinity(0)), plan.core_counts[-1]
    out: dict[str, Any] = {
        "settings": {
            "crop": crop,
            "epochs": epochs,
            "batch_size": batch_size,
            "step_ms": step_ms,
            "images_per_epoch": len(images) * repeat,
            "repeat": repeat,
            "prefetch_default": DEFAULT_PREFETCH,
            "allowed_cores": allowed,
        }
    }
    with work_folder(work_dir) as work:
        sides = Sides(harness, work, crop, epochs, batch_size, step_ms / 1000.0)
        layout = work / "layout"
        harness.build_folder_layout(images, layout, SWEEP_VAL_IMAGES, repeat)
        # The largest count first: its Ray also prepares every layout, as run_e2e does, on the same cores.
        with harness.pinned(set(allowed[:top]), 1):
            with own_ray(top):
                base, sharded = prepare_all(layout, work, shard_mb, plan.shard_counts)
                out |= sweeps_at(top, sides, base, sharded, plan.prefetch)
            points = {top: {"ray": out["base"]["ray"]}}
            if plan.cores_sweep:  # after Ray is gone: the floor has the cores to itself, as in run_e2e
                points[top]["floor"] = sides.floor(base["url"], top)
        for n in plan.core_counts[:-1]:
            with harness.pinned(set(allowed[:n]), 1):
                with own_ray(n):
                    points[n] = {"ray": sides.ray(base["url"], DEFAULT_PREFETCH, f"ray-cores-{n}")}
                points[n]["floor"] = sides.floor(base["url"], n)
        if plan.cores_sweep:
            out["cores"] = cores_sweep(points, allowed)
    if plan.plot:
        plot_scaling(out, plan.plot)
        out["plot"] = plan.plot
    return out


def prepare_all(
    layout: Path, work: Path, shard_mb: float, shard_counts: Sequence[int]
) -> tuple[dict[str, Any], list[tuple[int, dict[str, Any]]]]:
    """The base shards (--shard-mb) and, per requested count, the same images cut into that many."""
    from imagenet_ray.data.format import SPLITS
    from imagenet_ray.data.layouts import detect_and_list
    from imagenet_ray.data.prepare import PrepareOptions

    listing = detect_and_list(str(layout))  # listed once: every preparation cuts the same records
    records = tuple(listing.train)
    seed = PrepareOptions().seed + SPLITS.index("train")  # the seed prepare's plan_tasks cuts train with
    base = prepare_shards(layout, listing, str(work / "prepared"), int(shard_mb * MIB))
    sharded = [
        (count, prepare_shards(layout, listing, str(work / f"shards-{count}"), target_bytes_for(records, count, seed)))
        for count in shard_counts
    ]
    return base, sharded


def sweeps_at(
    cores: int,
    sides: Sides,
    base: dict[str, Any],
    sharded: Sequence[tuple[int, dict[str, Any]]],
    prefetch: Sequence[int],
) -> dict[str, Any]:
    """On the running Ray: the base point, then each shard count and each prefetch value (the default's point
    is the base point). The base point runs first and warms the cluster, so every later point starts alike."""
    base_side = sides.ray(base["url"], DEFAULT_PREFETCH, f"ray-cores-{cores}")
    out: dict[str, Any] = {"base": {"cores": cores, "prepare": base, "ray": base_side}}
    if sharded:
        runs = [(c, p, sides.ray(p["url"], DEFAULT_PREFETCH, f"ray-shards-{c}")) for c, p in sharded]
        out["shards"] = shard_sweep(cores, runs)
    if prefetch:
        runs_p = [
            (p, base_side if p == DEFAULT_PREFETCH else sides.ray(base["url"], p, f"ray-prefetch-{p}"))
            for p in prefetch
        ]
        out["prefetch"] = prefetch_sweep(cores, runs_p)
    return out


def cores_sweep(points: Mapping[int, Mapping[str, Any]], allowed: Sequence[int]) -> dict[str, Any]:
    """Per count: both sides' steady images/s and their efficiency against the smallest count."""
    counts = sorted(points)
    eff = {side: efficiencies({n: float(points[n][side]["images_per_s"]) for n in counts}) for side in ("ray", "floor")}
    rows = [
        {
            "cores": n,
            "core_ids": list(allowed[:n]),
            "ray_images_per_s": points[n]["ray"]["images_per_s"],
            "floor_images_per_s": points[n]["floor"]["images_per_s"],
            "ray_efficiency": eff["ray"][n],
            "floor_efficiency": eff["floor"][n],
            "ray": points[n]["ray"],
            "floor": points[n]["floor"],
        }
        for n in counts
    ]
    return {"counts": counts, "points": rows}


SHARD_COSTS = ("epoch_start_s", "time_to_first_batch_s", "dataset_open_s")


def shard_sweep(cores: int, runs: Sequence[tuple[int, dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """Per shard count (requested, actual): the start costs and the rate; their log-log slopes against shards."""
    rows = [
        {
            "requested": count,
            "actual": prep["shards"],
            "shard_mb": prep["shard_mb"],
            "shard_bytes_mean": prep["shard_bytes_mean"],
            "train_images": prep["train_images"],
            "image_bytes": prep["image_bytes"],
            "total_bytes": prep["total_bytes"],
            "prepare_s": prep["prepare_s"],
            "images_per_s": side["images_per_s"],
            "in_epoch_images_per_s": side["in_epoch_images_per_s"],
            **{key: side[key] for key in SHARD_COSTS},
            "ray": side,
        }
        for count, prep, side in runs
    ]
    shards = [float(r["actual"]) for r in rows]
    return {
        "cores": cores,
        "points": rows,
        "loglog_slope": {key: loglog_slope(shards, [r[key] for r in rows]) for key in SHARD_COSTS},
        "ms_per_shard": {key: _ms(per_unit_cost(shards, [r[key] for r in rows])) for key in SHARD_COSTS},
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def prefetch_sweep(cores: int, runs: Sequence[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """Per prefetch_batches value: the object store's peak (ObjectStoreMonitor) and the steady rate."""
    rows = [
        {
            "prefetch_batches": p,
            "object_store_peak_mib": side["object_store"]["peak_used_mib"],
            "object_store_capacity_mib": side["object_store"]["capacity_mib"],
            "spilled_mib": side["object_store"]["spilled_mib"],
            "images_per_s": side["images_per_s"],
            "ray": side,
        }
        for p, side in runs
    ]
    return {"cores": cores, "object_store_limit_mib": _object_store_limit_mib(), "points": rows}


# --- report -----------------------------------------------------------------------------------------------------


def format_scaling(section: Mapping[str, Any]) -> list[str]:
    """The printed tables (every number, with each side's epochs, is in the JSON)."""
    s = section["settings"]
    lines = [
        f"\n5. scaling: {s['images_per_epoch']} images per epoch x {s['epochs']} epochs (steady = epochs "
        f"2..{s['epochs']}), batch {s['batch_size']}; a local Ray per core count"
    ]
    if "cores" in section:
        lines.append(f"{'cores':>6s}{'Ray img/s':>11s}{'efficiency':>12s}{'floor img/s':>13s}{'efficiency':>12s}")
        for r in section["cores"]["points"]:
            lines.append(
                f"{r['cores']:6d}{r['ray_images_per_s']:11.0f}{r['ray_efficiency']:12.2f}"
                f"{r['floor_images_per_s']:13.0f}{r['floor_efficiency']:12.2f}"
            )
        lines.append(
            "  efficiency = rate(n) / (n x rate(n_min) / n_min); floor = DataLoader over our Parquet, our kernel"
        )
    if "shards" in section:
        sh = section["shards"]
        lines.append(
            f"shards, same images ({sh['points'][0]['image_bytes'] / MIB:,.0f} MiB of JPEGs), on {sh['cores']} cores:"
            f"\n{'requested':>10s}{'actual':>8s}{'MiB/shard':>11s}{'open s':>9s}{'1st batch s':>13s}"
            f"{'epoch start s':>15s}{'img/s':>8s}"
        )
        for r in sh["points"]:
            lines.append(
                f"{r['requested']:10d}{r['actual']:8d}{r['shard_bytes_mean'] / MIB:11.2f}{r['dataset_open_s']:9.2f}"
                f"{r['time_to_first_batch_s']:13.2f}{r['epoch_start_s']:15.2f}{r['images_per_s']:8.0f}"
            )
        for key in SHARD_COSTS:
            slope = sh["loglog_slope"][key]
            verdict = "—" if slope is None else ("at most linear" if slope <= 1.0 else "WORSE THAN LINEAR")
            lines.append(
                f"  {key} vs shards: log-log slope {format_or_dash(slope, '.2f')} ({verdict}), "
                f"{format_or_dash(sh['ms_per_shard'][key], '.2f')} ms per extra shard"
            )
    if "prefetch" in section:
        pf = section["prefetch"]
        limit = pf["object_store_limit_mib"]
        lines.append(
            f"prefetch_batches, on {pf['cores']} cores (Ray Data's object-store limit: "
            f"{'unset' if limit is None else f'{limit:.0f} MiB'}):\n"
            f"{'prefetch':>9s}{'store peak MiB':>16s}{'of MiB':>9s}{'spilled MiB':>13s}{'img/s':>8s}"
        )
        for r in pf["points"]:
            lines.append(
                f"{r['prefetch_batches']:9d}{r['object_store_peak_mib']:16.0f}{r['object_store_capacity_mib']:9.0f}"
                f"{r['spilled_mib']:13.0f}{r['images_per_s']:8.0f}"
            )
    if "plot" in section:
        lines.append(f"  plot: {section['plot']}")
    return lines


def plot_scaling(section: Mapping[str, Any], path: str) -> None:
    """One PNG, a panel per sweep that ran: images/s vs cores, start costs vs shards, store peak vs prefetch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [
        draw
        for key, draw in (("cores", _cores_panel), ("shards", _shards_panel), ("prefetch", _prefetch_panel))
        if key in section
    ]
    if not panels:
        raise UserError(f"bench data --plot {path}: nothing to plot without {SWEEP_FLAGS}")
    fig = Figure(figsize=(5.0 * len(panels), 4.0), layout="constrained")  # no pyplot: no global backend state
    FigureCanvasAgg(fig)
    for ax, draw in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels, strict=True):
        draw(ax, section)
    s = section["settings"]
    fig.suptitle(f"bench data scaling: {s['images_per_epoch']} images/epoch, batch {s['batch_size']}, steady epochs")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)


def _cores_panel(ax: Any, section: Mapping[str, Any]) -> None:
    rows = section["cores"]["points"]
    cores = [r["cores"] for r in rows]
    for key, label in (("ray_images_per_s", "Ray Data → Ray Train"), ("floor_images_per_s", "floor: DataLoader")):
        (line,) = ax.plot(cores, [r[key] for r in rows], marker="o", label=label)
        ideal = [rows[0][key] * n / cores[0] for n in cores]  # linear from the smallest count
        ax.plot(cores, ideal, linestyle="--", color=line.get_color(), alpha=0.6, label=f"{label.split(':')[0]}, linear")
    ax.set(xlabel="cores", ylabel="images/s (steady)", title="throughput vs cores", xticks=cores)
    ax.legend()


def _shards_panel(ax: Any, section: Mapping[str, Any]) -> None:
    rows = section["shards"]["points"]
    shards = [r["actual"] for r in rows]
    labels = {
        "time_to_first_batch_s": "first batch, epoch 1",
        "epoch_start_s": "epoch start, steady",
        "dataset_open_s": "open + plan (driver)",
    }
    for key, label in labels.items():
        ax.plot(shards, [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xticks(shards, [str(n) for n in shards], minor=False)
    ax.set_xticks([], minor=True)  # the shard counts only, not log decades
    title = f"start costs vs shards ({section['shards']['cores']} cores)"
    ax.set(xlabel="shards (same bytes)", ylabel="seconds", title=title)
    ax.legend()


def _prefetch_panel(ax: Any, section: Mapping[str, Any]) -> None:
    rows = section["prefetch"]["points"]
    xs = [r["prefetch_batches"] for r in rows]
    ax.plot(xs, [r["object_store_peak_mib"] for r in rows], marker="o")
    if min(xs) > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set(
        xlabel="prefetch_batches",
        ylabel="object store peak (MiB)",
        title=f"object store vs prefetch ({section['prefetch']['cores']} cores)",
    )
