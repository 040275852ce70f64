"""`bench data` peers from object storage: Mosaic Streaming and LitData over the same images on the same S3
server, each decoding with our kernel and with its documented default (PIL + torchvision), plus the floor
(a DataLoader over our Parquet with our kernel, bench/parquet_loader.py); S3 bytes and CPU split per side.
The peer packages are optional (the `bench` extra, docs/benchmarks.md): a missing one is a skip record.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import io
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imagenet_ray.bench.parquet_loader import Measure, run_parquet_loader_side
from imagenet_ray.bench.s3_meter import S3Meter, epoch_bytes, upstream_of
from imagenet_ray.errors import UserError
from imagenet_ray.runtime import temporary_env

log = logging.getLogger(__name__)

SIDES = ("parquet", "mosaic", "litdata")
DECODERS = ("ours", "default")
PACKAGES = {"mosaic": "mosaicml-streaming", "litdata": "litdata"}
NOT_INSTALLED = "not installed"
TASK_WORKERS = "ray: task workers (read + decode)"
FLOOR_GOAL = 0.9  # Ray (S3) / DataLoader over our Parquet with our kernel, steady state, on 2 cores
LABELS = {
    "parquet:ours": "DataLoader(our Parquet), our kernel",
    "mosaic:ours": "Mosaic StreamingDataset, our kernel",
    "mosaic:default": "Mosaic StreamingDataset, PIL+torchvision",
    "litdata:ours": "LitData StreamingDataset, our kernel",
    "litdata:default": "LitData StreamingDataset, PIL+torchvision",
}


# --- arguments --------------------------------------------------------------------------------------------------


def parse_choices(text: str, allowed: Sequence[str], flag: str) -> tuple[str, ...]:
    """'a,b' → ('a', 'b'), in `allowed`'s order; UserError naming the flag for anything else."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise UserError(f"bench data {flag} {text}: expected a comma-separated subset of {','.join(allowed)}")
    return tuple(a for a in allowed if a in items)


def add_peer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--peers",
        default=",".join(SIDES),
        metavar="SIDE,...",
        help="e2e with --s3: the other readers from S3 (parquet = DataLoader over our shards with our kernel, "
        "mosaic = mosaicml-streaming, litdata); a peer whose package is missing is skipped",
    )
    p.add_argument(
        "--peer-decoders",
        default=",".join(DECODERS),
        metavar="D,...",
        help="e2e peers: ours (the kernel Ray Data maps) and/or default (PIL + torchvision transforms)",
    )
    p.add_argument("--skip-peers", action="store_true", help="e2e: leave the peer readers out")


def peer_options(args: argparse.Namespace) -> dict[str, Any]:
    """run_data_bench's keyword arguments for the peers, from the parsed command line."""
    sides = () if args.skip_peers else parse_choices(args.peers, SIDES, "--peers")
    return {"peer_sides": sides, "peer_decoders": parse_choices(args.peer_decoders, DECODERS, "--peer-decoders")}


def missing_package(side: str) -> str | None:
    """The peer's distribution name when it is not installed here, else None."""
    name = PACKAGES.get(side)
    if name is None:
        return None
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return name
    return None


def skip_record(side: str, reason: str = NOT_INSTALLED) -> dict[str, Any]:
    return {"skipped": reason, "package": PACKAGES.get(side, ""), "install": "docs/benchmarks.md (bench extra)"}


# --- where the CPU goes -----------------------------------------------------------------------------------------


def process_group(name: str, cmdline: str, pid: int, own: dict[int, str]) -> str:
    """What a process under the bench is, for the CPU split (from its name and title)."""
    if pid in own:
        return own[pid]
    if name in ("raylet", "gcs_server"):
        return "ray: raylet + gcs"
    if cmdline.startswith("ray::"):
        title = cmdline.split()[0]
        if "RayTrainWorker" in title:
            return "train worker"
        if any(k in title for k in ("Coordinator", "Controller", "Actor", "Requester", "Manager")):
            return "ray: actors (split coordinator, controller, stats)"
        return TASK_WORKERS  # IDLE between tasks: their CPU is the tasks'
    if "workers/default_worker.py" in cmdline:  # a Ray worker seen before it set its ray:: title
        return TASK_WORKERS
    if "ray" in cmdline and any(k in cmdline for k in ("dashboard/", "monitor.py", "agent.py", "runtime_env")):
        return "ray: dashboard, agents, monitors"
    if "weed" in name or "weed" in cmdline.split(" ", 1)[0]:
        return "S3 server"
    return "loader workers + other"


