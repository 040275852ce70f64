"""System metrics of every Ray node into the training run: MLflow's `SystemMetricsMonitor` in a `num_cpus=0`
actor on each node (`system/<node>/...`, with the node's object store), the cluster's object store and
spilling from the driver (`system/ray/...`), and the train workers' GPU memory as torch sees it. Nothing
here raises: an MLflow outage or a dead node is logged once and costs training nothing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from mlflow.system_metrics.metrics.base_metrics_monitor import BaseMetricsMonitor
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from imagenet_ray.redact import redact_url
from imagenet_ray.runtime import configure_worker_logging
from imagenet_ray.tracking import RunSink

if TYPE_CHECKING:  # the node monitors never import torch: they stay small on every node
    import torch

log = logging.getLogger(__name__)

NODE_GROUP_LABELS = ("imagenet-ray/node-group", "ray.io/node-group")
CLUSTER_NODE_ID = "ray"  # system/ray/...: the cluster-wide Ray Data side, logged by the driver
_MB = 1e6  # MLflow's system metrics count megabytes in 10**6 bytes
_RPC_TIMEOUT_S = 10.0


# -- node names ---------------------------------------------------------------------------------------
def _base_name(node: Mapping[str, Any]) -> str:
    labels = node.get("Labels") or {}
    group = next((str(labels[k]) for k in NODE_GROUP_LABELS if labels.get(k)), "")
    ip = str(node.get("NodeManagerAddress") or node.get("NodeName") or str(node["NodeID"])[:12])
    # MLflow metric names allow letters, digits, _ - . : / and spaces; a / would add a level.
    return re.sub(r"[^\w.:-]", "_", f"{group}-{ip}" if group else ip)


def node_names(nodes: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Ray node id → metric name of each node of `ray.nodes()`: `<group label>-<IP>` (`decode-10.0.3.7`;
    labels `imagenet-ray/node-group`, then KubeRay's `ray.io/node-group`) or `<IP>`: what `ray status`, the
    dashboard and `kubectl get pods -o wide` show, distinct per machine. Nodes sharing it (several raylets
    on one host) add `-<first 6 hex digits of the node id>`."""
    base = {str(n["NodeID"]): _base_name(n) for n in nodes}
    shared = Counter(base.values())
    return {nid: name if shared[name] == 1 else f"{name}-{nid[:6]}" for nid, name in base.items()}


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


_current_node_name: list[str] = []  # found once per process (a worker never changes node)


def current_node_name() -> str:
    """This process's node's metric name (a Ray worker's, as `node_names` gives it); its hostname where
    Ray does not answer (not remembered: the next call asks Ray again)."""
    if not _current_node_name:
        try:
            import ray

            if not ray.is_initialized():  # asking it would start a local Ray
                raise RuntimeError("not in Ray")
            node_id = ray.get_runtime_context().get_node_id()
            _current_node_name.append(node_names(alive_nodes())[node_id])
        except Exception:  # not in Ray, or the GCS did not answer: still a name a user recognises
            return re.sub(r"[^\w.:-]", "_", os.uname().nodename)
    return _current_node_name[0]


# -- MLflow monitors that keep going ------------------------------------------------------------------
def _run_status(tracking_uri: str, run_id: str) -> str | None:
    """The run's status, or None where MLflow did not answer."""
    try:
        return RunSink(tracking_uri, run_id).read()[0]
    except Exception:
        return None


