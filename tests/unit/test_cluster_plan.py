"""The local cluster's pure parts: manifest shape, node plans, `ray start` lines, the gateway, state."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
import yaml

from imagenet_ray.cluster import commands, cpu_limits, local
from imagenet_ray.cluster.cpu_limits import CpuCgroup
from imagenet_ray.cluster.hosts import Host
from imagenet_ray.cluster.manifest import parse_quantity, read_cluster_shape
from imagenet_ray.cluster.nodes import STAND_IN_GPU, plan_nodes, ray_start_command
from imagenet_ray.errors import UserError

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "infra/k8s/base/raycluster.yaml"
GiB = 2**30


def test_quantities():
    assert parse_quantity("500m", "x") == 0.5
    assert parse_quantity("16Gi", "x") == 16 * GiB
    assert parse_quantity(8, "x") == 8
    with pytest.raises(UserError, match="not a Kubernetes quantity"):
        parse_quantity("lots", "cpu")


def test_base_manifest_shape():
    shape = read_cluster_shape(BASE)
    assert shape.name == "imagenet-ray" and shape.ray_version == "2.60.0"
    assert shape.head.ray_num_cpus == 0 and shape.head.labels == {"imagenet-ray/node-group": "head"}
    train, decode = shape.workers
    assert (train.name, train.gpus, train.cpus, train.max_replicas) == ("train", 8, 88, 2)
    assert (decode.name, decode.gpus, decode.cpus, decode.min_replicas) == ("decode", 0, 60, 0)
    assert decode.ray_start_params["object-store-memory"] == str(32 * GiB)


def test_built_rayjob_gives_the_same_shape(tmp_path):
    built = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "infra/k8s/overlays/small")], capture_output=True, text=True
    )
    assert built.returncode == 0, built.stderr
    path = tmp_path / "small.yaml"
    path.write_text(built.stdout)
    train_job = read_cluster_shape(path, name="imagenet-train")
    assert train_job.group("train").gpus == 1 and train_job.group("decode").cpus == 15
    with pytest.raises(UserError, match="no RayCluster named 'nope'"):
        read_cluster_shape(path, name="nope")
    with pytest.raises(UserError, match="has no rayClusterSpec"):
        read_cluster_shape(REPO / "infra/k8s/base/rayjob-train.yaml")


def test_node_plan_scales_to_this_machine():
    nodes = plan_nodes(read_cluster_shape(BASE), {"decode": 2}, {"train": 1}, max_cpus=4, object_store_cap=GiB)
    assert [n.host for n in nodes] == ["head", "train-0", "decode-0", "decode-1"]
    head, train, decode = nodes[0], nodes[1], nodes[2]
    assert head.num_cpus == 0 and train.num_cpus == 1 and decode.num_cpus == 4  # min(60, 4)
    assert train.resources == {STAND_IN_GPU: 8.0} and decode.resources == {}
    assert train.object_store_bytes == GiB  # the manifest's 100 GiB, capped
    assert decode.labels == {"imagenet-ray/node-group": "decode"}
    with pytest.raises(UserError, match="no group gpu"):
        plan_nodes(read_cluster_shape(BASE), {"gpu": 1}, {}, 4, GiB)
    with pytest.raises(UserError, match=r"allows 0\.\.2"):
        plan_nodes(read_cluster_shape(BASE), {"train": 3}, {}, 4, GiB)


def test_cpu_limits_are_quotas_and_ray_counts_them_rounded_up():
    shape = read_cluster_shape(BASE)
    head, train, decode = plan_nodes(shape, {}, {"train": 1}, 4, GiB, cpu_limits={"decode": 0.25, "train": 0.5})
    assert decode.cpu_limit == 0.25 and decode.num_cpus == 1  # a pod's 250m: Ray counts ceil, as KubeRay
    assert train.cpu_limit == 0.5 and train.num_cpus == 1  # --cpus still wins
    assert head.cpu_limit is None and head.num_cpus == 0
    assert plan_nodes(shape, {}, {}, 4, GiB, cpu_limits={"decode": 3.5})[2].num_cpus == 4
    with pytest.raises(UserError, match="no group gpu"):
        plan_nodes(shape, {}, {}, 4, GiB, cpu_limits={"gpu": 1})
    with pytest.raises(UserError, match=r"--cpu-limit decode=0: a limit must be > 0"):
        plan_nodes(shape, {}, {}, 4, GiB, cpu_limits={"decode": 0})


@pytest.mark.parametrize("version", [1, 2])
def test_cgroup_quota_files(tmp_path, version):
    """The files a kubelet writes for limits.cpu (period 100 ms), on a directory standing in for the cgroup."""
    group = CpuCgroup(str(tmp_path), version)
    group.set_limit(0.25)
    assert group.limit() == 0.25
    if version == 2:
        assert (tmp_path / "cpu.max").read_text() == "25000 100000\n"
    else:
        assert (tmp_path / "cpu.cfs_quota_us").read_text() == "25000\n"
        assert (tmp_path / "cpu.cfs_period_us").read_text() == "100000\n"
    group.set_limit(None)
    assert group.limit() is None
    group.set_limit(0.001)  # below the kernel's 1 ms minimum quota: raised to it
    assert group.limit() == 0.01
    with pytest.raises(UserError, match="must be > 0 cores"):
        group.set_limit(0)
    assert group.join_prefix()[-1] == str(tmp_path / "cgroup.procs")
    (tmp_path / "cgroup.procs").write_text("12\n34\n")
    assert group.pids() == [12, 34]


def test_cgroup_hierarchy_is_found_from_the_mounts(tmp_path, monkeypatch):
    v2, v1 = tmp_path / "unified", tmp_path / "cpu"
    v2.mkdir(), v1.mkdir()
    (v2 / "cgroup.controllers").write_text("memory pids\n")  # a hybrid host: cpu is on v1
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup2 {v2} cgroup2 rw 0 0\ncgroup {v1} cgroup rw,relatime,cpu 0 0\n")
    monkeypatch.setattr(cpu_limits, "MOUNTS", mounts)
    monkeypatch.setattr(cpu_limits.os, "geteuid", lambda: 0)
    assert cpu_limits._cpu_hierarchy() == (v1, 1)
    (v2 / "cgroup.controllers").write_text("cpu memory pids\n")
    assert cpu_limits._cpu_hierarchy() == (v2, 2)
    mounts.write_text("proc /proc proc rw 0 0\n")
    assert "no cgroup hierarchy" in str(cpu_limits.cgroups_unavailable())
    monkeypatch.setattr(cpu_limits.os, "geteuid", lambda: 1000)
    assert cpu_limits.cgroups_unavailable() == "not running as root"


def test_ray_start_lines():
    head, train, _ = plan_nodes(read_cluster_shape(BASE), {}, {}, max_cpus=2, object_store_cap=GiB)
    cmd = ray_start_command(["ray"], head, "10.100.0.2", "x", "/tmp/t")
    assert cmd[:3] == ["ray", "start", "--block"] and "--head" in cmd and "--port=6379" in cmd
    assert "--num-cpus=0" in cmd and "--dashboard-host=0.0.0.0" in cmd  # the manifest's rayStartParams
    assert "--labels=imagenet-ray/node-group=head" in cmd
    cmd = ray_start_command(["ray"], train, "10.100.0.3", "imagenet-ray-head-svc:6379", "/tmp/t")
    assert "--address=imagenet-ray-head-svc:6379" in cmd and "--head" not in cmd
    assert '--resources={"stand_in_gpu": 8.0}' in cmd and f"--object-store-memory={GiB}" in cmd
    assert sum(a.startswith("--object-store-memory") for a in cmd) == 1  # capped, not repeated
    ports = dict.fromkeys(local.HEAD_PORT_NAMES + tuple(local.NODE_PORT_FLAGS), 0)
    ports = {k: 30000 + i for i, k in enumerate(ports)}
    shared = ray_start_command(["ray"], head, "127.0.0.2", "x", "/tmp/t", ports)
    assert "--dashboard-host=127.0.0.2" in shared and f"--node-manager-port={ports['node_manager']}" in shared


def test_assignments_parse_or_fail_in_one_line():
    assert commands.parse_assignments(["decode=2", "train=1"], "--replicas") == {"decode": 2, "train": 1}
    for bad in ("decode", "=2", "decode=two"):
        with pytest.raises(UserError, match="expected GROUP=NUMBER"):
            commands.parse_assignments([bad], "--replicas")


def _state(root: Path, hosts: list[Host], **extra) -> local.ClusterState:
    """A cluster state of the base manifest's nodes (nothing started)."""
    nodes = plan_nodes(read_cluster_shape(BASE), {}, {}, 2, GiB)
    return local.ClusterState(
        root_dir=root,
        cluster_id="abc123",
        name="imagenet-ray",
        manifest=str(BASE),
        hosts=hosts,
        nodes=nodes,
        ray_auth_token="t" * 64,
        **extra,
    )


