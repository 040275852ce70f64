"""The S3 server stopped for 30 s in epoch 2, and epoch 3's checkpoint upload cut mid-transfer, in one run on
the real SeaweedFS of `local_stack`: data and checkpoints on s3://, training in this process on a local Ray
(MLflow in a SQLite file, so the faults are S3's alone). Nothing is lost: every epoch once, every val image
once per epoch, one MLflow run, every checkpoint in S3 loads; figures go to docs/reliability.md."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from s3_cut import UploadCut

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 30, 6
EPOCHS, WORKERS, BATCH = 3, 2, 4  # epoch 3's checkpoint, the last, is the one cut
THROTTLE = 3.0  # images/s per worker: 60 images per worker per epoch, ~20 s, less than the outage
OUTAGE_S = 30.0
CUT_REFUSE_S = 10.0  # after the upload's connections are reset, new ones are refused this long
CUT_AT_REQUEST = 5  # of ~15 write requests a checkpoint takes (a multipart upload's parts): mid-transfer


def train_worker_logs(since: float) -> list[str]:
    """The stdout of each Ray Train worker actor of this process's Ray written to since `since`: one per rank
    of every worker group started (a restored one says "restored from the checkpoint")."""
    import ray._private.worker as ray_worker

    logs = Path(ray_worker._global_node.get_logs_dir_path())
    texts = [p.read_text(errors="replace") for p in logs.glob("worker-*.out") if p.stat().st_mtime >= since]
    return [t for t in texts if ":actor_name:RayTrainWorker" in t]


def checkpoint_states(s3: Any, bucket: str, prefix: str) -> list[str]:
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []) if o["Key"].endswith("/state.pt"))


class S3Outage:
    """In a thread: once epoch 1's checkpoint is in S3 and epoch 2 has trained `into_epoch` steps (its data
    read by then), stop the S3 server, start it again OUTAGE_S after it is down, then note when the next
    checkpoint appears. Epoch 2 ends inside the outage: its validation reads and its upload need S3."""

    def __init__(self, stack: Any, name: str, tracking: str, experiment: str, into_epoch: int) -> None:
        from imagenet_ray.services import s3 as s3_service

        self.stack, self.name, self.experiment, self.into_epoch = stack, name, experiment, into_epoch
        self.bucket, self.prefix = "checkpoints", f"fault-s3/{name}/checkpoint_"
        self.client = s3_service.client(stack)
        self.mlflow = MlflowClient(tracking)
        self.times: dict[str, float] = {}
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _wait(self, condition: Any) -> bool:
        deadline = time.monotonic() + 600
        while not condition():
            if self.done.is_set() or time.monotonic() > deadline:
                return False
            time.sleep(0.25)
        return True

    def _max_step(self, key: str) -> int:
        """The last step of metric `key` rank 0 has logged so far (-1 before any)."""
        exp = self.mlflow.get_experiment_by_name(self.experiment)
        tag = f"tags.`imagenet_ray.run_name` = '{self.name}'"
        runs = self.mlflow.search_runs([exp.experiment_id], filter_string=tag) if exp else []
        history = self.mlflow.get_metric_history(runs[0].info.run_id, key) if runs else []
        return max((m.step for m in history), default=-1)

    def _run(self) -> None:
        try:
            if not self._wait(lambda: checkpoint_states(self.client, self.bucket, self.prefix)):
                return
            self.times["first_checkpoint_seen"] = time.time()
            if not self._wait(lambda: self._max_step("epoch") >= 0):
                return
            epoch1_end = self._max_step("epoch")
            if not self._wait(lambda: self._max_step("train/loss") >= epoch1_end + self.into_epoch):
                return
            self.times["stop_begun"] = time.time()
            self.stack.stop_service("s3")
            self.times["down"] = time.time()
            time.sleep(OUTAGE_S)
            self.times["start_begun"] = time.time()
            self.stack.start_service("s3")
            self.times["up"] = time.time()
            self._wait(lambda: len(checkpoint_states(self.client, self.bucket, self.prefix)) >= 2)
            self.times["second_checkpoint_seen"] = time.time()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def finish(self) -> None:
        self.done.set()
        self.thread.join(timeout=120)
        if "down" in self.times and "up" not in self.times:  # never leave the shared stack without S3
            self.stack.start_service("s3")


@pytest.fixture
def upload_cut(local_stack):
    """The relay every client of this test's run reaches S3 through; armed by the test."""
    host, port = local_stack.s3_endpoint.split("://", 1)[1].rsplit(":", 1)
    relay = UploadCut((host, int(port)), refuse_s=CUT_REFUSE_S, cut_at_request=CUT_AT_REQUEST)
    yield relay
    relay.close()


