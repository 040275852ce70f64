"""The KubeRay manifests on a real multi-host Ray cluster: one network namespace per pod (see
imagenet_ray/cluster/), the RayJobs' own entrypoints through `ray job submit`, nodes lost mid-run.

The cluster (`local_cluster`, session scope) has the base RayCluster's shape: a head (no CPUs), one
`train` node (its 8 GPUs as the `stand_in_gpu` resource) and one CPU-only `decode` node, plus a services
host running S3, PostgreSQL and MLflow with basic auth, reached by name (`http://mlflow:5000`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import boto3
import pytest
import yaml
from mlflow.tracking import MlflowClient

from imagenet_ray.capacity import decode_capacity, predict_data_wait
from imagenet_ray.capacity.rates import measure_kernel
from imagenet_ray.cluster import cpu_limits, local
from imagenet_ray.cluster.hosts import our_namespaces
from imagenet_ray.services import process
from imagenet_ray.tracking import RunSink

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 40, 10
EXPERIMENT = "imagenet-ray-cluster"
KILL_DELAY_S = 4.0
# A preemption notice (`ray drain-node`, reason PREEMPTION): the node is taken this long after it, at the
# latest; the ranks ask for notices every PREEMPTION_CHECK_S of training (train.preemption_check_s).
PREEMPTION_DEADLINE_S = 60
PREEMPTION_CHECK_S = 1.0
# The manifest's train entrypoint is kept whole; these overrides, appended, only scale it to a CPU
# machine (later overrides win): a tiny ResNet-18 run on one worker holding one stand-in GPU, 2 epochs (the
# node-loss test asks for 3: a node is lost in each of the last two).
TEST_SCALE = [
    "train.epochs=2",
    "train.num_workers=1",
    "train.use_gpu=false",
    "train.precision=fp32",
    "train.worker_resources={stand_in_gpu: 1}",
    "model.name=resnet18",
    "model.blurpool=false",
    "model.channels_last=false",
    "data.train_crop=64",
    "data.progressive=null",
    "data.batch_size=16",
    "data.local_shuffle_buffer=64",
    "data.prefetch_batches=2",
    "optim.lr=0.2",
    "optim.warmup_epochs=0.3",
    "eval.resize=73",
    "eval.crop=64",
    "eval.hflip=false",
    "eval.batch_size=50",
    f"mlflow.experiment={EXPERIMENT}",
    "mlflow.log_model=false",  # the model's life is checked end to end in test_e2e_skeleton.py
]


# The planner's check: a stand-in GPU (train.skip_step + throttle) consuming PLAN_RATIOS x the decode capacity
# predicted for the decode host limited to PLAN_CPU_LIMIT cores (a pod's limits.cpu): a wait of 0, then 0.67.
# The limit starts once epoch 1 is logged (Ray workers starting under a 0.15-core quota would take minutes);
# epoch 2 straddles the change, so epoch 3 is measured. One run per side: a stand-in GPU fast enough to be
# above the unlimited host's capacity pays for its own iterator at 16-image batches (docs/cluster.md).
PLAN_CPU_LIMIT = 0.15
PLAN_RATIOS = (0.5, 3.0)
PLAN_TOLERANCE = 0.15
PLAN_EPOCHS = 3
PLAN_MEASURED_FROM = 3


def manifest_entrypoint(job_file: str) -> str:
    doc = yaml.safe_load((REPO / "infra/k8s/base" / job_file).read_text())
    return str(doc["spec"]["entrypoint"])


# -- talking to the cluster from this machine's namespace -----------------------------------------
def _get(cluster: local.ClusterState, path: str) -> Any:
    req = urllib.request.Request(
        f"{cluster.dashboard_url}{path}", headers={"Authorization": f"Bearer {cluster.ray_auth_token}"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def submit(cluster: local.ClusterState, client_env: dict[str, str], argv: list[str]) -> str:
    """`ray job submit --no-wait` from the repo, as a user (or KubeRay's submitter) would."""
    submission_id = f"test-{uuid.uuid4().hex[:8]}"
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", cluster.dashboard_url]
    cmd += ["--working-dir", str(REPO), "--submission-id", submission_id, "--no-wait", "--", *argv]
    done = subprocess.run(cmd, env=client_env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return submission_id


def wait_job(cluster: local.ClusterState, submission_id: str, timeout_s: float = 600) -> tuple[dict[str, Any], str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = _get(cluster, f"/api/jobs/{submission_id}")
        if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return info, _get(cluster, f"/api/jobs/{submission_id}/logs")["logs"]
        time.sleep(2)
    raise AssertionError(f"job {submission_id} did not finish in {timeout_s:.0f} s")


def job_tasks(cluster: local.ClusterState, ray_job_id: str) -> list[dict[str, Any]]:
    path = f"/api/v0/tasks?limit=10000&detail=1&filter_keys=job_id&filter_predicates=%3D&filter_values={ray_job_id}"
    return list(_get(cluster, path)["data"]["result"]["result"])


def node_hosts(cluster: local.ClusterState) -> dict[str, str]:
    """Ray node id → host name, dead nodes (a killed pod) included."""
    by_address = {h.address: h.name for h in cluster.hosts}
    return {
        n["node_id"]: by_address.get(n["node_ip"], "?")
        for n in _get(cluster, "/api/v0/nodes?limit=1000&detail=1")["data"]["result"]["result"]
    }


def working_on(cluster: local.ClusterState, host: str) -> bool:
    """Training lives on `host` (Train V2 runs the loop in a thread of its worker actor); a decode host is
    always at work mid-run (Ray Data's tasks are too short to catch in the RUNNING state)."""
    if not host.startswith("train"):
        return True
    hosts = node_hosts(cluster)
    alive = "/api/v0/actors?limit=10000&filter_keys=state&filter_predicates=%3D&filter_values=ALIVE"
    actors = _get(cluster, alive)["data"]["result"]["result"]
    return any(a.get("class_name") == "RayTrainWorker" and hosts.get(a.get("node_id") or "") == host for a in actors)


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(local_cluster):
    return local_cluster.stack()


@pytest.fixture(scope="module")
def client_env(local_cluster, stack) -> dict[str, str]:
    env = {**os.environ, **local_cluster.client_env(stack)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def mlflow(stack) -> Iterator[MlflowClient]:
    # The client reads basic-auth credentials from the environment at each request.
    login = {"MLFLOW_TRACKING_USERNAME": stack.mlflow_username, "MLFLOW_TRACKING_PASSWORD": stack.mlflow_password}
    with mock.patch.dict(os.environ, login):
        yield MlflowClient(stack.mlflow_uri)


@pytest.fixture(scope="module")
def s3(stack):
    return boto3.client(
        "s3",
        endpoint_url=stack.s3_endpoint,
        aws_access_key_id=stack.access_key,
        aws_secret_access_key=stack.secret_key,
        region_name=stack.region,
    )


@pytest.fixture(scope="module")
def prepared(local_cluster, client_env, s3) -> dict[str, Any]:
    """Synthetic ImageNet written into S3 from outside, then the prepare RayJob's entrypoint, unchanged."""
    synth = subprocess.run(
        [
            *(sys.executable, "-m", "imagenet_ray", "synth", "--out", "s3://imagenet/raw", "--classes", str(CLASSES)),
            *("--train-per-class", str(TRAIN_PER_CLASS), "--val-per-class", str(VAL_PER_CLASS), "--seed", "3"),
        ],
        env=client_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert synth.returncode == 0, synth.stderr
    entrypoint = manifest_entrypoint("rayjob-prepare.yaml")
    info, logs = wait_job(local_cluster, submit(local_cluster, client_env, shlex.split(entrypoint)))
    assert info["status"] == "SUCCEEDED", logs[-4000:]
    manifest = json.loads(s3.get_object(Bucket="imagenet", Key="prepared/_manifest.json")["Body"].read())
    assert manifest["splits"]["val"]["num_images"] == CLASSES * VAL_PER_CLASS
    return manifest


def _runs(mlflow: MlflowClient, name: str) -> list[Any]:
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    return (
        []
        if exp is None
        else mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`imagenet_ray.run_name` = '{name}'")
    )


def _epochs_logged(mlflow: MlflowClient, name: str) -> list[int]:
    runs = _runs(mlflow, name)
    return [int(m.value) for m in mlflow.get_metric_history(runs[0].info.run_id, "epoch")] if runs else []


def host_node_id(cluster: local.ClusterState, host: str) -> str:
    alive = [n for n in local.status(cluster) if n["host"] == host and n["ray"] == "ALIVE"]
    return str(alive[0]["node_id"]) if alive else ""


def _checkpoints(s3, name: str) -> int:
    """Checkpoints of run `name` in S3 (each directory holds one state file)."""
    listed = s3.list_objects_v2(Bucket="checkpoints", Prefix=f"runs/{name}/checkpoint_")
    return sum(1 for o in listed.get("Contents", []) if o["Key"].endswith("/state.pt"))


def job_logs(cluster: local.ClusterState, submission_id: str) -> str:
    return str(_get(cluster, f"/api/jobs/{submission_id}/logs")["logs"])


def train_with_node_losses(
    cluster, stack, client_env, mlflow, s3, losses: list[tuple[str, int, str]], name: str, epochs: int
) -> dict[str, Any]:
    """Submit the train RayJob's entrypoint; for each (host, epochs done, how) in turn, once those epochs
    are logged and checkpointed (and, for the train node, its worker lives there), take `host` like a lost
    pod: "kill" kills every process on it at once; "preempt" first drains it with a preemption deadline (a
    spot notice, as KubeRay's autoscaler passes it on) and kills it once the notice's checkpoint is written.
    Then it starts the host again like a recreated pod."""
    argv = [*shlex.split(manifest_entrypoint("rayjob-train.yaml")), *TEST_SCALE, f"train.epochs={epochs}"]
    # A notice takes seconds to arrive (the drain call, Ray's 5 s watcher poll, the ranks' next check):
    # training paced to ~25 s an epoch leaves the preempted epoch room for it; a check at every step.
    argv += [f"train.preemption_check_s={PREEMPTION_CHECK_S}", "train.throttle_images_per_s=16"]
    argv += ["mlflow.log_every_steps=1"]
    submission_id = submit(cluster, client_env, [*argv, f"name={name}"])
    killed: dict[str, dict[str, Any]] = {}

    def take_node(host: str, how: str) -> dict[str, Any]:
        loss: dict[str, Any] = {"epochs_logged": _epochs_logged(mlflow, name)}
        if how == "preempt":
            drained_at = time.monotonic()
            progress = [ln for ln in job_logs(cluster, submission_id).splitlines() if "] step " in ln]
            loss["progress_at_drain"] = progress[-1][-120:] if progress else None  # for a failure's message
            loss["node_id"] = local.drain_node(cluster, host, PREEMPTION_DEADLINE_S)
            loss["drain_call_s"] = round(time.monotonic() - drained_at, 1)
            while time.monotonic() < drained_at + PREEMPTION_DEADLINE_S:
                saved = [ln for ln in job_logs(cluster, submission_id).splitlines() if "mid-epoch checkpoint af" in ln]
                if saved:
                    loss["notice_to_checkpoint_s"] = round(time.monotonic() - drained_at, 1)
                    loss["checkpoint_line"] = saved[0]
                    break
                time.sleep(0.5)
        else:
            loss["node_id"] = host_node_id(cluster, host)
        # Ray Train's controller registers a written checkpoint a moment later (it polls).
        time.sleep(KILL_DELAY_S)
        loss["survivors"] = local.stop_node(cluster, host)
        time.sleep(3)
        local.start_node(cluster, stack, host)
        loss["new_node_id"] = host_node_id(cluster, host)
        return loss

    def take_nodes_mid_run() -> None:
        deadline = time.monotonic() + 600
        try:
            for host, after, how in losses:
                while time.monotonic() < deadline:
                    done = list(range(1, after + 1))
                    if (
                        _epochs_logged(mlflow, name) == done
                        and _checkpoints(s3, name) >= after
                        and working_on(cluster, host)
                    ):
                        killed[host] = take_node(host, how)
                        break
                    time.sleep(0.5)
        except Exception as exc:  # reported by the test, not lost in the thread
            killed["error"] = {"repr": repr(exc)}

    killer = threading.Thread(target=take_nodes_mid_run, daemon=True)
    killer.start()
    info, logs = wait_job(cluster, submission_id, timeout_s=900)
    killer.join(timeout=60)
    return {"info": info, "logs": logs, "killed": killed, "runs": _runs(mlflow, name)}


# -- the tests --------------------------------------------------------------------------------------
def test_hosts_have_the_manifests_shape(local_cluster):
    rows = {r["host"]: r for r in local.status(local_cluster)}
    assert set(rows) == {"head", "train-0", "decode-0"}
    assert all(r["ray"] == "ALIVE" and r["running"] for r in rows.values()), rows
    addresses = [ipaddress.ip_address(r["address"]) for r in rows.values()]
    assert len(set(addresses)) == 3
    if local_cluster.namespaced:  # CI runs as root: real hosts, one namespace each
        assert all(a in ipaddress.ip_network("10.100.0.0/24") for a in addresses)
        assert {r["netns"] for r in rows.values()} <= set(our_namespaces(local_cluster.cluster_id))
    for host, group in (("head", "head"), ("train-0", "train"), ("decode-0", "decode")):
        assert rows[host]["labels"]["imagenet-ray/node-group"] == group
    assert "CPU" not in rows["head"]["resources"]  # rayStartParams num-cpus: "0"
    assert rows["train-0"]["resources"]["stand_in_gpu"] == 8  # nvidia.com/gpu: "8"
    assert "stand_in_gpu" not in rows["decode-0"]["resources"] and rows["decode-0"]["resources"]["CPU"] >= 1


def test_decode_node_lost_then_train_node_preempted_mid_epoch(
    local_cluster, stack, client_env, mlflow, s3, prepared, fault_figures
):
    """The train RayJob trains end to end from S3, logs to MLflow and places work by group. It survives
    losing its only decode node in epoch 2 (Ray Data re-runs the lost tasks on the recreated node) and then
    a preemption of its train node in epoch 3: on the drain notice the ranks checkpoint inside the epoch,
    the node is taken, and Ray Train restarts from that checkpoint in the same MLflow run, with every val
    image counted exactly once. One job for both losses: each job costs minutes on 2 cores."""
    name = f"cluster-node-loss-{uuid.uuid4().hex[:6]}"
    losses = [("decode-0", 1, "kill"), ("train-0", 2, "preempt")]
    result = train_with_node_losses(local_cluster, stack, client_env, mlflow, s3, losses, name, epochs=3)
    killed, logs = result["killed"], result["logs"]
    assert "error" not in killed, killed
    decode, train = killed.get("decode-0", {}), killed.get("train-0", {})
    assert decode.get("epochs_logged") == [1], f"the decode node was not killed in epoch 2: {killed}"
    assert decode["survivors"] == []
    assert train.get("epochs_logged") == [1, 2], f"the train node was not preempted in epoch 3: {killed}"
    assert train["node_id"] != train["new_node_id"], train
    assert result["info"]["status"] == "SUCCEEDED", logs[-6000:]
    # The notice reached the ranks through Ray Train's barrier, they checkpointed inside epoch 3, and the
    # restarted group continued from there, not from epoch 2's end.
    assert "preemption notice for ranks [0]" in logs, (train, logs[-6000:])
    assert "checkpoint_line" in train, f"no mid-epoch checkpoint within {PREEMPTION_DEADLINE_S} s of the notice"
    assert "[epoch 3] mid-epoch checkpoint after" in train["checkpoint_line"], train
    assert "restored from the checkpoint of epoch 2" in logs and "inside epoch 3, after" in logs, logs[-6000:]
    saved_images = int(train["checkpoint_line"].split("mid-epoch checkpoint after ")[1].split()[0])
    assert saved_images > 0, train
    fault_figures.record(
        "a train node preempted mid-epoch (drain notice, then taken), multi-host cluster",
        notice_to_checkpoint_s=train["notice_to_checkpoint_s"],
        images_in_the_checkpoint=saved_images,
        resumed_inside_epoch=3,
    )
    (run,) = result["runs"]  # the restarted worker group continued the same MLflow run
    assert run.info.status == "FINISHED"
    val = CLASSES * VAL_PER_CLASS
    for key in ("val/top1", "val/images", "perf/epoch_data_wait_frac"):
        assert [e for e, _ in RunSink(mlflow.tracking_uri, run.info.run_id).epoch_history(key)] == [1, 2, 3], key
    assert [m.value for m in mlflow.get_metric_history(run.info.run_id, "val/images")] == [val, val, val]
    assert run.data.metrics["val/top1"] > 1.5 / CLASSES, "training did not learn (chance is 0.1)"
    # System metrics from every host of the cluster, each under its own node name (group-address).
    nodes = {
        k.split("/")[1]
        for k in run.data.metrics
        if k.startswith("system/") and k.endswith("/cpu_utilization_percentage")
    }
    assert len(nodes) >= 3 and any(n.startswith("decode-") for n in nodes), sorted(nodes)

    # Placement, from Ray's task events: decoding only on decode-group hosts, training only on train.
    hosts = node_hosts(local_cluster)
    tasks = job_tasks(local_cluster, result["info"]["job_id"])
    where: dict[str, set[str]] = {}
    for t in tasks:
        if t.get("node_id"):  # tasks that never ran (e.g. an actor's terminate call) have no node
            where.setdefault(t["name"], set()).add(hosts.get(t["node_id"], "?"))
    data_tasks = {n: h for n, h in where.items() if n.startswith(("ReadParquet", "MapBatches", "_fetch_parquet"))}
    assert data_tasks, sorted(where)
    assert all(h == {"decode-0"} for h in data_tasks.values()), data_tasks
    # The decode node's loss hit this job's decoding: its data tasks ran on the killed node and on its replacement.
    data_nodes = {
        t["node_id"] for t in tasks if t.get("node_id") and t["name"].startswith(("ReadParquet", "MapBatches"))
    }
    assert {decode["node_id"], decode["new_node_id"]} <= data_nodes, (decode, data_nodes)
    # Ray Train's worker actors: their own methods and the functions its worker group runs on them.
    train_workers = {n: h for n, h in where.items() if n.startswith(("RayTrainWorker.", "execute."))}
    assert train_workers and {n: h for n, h in train_workers.items() if h != {"train-0"}} == {}, train_workers
    # The system-metrics monitor (one zero-CPU actor per node) is the only other thing on every node.
    on_train_node = sorted(
        n for n, h in where.items() if n not in train_workers and "train-0" in h and not n.startswith("NodeMonitor")
    )
    assert on_train_node == [], f"not training, yet on the train node: {on_train_node}"


@pytest.fixture
def cli_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="irray-cli-cluster-"))  # reachable by PostgreSQL's own user
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_cli_up_status_kill_down_leaves_nothing(cli_root):
    """The CLI on its own cluster (no decode replicas): up, status, limit-cpu, drain-node, kill-node --restart,
    down, nothing left."""
    root = cli_root
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "imagenet_ray", "cluster", *args, "--root", str(root)]
        return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    up = cli("up", "--replicas", "decode=0")
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    state = local.ClusterState.load(root)
    try:
        assert [n.host for n in state.nodes] == ["head", "train-0"]
        status = cli("status", "--json")
        assert status.returncode == 0 and {r["host"] for r in json.loads(status.stdout)} == {"head", "train-0"}
        old_id = {r["host"]: r["node_id"] for r in json.loads(status.stdout)}["train-0"]
        limit = cli("limit-cpu", "--host", "train-0", "--cores", "0.5")
        no_cgroups = cpu_limits.cgroups_unavailable()
        if no_cgroups:  # e.g. not root: a one-line refusal that says why
            assert limit.returncode != 0 and "no CPU cgroup" in limit.stderr and len(limit.stderr.splitlines()) == 1
        else:
            assert limit.returncode == 0, limit.stderr
        drain = cli("drain-node", "--host", "train-0", "--deadline", "30")  # a spot notice; the kill takes it
        assert drain.returncode == 0 and f"node {old_id} is draining" in drain.stdout + drain.stderr, drain.stderr
        kill = cli("kill-node", "--host", "train-0", "--restart")
        assert kill.returncode == 0, kill.stderr
        rows = {r["host"]: r for r in json.loads(cli("status", "--json").stdout)}
        assert rows["train-0"]["ray"] == "ALIVE" and rows["train-0"]["node_id"] != old_id
        if not no_cgroups:
            assert rows["train-0"]["cpu_limit"] == 0.5 and rows["head"]["cpu_limit"] is None  # kept across restart
            assert len(cpu_limits.our_cgroups(state.cluster_id)) == 2  # one per node host
        bad = cli("kill-node", "--host", "nope")
        assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "nope" in bad.stderr
        secret = state.stack().secret_key
        assert all(secret not in p.read_text(errors="replace") for p in (root / "logs").glob("*.log"))
    finally:
        down = cli("down")
    assert down.returncode == 0, down.stderr
    assert our_namespaces(state.cluster_id) == [] and cpu_limits.our_cgroups(state.cluster_id) == []
    assert not any(Path("/etc/netns").glob(f"irc-{state.cluster_id}-*"))
    assert not Path(f"/tmp/irc-{state.cluster_id}").exists()
    refs = [*state.node_processes.values(), *([state.gateway] if state.gateway else [])]
    assert [r.pid for r in refs if process.is_alive(r)] == []  # zombies and reused pids do not count


def test_planner_predicts_the_data_wait_of_a_throttled_stand_in_gpu(local_cluster, client_env, mlflow, s3, prepared):
    """`plan`'s arithmetic (kernel images per core-second x cores x efficiency, then max(0, 1 - decode /
    consume)) against the steady data wait measured on the cluster, below and above the decode capacity."""
    if cpu_limits.cgroups_unavailable():
        pytest.skip(f"the decode host's CPU limit needs cgroups: {cpu_limits.cgroups_unavailable()}")
    crop = 64
    with mock.patch.dict(os.environ, client_env):
        per_core = measure_kernel("s3://imagenet/prepared", crop).images_per_core_s
    capacity = decode_capacity(per_core, PLAN_CPU_LIMIT)
    results = []
    try:
        for ratio in PLAN_RATIOS:
            consume = ratio * capacity
            name = f"cluster-plan-{ratio:g}-{uuid.uuid4().hex[:6]}"
            overrides = [f"train.epochs={PLAN_EPOCHS}", "train.skip_step=true", f"data.train_crop={crop}"]
            overrides += [f"train.throttle_images_per_s={consume:.1f}", f"name={name}"]
            overrides += ["mlflow.system_metrics=false"]  # a capacity measurement: no sampling beside it
            argv = [*shlex.split(manifest_entrypoint("rayjob-train.yaml")), *TEST_SCALE, *overrides]
            submission_id = submit(local_cluster, client_env, argv)
            limited: dict[str, Any] = {}

            def limit_after_epoch_1() -> None:
                # Epoch 1's checkpoint in S3 is written once the epoch (and its validation) is over; its
                # metrics are queued for MLflow after the checkpoint is reported, a moment later.
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline and not _checkpoints(s3, name):  # noqa: B023
                    time.sleep(0.2)
                limited["after_checkpoint"] = bool(_checkpoints(s3, name))  # noqa: B023
                local.set_cpu_limit(local_cluster, "decode-0", PLAN_CPU_LIMIT)
                limited["at"] = time.time()  # noqa: B023

            limiter = threading.Thread(target=limit_after_epoch_1, daemon=True)
            limiter.start()
            info, logs = wait_job(local_cluster, submission_id)
            limiter.join(timeout=30)
            local.set_cpu_limit(local_cluster, "decode-0", None)
            assert info["status"] == "SUCCEEDED", logs[-6000:]
            (run,) = _runs(mlflow, name)
            # The limit is in place after epoch 1 (its checkpoint existed) and by epoch 3's first batch (a
            # metric's timestamp is when rank 0 queued it, just after its epoch's checkpoint): the steady wait
            # of epoch 3, the one measured, is under it.
            ended = {int(m.value): m.timestamp / 1000 for m in mlflow.get_metric_history(run.info.run_id, "epoch")}
            assert limited.get("after_checkpoint") and limited["at"] < ended[2] + 2.0, (limited, ended)
            logged = RunSink(mlflow.tracking_uri, run.info.run_id)
            by_epoch = dict(logged.epoch_history("perf/steady_data_wait_frac"))
            steady = [by_epoch[e] for e in range(PLAN_MEASURED_FROM, PLAN_EPOCHS + 1)]
            rates = {e: round(v) for e, v in logged.epoch_history("perf/epoch_images_per_s")}
            starts = {e: round(v, 1) for e, v in logged.epoch_history("perf/first_batch_s")}
            print(f"\nplan check {name}: first batch s by epoch {starts}")
            results.append(
                (ratio, consume, predict_data_wait(capacity, consume), sum(steady) / len(steady), by_epoch, rates)
            )
    finally:
        local.set_cpu_limit(local_cluster, "decode-0", None)
    table = "; ".join(
        f"consume {c:.0f} img/s ({r:g}x): predicted {p:.2f}, measured {m:.2f} (steady wait by epoch "
        f"{ {e: round(v, 2) for e, v in w.items()} }, images/s {i})"
        for r, c, p, m, w, i in results
    )
    print(f"\nplan check: {per_core:.0f} img/core-s x {PLAN_CPU_LIMIT} cores -> {capacity:.0f} img/s; {table}")
    assert all(abs(m - p) <= PLAN_TOLERANCE for _, _, p, m, _, _ in results), table