def test_state_round_trip(tmp_path):
    state = _state(
        tmp_path,
        [Host("services", "irc-abc123-services", "10.100.0.1"), Host("head", "irc-abc123-head", "10.100.0.2")],
        client_ports={"dashboard": 40001},
        cpu_cgroups={"head": CpuCgroup("/sys/fs/cgroup/cpu/irc-abc123-head", 1)},
    )
    state.save()
    assert oct((tmp_path / local.STATE_FILE).stat().st_mode & 0o777) == "0o600"
    again = local.ClusterState.load(tmp_path)
    assert again == state and again.gcs_address == "imagenet-ray-head-svc:6379"
    assert "t" * 64 not in repr(again)
    with pytest.raises(UserError, match="no local cluster"):
        local.ClusterState.load(tmp_path / "nothing")


def test_gateway_forwards_without_a_namespace(tmp_path):
    """Listening socket bound here, handed over by fd; bytes go both ways through the forward."""

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"hello through the gateway"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    cmd = [
        sys.executable,
        "-m",
        "imagenet_ray.cluster.gateway",
        f"--forward={listener.fileno()}=127.0.0.1:{server.server_port}",
    ]
    proc = subprocess.Popen(cmd, pass_fds=(listener.fileno(),), stdout=subprocess.PIPE, text=True)
    port = listener.getsockname()[1]
    listener.close()
    try:
        assert proc.stdout is not None and "gateway ready" in proc.stdout.readline()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
            assert resp.read() == b"hello through the gateway"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        server.shutdown()


def test_default_manifest_loads_as_yaml():
    # `cluster up`'s default manifest path is the one the CLI names.
    from imagenet_ray.cli import build_parser

    args = build_parser().parse_args(["cluster", "up"])
    assert yaml.safe_load((REPO / args.manifest).read_text())["kind"] == "RayCluster"
    assert os.path.basename(args.root) == ".cluster"


def test_live_cpu_limit_errors_are_one_line(tmp_path):
    names = ["services", "head", "train-0", "decode-0"]
    state = _state(tmp_path, [Host(n, None, f"127.0.0.{i + 1}") for i, n in enumerate(names)])
    state.save()
    with pytest.raises(UserError, match="host decode-0 has no CPU cgroup"):
        local.set_cpu_limit(state, "decode-0", 0.5)
    with pytest.raises(UserError, match="no Ray node on 'nope'"):
        local.set_cpu_limit(state, "nope", 0.5)
    with pytest.raises(UserError, match="--cores 'lots': expected a number of cores"):
        commands.limit_cpu(tmp_path, "decode-0", "lots")