@pytest.fixture
def s3_env(local_stack, upload_cut, monkeypatch):
    """The stack's S3, through the relay, for this process and the local Ray it starts (which its workers
    inherit); no Ray address, no MLflow server."""
    for key, value in local_stack.env().items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", upload_cut.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", upload_cut.endpoint)
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    return local_stack


@pytest.fixture
def local_ray(s3_env):
    import ray

    from imagenet_ray.runtime import start_local_ray

    if ray.is_initialized():  # an earlier test's connection (to the stack's head): this test needs its own Ray
        ray.shutdown()
    start_local_ray(num_cpus=4, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_s3_stopped_30s_then_a_checkpoint_upload_cut_lose_nothing(
    s3_env, upload_cut, local_ray, tmp_path, fault_figures
):
    from imagenet_ray.config import load_config
    from imagenet_ray.data.prepare import PrepareOptions, prepare
    from imagenet_ray.data.synth import write_synthetic_imagenet
    from imagenet_ray.train.checkpoint import read_checkpoint_url
    from imagenet_ray.train.trainer import run_training

    stack, tag = s3_env, uuid.uuid4().hex[:8]
    raw = tmp_path / "raw"
    write_synthetic_imagenet(str(raw), CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, seed=5)
    data_url = f"s3://imagenet/fault-s3-{tag}"
    prepared = prepare(str(raw), data_url, PrepareOptions(shard_mb=0.5, seed=3))
    assert prepared.ok, prepared.problems
    shards = {s: len(prepared.manifest["splits"][s]["shards"]) for s in ("train", "val")}
    num_val = prepared.manifest["splits"]["val"]["num_images"]
    assert num_val == CLASSES * VAL_PER_CLASS

    name, tracking = f"s3-outage-{tag}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        "configs/smoke.yaml",
        [
            f"name={name}",
            f"data.url={data_url}",
            "train.storage_path=s3://checkpoints/fault-s3",
            f"mlflow.tracking_uri={tracking}",
            f"train.epochs={EPOCHS}",
            f"train.num_workers={WORKERS}",
            "train.max_failures=2",
            f"train.throttle_images_per_s={THROTTLE}",
            f"data.batch_size={BATCH}",
            "eval.batch_size=8",
            "data.train_crop=32",
            "eval.resize=40",
            "eval.crop=32",
            "data.local_shuffle_buffer=8",
            "mlflow.log_every_steps=1",  # a timestamped point per optimizer step: progress and retraining
            f"train.checkpoints_to_keep={EPOCHS}",  # every checkpoint stays, the one cut short included
        ],
    )
    outage = S3Outage(stack, name, tracking, cfg.mlflow.experiment, into_epoch=3)
    # Epoch 3's upload (the third checkpoint directory) is cut at its CUT_AT_REQUEST-th write request.
    upload_cut.arm(f"/checkpoints/fault-s3/{name}/".encode(), cut_at=3)
    t0 = time.time()
    try:
        done = run_training(cfg)
    finally:
        t_end = time.time()
        outage.finish()
    assert outage.error is None, outage.error
    times = outage.times
    assert {"down", "up", "second_checkpoint_seen"} <= set(times), times

    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [done["mlflow_run_id"]], "one MLflow run"
    run_id = done["mlflow_run_id"]
    epochs = [int(m.value) for m in client.get_metric_history(run_id, "epoch")]
    val_images = [m.value for m in client.get_metric_history(run_id, "val/images")]
    steps = client.get_metric_history(run_id, "train/loss")
    epoch_end_step = {int(m.value): m.step for m in client.get_metric_history(run_id, "epoch")}
    final = read_checkpoint_url(done["checkpoint_url"])

    # When epoch 2's training ended (its last step point), the first step after S3 was back, steps
    # logged twice (a restarted group retrains from the checkpoint), worker groups started.
    step_times = sorted((m.timestamp / 1000, m.step) for m in steps)
    last_epoch2 = max(t for t, s in step_times if epoch_end_step[1] < s <= epoch_end_step[2])
    during = [t for t, _ in step_times if times["down"] < t < times["up"]]
    after_up = [t for t, _ in step_times if t > times["up"]]
    logged = [s for _, s in step_times]
    retrained_steps = len(logged) - len(set(logged))
    workers = train_worker_logs(t0)
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(step_times)]
    # What the outage met: epoch 2's training ended inside it (then its validation reads, and its upload if
    # validation ended inside it too), or training stalled inside it waiting for its data (the epoch's reads).
    ended_inside = times["down"] < last_epoch2 < times["up"]
    stalled_on_reads = not during and not ended_inside
    per_epoch = {k: [m.value for m in client.get_metric_history(run_id, k)] for k in ("perf/epoch_s", "train/images")}
    speed = [m.value for m in client.get_metric_history(run_id, "perf/epoch_images_per_s")]
    val_s = [e - n / v for e, n, v in zip(per_epoch["perf/epoch_s"], per_epoch["train/images"], speed, strict=True)]
    figures = {
        "shards": shards,
        "outage_s": round(times["up"] - times["stop_begun"], 1),
        "stop_s": round(times["down"] - times["stop_begun"], 1),
        "s3_restart_to_healthy_s": round(times["up"] - times["start_begun"], 1),
        "outage_met": "epoch-2 validation reads" if ended_inside else "epoch-2 training reads",
        "validation_s_per_epoch": [round(v, 1) for v in val_s],
        "upload_met_outage": ended_inside and last_epoch2 + val_s[1] < times["up"],
        "steps_during_outage": len(during),
        "epoch2_training_ended_s_into_outage": round(last_epoch2 - times["stop_begun"], 1),
        "recovery_s_s3_up_to_epoch2_checkpoint": round(times["second_checkpoint_seen"] - times["up"], 1),
        "recovery_s_s3_up_to_next_step": round(after_up[0] - times["up"], 1) if after_up else None,
        "longest_gap_between_steps_s": round(max(gaps), 1),
        "worker_groups_started": len(workers) / WORKERS,
        "ranks_restored_from_a_checkpoint": sum("restored from the checkpoint" in t for t in workers),
        "steps_trained_twice": retrained_steps,
        "images_trained_twice": retrained_steps * BATCH * WORKERS,
        "run_s": round(t_end - t0, 1),
        "epochs_logged": epochs,
        "val_images": val_images,
    }
    fault_figures.record("S3 stopped for 30 s mid-run", **figures)

    # The cut upload: every checkpoint left in S3 is whole (a reset single PUT or an unfinished multipart
    # upload leaves no object), and the run went on from the checkpoint of its epoch.
    assert upload_cut.cut_at_time is not None, f"no upload was cut: {upload_cut.directories}"
    listed = outage.client.list_objects_v2(Bucket="checkpoints", Prefix=f"fault-s3/{name}/checkpoint_")
    objects = {o["Key"]: o for o in listed.get("Contents", []) if o["Key"].endswith("/state.pt")}
    epochs_in_s3 = {k: int(read_checkpoint_url(f"s3://checkpoints/{k.rsplit('/', 1)[0]}")["epoch"]) for k in objects}
    cut_directory = list(upload_cut.directories)[2].decode()
    cut_state = next((o for k, o in objects.items() if f"/{cut_directory}/" in k), None)
    cut_figures = {
        "write_requests_per_checkpoint": list(upload_cut.directories.values()),
        "connections_refused": upload_cut.refused,
        "refused_for_s": CUT_REFUSE_S,
        "cut_checkpoint_last_modified_s_after_cut": (
            round(cut_state["LastModified"].timestamp() - upload_cut.cut_at_time, 1) if cut_state else None
        ),
        "checkpoint_epochs_in_s3": sorted(epochs_in_s3.values()),
        "worker_groups_started": len(workers) / WORKERS,
        "steps_trained_twice": retrained_steps,
    }
    fault_figures.record("a checkpoint upload cut mid-transfer", **cut_figures)
    assert len(upload_cut.directories) == EPOCHS, upload_cut.directories  # one checkpoint per epoch, no retry
    assert cut_state is not None and epochs_in_s3[cut_state["Key"]] == 3, (cut_directory, epochs_in_s3)
    assert list(upload_cut.directories.values())[2] > CUT_AT_REQUEST  # the upload went on after the cut

    # The outage met S3 work, and it waited for S3: the checkpoint of epoch 2 appeared only once S3 was back.
    assert ended_inside or stalled_on_reads, (times, figures)
    assert times["second_checkpoint_seen"] > times["up"], times
    assert done["epoch"] == EPOCHS and epochs == list(range(1, EPOCHS + 1)), epochs
    assert val_images == [num_val] * EPOCHS, val_images
    assert int(final["epoch"]) == EPOCHS and final["mlflow_run_id"] == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    # The SDK's retries carried every request across the outage: no worker group was restarted.
    assert figures["worker_groups_started"] == 1 and retrained_steps == 0, figures