class SupervisedMonitor:
    """Keeps one MLflow `SystemMetricsMonitor` (built by `make`) running while the run is RUNNING.

    MLflow's loop ends for good at its first failed request or once the run is no longer RUNNING (rank 0
    ends it after the last epoch; a time box ends it, a resubmission reopens it): every `check_every_s`
    this starts a new one (its steps continue: `resume_logging`) when the old one ended and the run is
    RUNNING. An outage is logged once, at WARNING, and once more when MLflow answers again."""

    def __init__(
        self, make: Callable[[], SystemMetricsMonitor], tracking_uri: str, run_id: str, what: str, check_every_s: float
    ) -> None:
        self._make, self.tracking_uri, self.run_id, self.what = make, tracking_uri, run_id, what
        self.check_every_s = check_every_s
        self.monitor: SystemMetricsMonitor | None = None
        self.starts = 0
        self._stop = threading.Event()
        self._outage = False
        self._thread = threading.Thread(target=self._keep_running, daemon=True, name=f"system-metrics {what}")

    def start(self) -> SupervisedMonitor:
        self._thread.start()
        return self

    def _alive(self) -> bool:
        # MLflow keeps its loop's thread in `_process` (None when it failed to start).
        thread = getattr(self.monitor, "_process", None)
        return thread is not None and thread.is_alive()

    def _keep_running(self) -> None:
        while not self._stop.is_set():
            if not self._alive():
                self._start_if_running()
            self._stop.wait(self.check_every_s)

    def _start_if_running(self) -> None:
        status = _run_status(self.tracking_uri, self.run_id)
        if status is None:
            if not self._outage:
                where = redact_url(self.tracking_uri)
                log.warning(f"system metrics of {self.what}: MLflow at {where} does not answer; retrying")
            self._outage = True
            return
        if self._outage:
            log.warning(f"system metrics of {self.what}: MLflow answers again")
            self._outage = False
        if status != "RUNNING":
            return
        try:
            monitor = self._make()
            if self._stop.is_set():
                return
            monitor.start()
            self.monitor, self.starts = monitor, self.starts + 1
        except Exception as exc:  # building it reads the run (resume_logging): MLflow may have gone again
            log.debug(f"system metrics of {self.what}: could not start: {exc}")

    def stop(self, timeout_s: float) -> None:
        """Stop and flush, within about `timeout_s` (a hung MLflow request is left to its daemon thread)."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        monitor, self.monitor = self.monitor, None
        if monitor is None:
            return
        # finish() joins MLflow's loop and flushes what it buffered; both can wait on MLflow's retries.
        finishing = threading.Thread(target=monitor.finish, daemon=True, name=f"system-metrics {self.what} finish")
        finishing.start()
        finishing.join(max(0.0, deadline - time.monotonic()))
        if finishing.is_alive():
            log.warning(f"system metrics of {self.what}: MLflow did not take the last samples within {timeout_s:.0f} s")


def _system_metrics_monitor(
    run_id: str, tracking_uri: str, every_s: float, node_id: str | None, monitors: list[BaseMetricsMonitor] | None
) -> SystemMetricsMonitor:
    """MLflow's monitor for `run_id` under `system/<node_id>/`; `monitors` replaces its CPU/disk/network/GPU set."""
    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=every_s, resume_logging=True, node_id=node_id, tracking_uri=tracking_uri
    )
    # MLFLOW_SYSTEM_METRICS_NODE_ID, if set in the environment, would give every node the same name.
    monitor.node_id = node_id
    if monitors is not None:
        monitor.monitors = monitors
    return monitor


# -- the Ray side: the object store -------------------------------------------------------------------
class SampledMonitor(BaseMetricsMonitor):
    """An MLflow metrics monitor of `sample()`'s dict; a failing sample is skipped (warned about once), so
    that MLflow's loop goes on. Aggregates to the last sample (levels and running totals)."""

    what = "metrics"

    def __init__(self) -> None:
        super().__init__()
        self._warned = False

    def sample(self) -> dict[str, float]:
        raise NotImplementedError

    def collect_metrics(self) -> None:
        try:
            sampled = self.sample()
        except Exception as exc:  # a Ray that moved its private helpers, or a raylet that did not answer
            if not self._warned:
                log.warning(f"system metrics: no {self.what} ({type(exc).__name__}: {exc}); skipping them")
            self._warned = True
            return
        for key, value in sampled.items():
            self._metrics[key].append(value)

    def aggregate_metrics(self) -> dict[str, float]:
        return {k: v[-1] for k, v in self._metrics.items() if v}