class CpuSplit:
    """CPU seconds of this process and every descendant while a side runs, grouped (process_group); sampled
    every `interval` s so that processes which exit meanwhile still count up to their last sample."""

    def __init__(self, own: dict[int, str] | None = None, interval: float = 1.0) -> None:
        self.own = {os.getpid(): "driver", **(own or {})}
        self.interval, self._stop = interval, threading.Event()
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._group: dict[int, str] = {}
        self._parent: dict[int, int] = {}
        self._title: dict[int, str] = {}
        self._thread = threading.Thread(target=self._run, name="cpu-split", daemon=True)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                cpu = t.user + t.system
                cmd = " ".join(proc.cmdline())
                self._first.setdefault(proc.pid, cpu if proc.pid in self._started else 0.0)
                self._last[proc.pid] = cpu
                self._parent[proc.pid] = proc.ppid()
                self._title.setdefault(proc.pid, cmd[:100])
                group = process_group(proc.name(), cmd, proc.pid, self.own)
                if self._group.get(proc.pid, TASK_WORKERS) == TASK_WORKERS:
                    self._group[proc.pid] = group  # a worker's later title (an actor's, the train worker's) wins

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> CpuSplit:
        import psutil

        me = psutil.Process()
        self._started = {p.pid for p in [me, *me.children(recursive=True)]}
        self._reaped0 = me.cpu_times().children_user + me.cpu_times().children_system
        self._sample()
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        import psutil

        self._sample()
        window = time.perf_counter() - self._t0
        groups: dict[str, float] = {}
        for pid, last in self._last.items():
            groups[self._group[pid]] = groups.get(self._group[pid], 0.0) + last - self._first[pid]
        # Children that exited and were reaped meanwhile (DataLoader workers) count in full from the kernel's
        # totals, less what the samples already gave them.
        me, alive = os.getpid(), set(psutil.pids())
        reaped = psutil.Process().cpu_times().children_user + psutil.Process().cpu_times().children_system
        sampled = sum(
            self._last[p] - self._first[p] for p, parent in self._parent.items() if parent == me and p not in alive
        )
        extra = reaped - self._reaped0 - sampled
        if extra > 0:
            groups["loader workers + other"] = groups.get("loader workers + other", 0.0) + extra
        total = sum(groups.values())
        busiest = sorted(self._last, key=lambda p: self._first[p] - self._last[p])[:8]
        self.result = {
            "window_s": window,
            "cores_used": total / window if window else 0.0,
            "groups": {
                g: {"cpu_s": s, "cores": s / window if window else 0.0}
                for g, s in sorted(groups.items(), key=lambda kv: -kv[1])
            },
            "busiest": [
                {"group": self._group[p], "title": self._title[p], "cpu_s": self._last[p] - self._first[p]}
                for p in busiest
            ],
        }


class Observed:
    """While a side runs: its S3 traffic through a byte counter (when the endpoint is a plain http:// one,
    as the bench's own SeaweedFS is) and the CPU split of every process under the bench."""

    def __init__(self) -> None:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        try:
            upstream_of(endpoint)
            self.meter: S3Meter | None = S3Meter(endpoint)
        except UserError:
            self.meter = None  # a remote endpoint (https): bytes are not counted
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Observed:
        self.started = time.perf_counter()
        if self.meter is not None:
            self._stack.enter_context(self.meter.routed())
        own = {self.meter.pid: "S3 meter (relay)"} if self.meter is not None else {}
        self.cpu = self._stack.enter_context(CpuSplit(own))
        return self

    def annotate(self, side: dict[str, Any]) -> dict[str, Any]:
        """Add "s3_read" (per epoch) and "meter_cpu_s" to a side's result; call inside the `with`."""
        if self.meter is not None and side.get("epochs"):
            side["s3_read"] = epoch_bytes(self.meter, side["epochs"], self.started)
            side["meter_cpu_s"] = self.meter.cpu_s()
        return side

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        if self.meter is not None:
            self.meter.close()


