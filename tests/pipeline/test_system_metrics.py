"""System metrics of every Ray node and of the object store, into a real sqlite MLflow run; an MLflow outage
costs nothing; node names are distinct per node."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch

from imagenet_ray.tracking import RunSink
from imagenet_ray.train.system_metrics import (
    current_node_name,
    gpu_metrics,
    node_names,
    start_node_monitors,
    start_worker_gpu_monitor,
    system_metrics,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # sqlalchemy deprecations inside mlflow

NODE_METRICS = ("cpu_utilization_percentage", "system_memory_usage_megabytes", "disk_usage_percentage")


def _node(node_id: str, ip: str, **labels: str) -> dict:
    return {"NodeID": node_id, "NodeManagerAddress": ip, "Alive": True, "Labels": labels}


def test_node_names_say_group_and_ip_and_stay_distinct():
    names = node_names(
        [
            _node("aa11" * 14, "10.0.0.5", **{"imagenet-ray/node-group": "train"}),
            _node("bb22" * 14, "10.0.0.6", **{"ray.io/node-group": "decode-group"}),
            _node("cc33" * 14, "10.0.0.7"),
            # two raylets on one host (a local test cluster): the node id tells them apart
            _node("dd44" * 14, "127.0.0.1"),
            _node("ee55" * 14, "127.0.0.1"),
        ]
    )
    assert names["aa11" * 14] == "train-10.0.0.5"
    assert names["bb22" * 14] == "decode-group-10.0.0.6"
    assert names["cc33" * 14] == "10.0.0.7"
    assert names["dd44" * 14] == "127.0.0.1-dd44dd" and names["ee55" * 14] == "127.0.0.1-ee55ee"
    assert len(set(names.values())) == 5


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as a worker with GPUs 3 and 5 of its node visible sees it (no GPU here)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: 2_000_000 * (i + 1))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 4_000_000)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i: 8_000_000)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (70_000_000, 100_000_000))

    def no_nvml(i):
        raise ModuleNotFoundError("pynvml")

    monkeypatch.setattr(torch.cuda, "utilization", no_nvml)
    return torch.device("cuda", 1)


def test_gpu_metrics_name_the_nodes_gpu(fake_cuda):
    assert gpu_metrics(fake_cuda, "train-10.0.0.5") == {
        # cuda:1 of this worker is GPU 5 of the node: two workers of a node never share a name
        "system/train-10.0.0.5/gpu_5_memory_allocated_mb": 4.0,
        "system/train-10.0.0.5/gpu_5_memory_reserved_mb": 4.0,
        "system/train-10.0.0.5/gpu_5_memory_peak_allocated_mb": 8.0,
        "system/train-10.0.0.5/gpu_5_memory_used_mb": 30.0,
    }  # no utilisation without NVML


def test_worker_gpu_monitor_logs_into_the_run(fake_cuda, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sink = RunSink.create(uri, "system-metrics", "gpu")
    monitor = start_worker_gpu_monitor(sink.run_id, uri, 0.3, fake_cuda)
    assert monitor is not None
    key = f"system/{current_node_name()}/gpu_5_memory_allocated_mb"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and key not in sink.read()[1]:
        time.sleep(0.3)
    monitor.stop(5)
    assert sink.read()[1][key] == 4.0


def test_no_cuda_no_gpu_metrics(tmp_path):
    cpu = torch.device("cpu")
    assert gpu_metrics(cpu, "n") == {}
    assert start_worker_gpu_monitor("run", f"sqlite:///{tmp_path}/m.db", 1.0, cpu) is None
    with system_metrics("run", f"sqlite:///{tmp_path}/m.db", 1.0, enabled=False) as monitors:
        assert monitors is None


@pytest.mark.ray
def test_every_node_and_the_object_store_are_logged(local_ray, tmp_path):
    ray = local_ray
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sink = RunSink.create(uri, "system-metrics", "run")
    held = ray.put(np.ones(4_000_000, dtype=np.uint8))  # 4 MB in plasma, for the object store metrics
    node_id = ray.get_runtime_context().get_node_id()
    name = node_names(n for n in ray.nodes() if n["Alive"])[node_id]

    wanted = {
        *(f"system/{name}/{m}" for m in NODE_METRICS),
        f"system/{name}/object_store_used_mb",
        "system/ray/object_store_used_mb",
        "system/ray/spilled_mb",
    }
    start = time.monotonic()
    monitors = start_node_monitors(sink.run_id, uri, every_s=1.0)
    try:
        assert monitors.names == {node_id: name}
        metrics: dict[str, float] = {}
        while time.monotonic() - start < 45 and not wanted <= set(metrics):  # ~8 s on an idle machine
            time.sleep(0.5)
            metrics = sink.read()[1]
    finally:
        monitors.stop()
    stopped = time.monotonic()
    monitors.stop()  # idempotent, and immediate the second time
    assert time.monotonic() - stopped < 1

    metrics = sink.read()[1]
    assert wanted <= set(metrics), sorted(metrics)
    assert metrics["system/ray/object_store_used_mb"] >= 3.9 and metrics[f"system/{name}/object_store_used_mb"] >= 3.9
    assert metrics["system/ray/alive_nodes"] == 1
    assert metrics["system/ray/spilled_mb"] >= 0 and metrics[f"system/{name}/system_memory_usage_megabytes"] > 0
    # MLflow's plain names (no node id) never appear: every node's metrics say which node they are
    assert not any(k.startswith("system/cpu") for k in metrics)
    assert sink.logged_steps(f"system/{name}/cpu_utilization_percentage")
    del held


@pytest.mark.ray
def test_mlflow_outage_costs_nothing_and_is_logged_once(local_ray, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the driver side fails fast
    dead = "http://127.0.0.1:9"  # nothing listens on the discard port
    caplog.set_level(logging.WARNING, logger="imagenet_ray.train.system_metrics")
    start = time.monotonic()
    with system_metrics("0123456789abcdef", dead, every_s=0.3, stop_timeout_s=3) as monitors:
        assert monitors is not None and len(monitors.names) == 1
        time.sleep(2.5)  # several checks of the run: one warning
    assert time.monotonic() - start < 20
    outage = [r for r in caplog.records if "does not answer" in r.getMessage()]
    assert len(outage) == 1, [r.getMessage() for r in caplog.records]


@pytest.mark.ray
def test_monitors_wait_for_a_resumed_run_to_reopen(local_ray, tmp_path):
    # A time-boxed run ends KILLED; the resubmission's driver starts the monitors before rank 0 reopens it.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sink = RunSink.create(uri, "system-metrics", "resumed")
    sink.finish("KILLED")
    with system_metrics(sink.run_id, uri, every_s=0.5) as monitors:
        assert monitors is not None
        time.sleep(2)
        assert not [k for k in sink.read()[1] if k.startswith("system/")]  # nothing logged to an ended run
        sink.reopen()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "system/ray/object_store_used_mb" not in sink.read()[1]:
            time.sleep(0.3)
    assert "system/ray/object_store_used_mb" in sink.read()[1]