def _store_metrics(stats: Any) -> dict[str, float]:
    """MB of an ObjectStoreStats message (`ray memory --stats-only`'s source)."""
    out = {
        "object_store_used_mb": stats.object_store_bytes_used / _MB,
        "object_store_fallback_mb": stats.object_store_bytes_fallback / _MB,  # on disk: plasma was full
        "spilled_mb": stats.spilled_bytes_total / _MB,
        "restored_mb": stats.restored_bytes_total / _MB,
    }
    if stats.object_store_bytes_avail > 0:  # the store's capacity
        out["object_store_capacity_mb"] = stats.object_store_bytes_avail / _MB
        out["object_store_used_percentage"] = 100 * stats.object_store_bytes_used / stats.object_store_bytes_avail
    return out


class ClusterStoreMonitor(SampledMonitor):
    """The whole cluster's object store (used, capacity, spilled, restored) and its alive nodes, from the
    driver: one request to a raylet, which asks every node (what `ray memory --stats-only` prints)."""

    what = "object store stats of the cluster"

    def sample(self) -> dict[str, float]:
        import ray._private.state
        from ray._private.internal_api import get_memory_info_reply

        state = ray._private.state.state
        metrics = _store_metrics(get_memory_info_reply(state, timeout_seconds=_RPC_TIMEOUT_S).store_stats)
        metrics["alive_nodes"] = float(sum(1 for n in state.node_table() if n["Alive"]))
        return metrics


class NodeStoreMonitor(SampledMonitor):
    """One node's object store, from its own raylet (the node actor's neighbour)."""

    what = "object store stats of this node"

    def __init__(self, raylet_address: str, raylet_port: int) -> None:
        super().__init__()
        self.raylet_address, self.raylet_port = raylet_address, raylet_port

    def sample(self) -> dict[str, float]:
        from ray._private.internal_api import node_stats

        return _store_metrics(node_stats(self.raylet_address, self.raylet_port, include_memory_info=False).store_stats)


# -- the node actors --------------------------------------------------------------------------------
class NodeMonitor:
    """Ray actor (started with `num_cpus=0` on one node): MLflow's system metrics of this node, under
    `system/<node_name>/`, with this node's object store."""

    def __init__(
        self, run_id: str, tracking_uri: str, every_s: float, node_name: str, raylet_address: str, raylet_port: int
    ) -> None:
        configure_worker_logging()
        self.node_name = node_name

        def make() -> SystemMetricsMonitor:
            monitor = _system_metrics_monitor(run_id, tracking_uri, every_s, node_name, None)
            monitor.monitors.append(NodeStoreMonitor(raylet_address, raylet_port))
            return monitor

        self.supervised = SupervisedMonitor(make, tracking_uri, run_id, node_name, check_every_s=every_s).start()

    def ready(self) -> str:
        return self.node_name

    def stop(self, timeout_s: float) -> int:
        """Stop and flush; the number of times MLflow's monitor was started."""
        self.supervised.stop(timeout_s)
        return self.supervised.starts


@functools.cache
def _node_monitor_actor() -> Any:
    import ray

    # max_restarts=0: the monitor goes with its node; the driver places one on a node that joins.
    return ray.remote(num_cpus=0, max_restarts=0)(NodeMonitor)