def observed(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """run() with its S3 bytes and CPU split recorded into its result."""
    with Observed() as obs:
        side = run()
        obs.annotate(side)
    side["cpu"] = obs.cpu.result
    return side


# --- decoders and the peers' formats ----------------------------------------------------------------------------

_RNGS: dict[int, np.random.Generator] = {}


def _rng() -> np.random.Generator:
    # One generator per process (DataLoader workers are forked): fresh OS entropy, as pipeline._train_map.
    return _RNGS.setdefault(os.getpid(), np.random.default_rng())


def sample_decoder(decoder: str, crop: int) -> Callable[[bytes], Any]:
    """bytes → one training sample: "ours" = transforms.train_image (the kernel Ray Data maps, per image:
    uint8 HWC), "default" = PIL open + RandomResizedCrop + flip + ToTensor + Normalize (float CHW)."""
    if decoder == "ours":
        from imagenet_ray.data import transforms

        return lambda data: transforms.train_image(data, crop, _rng())
    import torchvision.transforms as T
    from PIL import Image

    from imagenet_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    ref = T.Compose(
        [T.RandomResizedCrop(crop), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    return lambda data: ref(Image.open(io.BytesIO(data)).convert("RGB"))


def train_shard_paths(local_url: str) -> list[str]:
    from imagenet_ray.data.format import open_prepared

    return open_prepared(local_url).shard_paths("train")[1]


def shard_rows(path: str) -> Iterator[dict[str, Any]]:
    """The rows of one local prepared shard as {"image": bytes, "label": int} (LitData's optimize fn)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["image", "label"])
    for image, label in zip(table.column("image").to_pylist(), table.column("label").to_pylist(), strict=True):
        yield {"image": image, "label": int(label)}


def write_mds(local_url: str, remote: str) -> dict[str, Any]:
    """The train split as MDS shards at `remote` (MDSWriter's defaults: 64 MiB shards, no compression)."""
    from streaming import MDSWriter

    t0, n = time.perf_counter(), 0
    with (
        temporary_env({"S3_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]}),
        MDSWriter(out=remote, columns={"image": "bytes", "label": "int"}, progress_bar=False) as writer,
    ):
        for path in train_shard_paths(local_url):
            for row in shard_rows(path):
                writer.write(row)
                n += 1
    return {"wall_s": time.perf_counter() - t0, "images": n, "url": remote}


def litdata_allow_http() -> None:
    """LitData 0.2.76 sends chunk GETs/PUTs through obstore, whose client refuses an http:// endpoint (a local
    S3 server) unless allow_http is set, and LitData neither sets it nor reads it from the environment; its
    client options are one module-level dict, which forked workers inherit."""
    from litdata.streaming import downloader

    options: dict[str, Any] = downloader._OBSTORE_CLIENT_OPTIONS
    options["allow_http"] = True


def write_litdata(local_url: str, remote: str, workers: int) -> dict[str, Any]:
    """The train split as LitData chunks at `remote` (litdata.optimize, chunk_bytes="64MB" as its docs show)."""
    import litdata

    litdata_allow_http()
    t0 = time.perf_counter()
    litdata.optimize(
        fn=shard_rows,
        inputs=train_shard_paths(local_url),
        output_dir=remote,
        chunk_bytes="64MB",
        num_workers=workers,
        storage_options={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]},
        verbose=False,
        start_method="fork",  # its workers keep litdata_allow_http (the default, spawn, would not)
    )
    return {"wall_s": time.perf_counter() - t0, "url": remote}


def close_loader(loader: Any) -> None:
    """Stop a DataLoader's persistent workers now, not when it is collected: a forked worker of the next side
    would otherwise inherit it and fail in its __del__."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        iterator._shutdown_workers()
        loader._iterator = None


def _loader_kwargs(batch_size: int, workers: int) -> dict[str, Any]:
    # As the existing DataLoader side: persistent workers, prefetch 2.
    return {
        "batch_size": batch_size,
        "num_workers": workers,
        "persistent_workers": workers > 0,
        "prefetch_factor": 2 if workers > 0 else None,
    }


def run_mosaic_side(
    remote: str, cache: Path, decoder: str, crop: int, batch_size: int, workers: int, measure: Measure
) -> dict[str, Any]:
    """StreamingDataset(remote, local=cache, shuffle) subclassed to decode in __getitem__ (Mosaic's documented
    way), in a torch DataLoader; its cache is emptied first, so epoch 1 is cold."""
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory
    from torch.utils.data import DataLoader

    decode = sample_decoder(decoder, crop)

    class Decoded(StreamingDataset):
        def __getitem__(self, idx: int) -> Any:
            sample = super().__getitem__(idx)
            return decode(sample["image"]), sample["label"]

    shutil.rmtree(cache, ignore_errors=True)
    clean_stale_shared_memory()
    with temporary_env({"S3_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]}):
        dataset = Decoded(remote=remote, local=str(cache), shuffle=True, batch_size=batch_size)
        loader: Any = DataLoader(dataset, **_loader_kwargs(batch_size, workers))
        out = measure(lambda _e: loader)
        close_loader(loader)
    out["workers"] = workers
    return out


def run_litdata_side(
    remote: str, cache: Path, decoder: str, crop: int, batch_size: int, workers: int, measure: Measure
) -> dict[str, Any]:
    """litdata.StreamingDataset(remote, cache_dir, shuffle, transform=decode) in its StreamingDataLoader;
    cache emptied first (cold epoch 1)."""
    import litdata

    decode = sample_decoder(decoder, crop)
    litdata_allow_http()

    def transform(item: dict[str, Any]) -> Any:
        return decode(item["image"]), item["label"]

    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    dataset = litdata.StreamingDataset(
        remote,
        cache_dir=str(cache),
        shuffle=True,
        transform=transform,
        storage_options={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]},
    )
    loader = litdata.StreamingDataLoader(dataset, **_loader_kwargs(batch_size, workers))
    out = measure(lambda _e: loader)
    close_loader(loader)
    out["workers"] = workers
    return out


# --- the section ------------------------------------------------------------------------------------------------


def run_peer_sides(
    local_url: str,
    s3_url: str,
    work: Path,
    crop: int,
    batch_size: int,
    workers: int,
    measure: Measure,
    sides: Sequence[str] = SIDES,
    decoders: Sequence[str] = DECODERS,
) -> dict[str, Any]:
    """Every requested side against the S3 server in the AWS_* environment (the shards already at `s3_url`);
    the peers' own formats are written next to them first."""
    out: dict[str, Any] = {"sides": {}, "writes": {}, "workers": workers}
    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # it would ask PyPI at every dataset
    base = s3_url.rstrip("/") + "-peers"
    for side in sides:
        if side == "parquet":
            out["sides"]["parquet:ours"] = observed(
                lambda: run_parquet_loader_side(s3_url, crop, batch_size, workers, measure)
            )
            continue
        missing = missing_package(side)
        if missing is not None:
            log.warning(f"bench data: {missing} is not installed: skipping the {side} side (docs/benchmarks.md)")
            for d in decoders:
                out["sides"][f"{side}:{d}"] = skip_record(side)
            continue
        remote = f"{base}/{side}"
        try:
            out["writes"][side] = (
                write_mds(local_url, remote) if side == "mosaic" else write_litdata(local_url, remote, workers)
            )
        except ImportError as exc:  # installed but broken here (e.g. a dependency it imports is missing)
            log.warning(f"bench data: {PACKAGES[side]} does not import: {exc}: skipping the {side} side")
            for d in decoders:
                out["sides"][f"{side}:{d}"] = skip_record(side, f"import failed: {exc}")
            continue
        run = run_mosaic_side if side == "mosaic" else run_litdata_side
        cache = work / f"{side}-cache"
        for d in decoders:
            try:
                out["sides"][f"{side}:{d}"] = observed(
                    functools.partial(run, remote, cache, d, crop, batch_size, workers, measure)
                )
            except Exception as exc:  # a peer's own failure is its side's result, not the whole benchmark's
                reason = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
                log.warning(f"bench data: the {side}:{d} side {reason}")
                out["sides"][f"{side}:{d}"] = skip_record(side, reason)
            shutil.rmtree(cache, ignore_errors=True)
    return out


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str = "images_per_s") -> float | None:
    if not a or not b or not b.get(key) or key not in a:
        return None
    return float(a[key]) / float(b[key])


def summarise(e2e: dict[str, Any]) -> dict[str, Any]:
    """Ray (S3, and local) / each side in steady state, and the issue's goals, met or not (None: not measured)."""
    sides = e2e["peers"]["sides"]
    ray_s3, ray, cached = e2e.get("ray_s3"), e2e.get("ray"), e2e.get("ray_s3_cached")
    ratios = {
        name: {"ray_s3": _ratio(ray_s3, s), "ray_local": _ratio(ray, s), "ray_s3_cached": _ratio(cached, s)}
        for name, s in sides.items()
        if "skipped" not in s
    }

    def r(name: str, ray_side: str = "ray_s3") -> float | None:
        return ratios.get(name, {}).get(ray_side)

    floor = r("parquet:ours")
    goals: dict[str, Any] = {
        "ray_vs_floor": {
            "value": floor,
            "target": f">= {FLOOR_GOAL}",
            "met": None if floor is None else floor >= FLOOR_GOAL,
        }
    }
    # The peers keep shards on local disk after epoch 1: Ray against them with its node cache when measured.
    like_peers = "ray_s3_cached" if cached is not None else "ray_s3"
    for peer in ("mosaic", "litdata"):
        same, default = r(f"{peer}:ours", like_peers), r(f"{peer}:default", like_peers)
        goals[f"ahead_of_{peer}_same_kernel"] = {
            "value": same,
            "target": "> 1",
            "met": None if same is None else same > 1,
        }
        more = None if same is None or default is None else default > same
        goals[f"further_ahead_of_{peer}_default"] = {"value": default, "target": f"> {peer}:ours ratio", "met": more}
    return {"ratios": ratios, "goals": goals, "peer_goals_ray_side": like_peers}


def format_or_dash(x: float | None, fmt: str) -> str:
    """A report cell: `x` formatted, or a dash where it was not measured."""
    return "—" if x is None else format(x, fmt)


def format_table(e2e: dict[str, Any]) -> list[str]:
    p = e2e["peers"]
    lines = [
        f"\n2b. readers from S3 (same cores, {p['workers']} DataLoader workers, batch {e2e['batch_size']}; epoch 1 "
        f"cold cache, steady = epochs 2..{e2e['epochs']}; S3 bytes per image from the byte counter)",
        f"{'':44s}{'epoch 1':>9s}{'steady':>9s}{'S3 B/img 1':>12s}{'S3 B/img st':>12s}{'Ray(S3)/side':>13s}",
    ]
    rows = [("ray_s3", "Ray Data -> Ray Train, Parquet on S3", e2e.get("ray_s3"))]
    rows += [("ray_s3_cached", "  the same, shards cached on the node", e2e.get("ray_s3_cached"))]
    rows += [(name, LABELS.get(name, name), s) for name, s in p["sides"].items()]
    ratios = p.get("summary", {}).get("ratios", {})
    for name, label, s in rows:
        if not s:
            continue
        if "skipped" in s:
            lines.append(f"{label:44s}skipped: {s['skipped']}")
            continue
        read = s.get("s3_read", {})
        ratio = 1.0 if name == "ray_s3" else ratios.get(name, {}).get("ray_s3")
        if name == "ray_s3_cached":
            ratio = _ratio(e2e.get("ray_s3"), s)
        lines.append(
            f"{label:44s}{s['first_epoch_images_per_s']:9.0f}{s['images_per_s']:9.0f}"
            f"{format_or_dash(read.get('first_epoch_bytes_per_image'), ',.0f'):>12s}"
            f"{format_or_dash(read.get('steady_bytes_per_image'), ',.0f'):>12s}{format_or_dash(ratio, '.2f'):>12s}x"
        )
    for name, goal in p.get("summary", {}).get("goals", {}).items():
        met = {True: "met", False: "MISSED", None: "not measured"}[goal["met"]]
        lines.append(f"  goal {name}: {format_or_dash(goal['value'], '.2f')} (target {goal['target']}): {met}")
    for name, s in (("ray_s3", e2e.get("ray_s3")), ("parquet:ours", p["sides"].get("parquet:ours"))):
        if s and "cpu" in s:
            groups = ", ".join(f"{g} {v['cores']:.2f}" for g, v in s["cpu"]["groups"].items() if v["cores"] >= 0.01)
            lines.append(f"  CPU, {name}: {s['cpu']['cores_used']:.2f} cores used: {groups}")
    return lines