class NodeMonitors:
    """The system metrics of a training run: a `NodeMonitor` on every alive node (train and decode nodes),
    the cluster's object store from here (the driver), and a look for new nodes (autoscaling, a replaced
    node) every `refresh_every_s`; a node that dies takes its monitor with it. The monitors hold no
    resources, but Ray's idle detection may count a live actor as work: a node left idle during the fit
    may stay up until the fit ends.

    `names`: Ray node id → the `<node>` in `system/<node>/...` of every node monitored so far."""

    def __init__(
        self,
        run_id: str,
        tracking_uri: str,
        every_s: float,
        refresh_every_s: float = 30.0,
        stop_timeout_s: float = 20.0,
    ) -> None:
        self.run_id, self.tracking_uri, self.every_s = run_id, tracking_uri, every_s
        self.refresh_every_s, self.stop_timeout_s = refresh_every_s, stop_timeout_s
        self.names: dict[str, str] = {}
        self._actors: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._warned_ray = False
        self._cluster = SupervisedMonitor(
            lambda: _system_metrics_monitor(run_id, tracking_uri, every_s, CLUSTER_NODE_ID, [ClusterStoreMonitor()]),
            tracking_uri,
            run_id,
            "the Ray cluster",
            check_every_s=every_s,
        )
        self._refresher = threading.Thread(target=self._keep_refreshing, daemon=True, name="system-metrics nodes")

    def start(self) -> NodeMonitors:
        self.refresh()
        self._cluster.start()
        self._refresher.start()
        return self

    def _keep_refreshing(self) -> None:
        while not self._stopped.wait(self.refresh_every_s):
            self.refresh()

    def refresh(self) -> None:
        """A monitor for every alive node that has none; forget the nodes that died."""
        try:
            nodes = alive_nodes()
        except Exception as exc:
            if not self._warned_ray:
                log.warning(f"system metrics: Ray's node table did not answer ({exc}); keeping the known nodes")
            self._warned_ray = True
            return
        fresh = node_names(nodes)
        with self._lock:
            if self._stopped.is_set():
                return
            alive = {str(n["NodeID"]) for n in nodes}
            for node_id in set(self._actors) - alive:
                log.info(f"system metrics: node {self.names[node_id]} left the cluster; its monitor went with it")
                del self._actors[node_id]
            for node in nodes:
                node_id = str(node["NodeID"])
                if node_id not in self._actors:
                    self._place(node, fresh[node_id])

    def _place(self, node: Mapping[str, Any], fresh_name: str) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node_id = str(node["NodeID"])
        name = self.names.get(node_id, fresh_name)
        if name in {n for i, n in self.names.items() if i != node_id}:  # another raylet of a host already named
            name = f"{name}-{node_id[:6]}"
        try:
            self._actors[node_id] = (
                _node_monitor_actor()
                .options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
                .remote(
                    self.run_id,
                    self.tracking_uri,
                    self.every_s,
                    name,
                    str(node["NodeManagerAddress"]),
                    int(node["NodeManagerPort"]),
                )
            )
            self.names[node_id] = name
        except Exception as exc:
            log.warning(f"system metrics: no monitor on node {name}: {exc}")

    def stop(self) -> None:
        """Stop every monitor and flush what it sampled; idempotent, never raises, bounded by `stop_timeout_s`
        (about: a hung MLflow request is left behind)."""
        with self._lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
            actors, self._actors = dict(self._actors), {}
        import ray

        stops: dict[str, Any] = {}
        for node_id, actor in actors.items():
            with contextlib.suppress(Exception):  # a dead actor: nothing to stop
                stops[node_id] = actor.stop.remote(self.stop_timeout_s)
        self._cluster.stop(self.stop_timeout_s)  # meanwhile, the nodes stop theirs
        try:
            refs = list(stops.values())
            ready = set(ray.wait(refs, num_returns=len(refs), timeout=self.stop_timeout_s + 5)[0]) if refs else set()
        except Exception as exc:
            log.warning(f"system metrics: waiting for the node monitors to stop: {exc}")
            ready = set()
        for node_id, ref in stops.items():
            try:
                if ref not in ready:
                    raise TimeoutError("it did not stop in time")
                ray.get(ref)
            except Exception as exc:  # the node died, or its actor did
                log.debug(f"system metrics: monitor of node {self.names[node_id]} ended without stopping: {exc}")
        for actor in actors.values():
            with contextlib.suppress(Exception):
                ray.kill(actor)

    def __enter__(self) -> NodeMonitors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_node_monitors(
    run_id: str, tracking_uri: str, every_s: float, refresh_every_s: float = 30.0, stop_timeout_s: float = 20.0
) -> NodeMonitors:
    """Start the system metrics of run `run_id` on every node of the connected Ray cluster (see the module
    doc); never raises. Stop with `.stop()`, or use the result as a context manager."""
    monitors = NodeMonitors(run_id, tracking_uri, every_s, refresh_every_s, stop_timeout_s)
    try:
        monitors.start()
    except Exception as exc:
        log.warning(f"system metrics: not started: {exc}")
    return monitors


@contextlib.contextmanager
def system_metrics(
    run_id: str, tracking_uri: str, every_s: float, enabled: bool = True, stop_timeout_s: float = 20.0
) -> Iterator[NodeMonitors | None]:
    """`with system_metrics(...): trainer.fit()`: the node monitors around the fit (stopped also when it
    raises); None and nothing started when not `enabled`."""
    if not enabled:
        yield None
        return
    monitors = start_node_monitors(run_id, tracking_uri, every_s, stop_timeout_s=stop_timeout_s)
    try:
        yield monitors
    finally:
        monitors.stop()


# -- GPUs as the train workers see them --------------------------------------------------------------
def _physical_gpu_index(index: int) -> str:
    """The node's GPU number of CUDA device `index` (Ray sets CUDA_VISIBLE_DEVICES), so that two workers on
    one node name their GPUs apart."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if index < len(visible) and visible[index].isdigit():
        return visible[index]
    return str(index)


def gpu_metrics(device: torch.device, node: str | None = None) -> dict[str, float]:
    """`{"system/<node>/gpu_<i>_memory_allocated_mb": ...}` of this worker's CUDA `device` (torch's
    allocator: allocated, reserved, peak; the device's used memory; utilisation where torch can read it,
    which needs NVML); {} without CUDA. `<i>`: the node's GPU number."""
    import torch

    if device.type != "cuda" or not torch.cuda.is_available():
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    prefix = f"system/{node or current_node_name()}/gpu_{_physical_gpu_index(index)}_"
    out = {
        "memory_allocated_mb": torch.cuda.memory_allocated(index) / _MB,
        "memory_reserved_mb": torch.cuda.memory_reserved(index) / _MB,
        "memory_peak_allocated_mb": torch.cuda.max_memory_allocated(index) / _MB,
    }
    with contextlib.suppress(Exception):  # a device that cannot report it
        free, total = torch.cuda.mem_get_info(index)
        out["memory_used_mb"] = (total - free) / _MB  # every process's, as nvidia-smi shows it
    with contextlib.suppress(Exception):  # needs pynvml (or amdsmi): absent here
        # Not MLflow's gpu_<i>_utilization_percentage: the node monitor logs that one where NVML exists.
        out["utilization_torch_percentage"] = float(torch.cuda.utilization(index))
    return {prefix + k: v for k, v in out.items()}


def gathered_gpu_metrics(device: torch.device) -> dict[str, float]:
    """Every worker's `gpu_metrics`, merged (for rank 0 to log). A collective: every rank calls it at the
    same step; no communication without CUDA."""
    import torch.distributed as dist

    local = gpu_metrics(device)
    if device.type != "cuda" or not (dist.is_available() and dist.is_initialized()):
        return local
    parts: list[dict[str, float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in (part or {}).items()}


class WorkerGpuMonitor(SampledMonitor):
    """`gpu_metrics(device)` as an MLflow metrics monitor (names relative to `system/<node>/`), averaged."""

    what = "GPU memory of this worker"

    def __init__(self, device: torch.device, node: str) -> None:
        super().__init__()
        self.device, self.node = device, node

    def sample(self) -> dict[str, float]:
        return {k.removeprefix(f"system/{self.node}/"): v for k, v in gpu_metrics(self.device, self.node).items()}

    def aggregate_metrics(self) -> dict[str, float]:
        return {k: sum(v) / len(v) for k, v in self._metrics.items() if v}


def start_worker_gpu_monitor(
    run_id: str, tracking_uri: str, every_s: float, device: torch.device
) -> SupervisedMonitor | None:
    """On a train worker: its GPU's memory into the run every `every_s`, from a thread of MLflow's monitor
    (no collective, nothing on the training path); None without CUDA. Stop with `.stop(timeout_s)`."""
    import torch

    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        node = current_node_name()
        return SupervisedMonitor(
            lambda: _system_metrics_monitor(run_id, tracking_uri, every_s, node, [WorkerGpuMonitor(device, node)]),
            tracking_uri,
            run_id,
            f"{node} GPU {device}",
            check_every_s=every_s,
        ).start()
    except Exception as exc:
        log.warning(f"system metrics: no GPU monitor on this worker: {exc}")
        return None
