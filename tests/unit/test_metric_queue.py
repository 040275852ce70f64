"""The rank-0 MLflow writer: never blocks the step, keeps order, survives an outage, stays bounded."""

from __future__ import annotations

import threading

import pytest

from imagenet_ray.errors import UserError
from imagenet_ray.tracking import MlflowUnavailable, RunSink, is_transient, when_reachable
from imagenet_ray.train.metric_queue import MetricQueue, epochs_logged
from imagenet_ray.train.progress import Interval, IntervalMeter, ProgressLine, format_duration


class FlakySink:
    """Records writes; fails while `down` is set (an MLflow outage)."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.points: list[tuple[str, float, int, int]] = []
        self.calls: list[str] = []
        self.attempts = 0

    def log_metric_values(self, points: list[tuple[str, float, int, int]]) -> None:
        self.attempts += 1
        if self.down.is_set():
            raise MlflowUnavailable("MLflow at http://127.0.0.1:1: connection refused")
        self.points.extend(points)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.down.is_set():
            raise MlflowUnavailable("down")
        self.calls.append(f"tags {sorted(tags)}")

    def finish(self, status: str) -> None:
        if self.down.is_set():
            raise MlflowUnavailable("down")
        self.calls.append(f"finish {status}")


def test_writes_arrive_in_order_after_an_outage():
    sink = FlakySink()
    sink.down.set()
    queue = MetricQueue(sink)  # type: ignore[arg-type]
    for step in range(1, 4):
        queue.log_step_metrics({"train/loss": 1.0 / step}, step)
    queue.log_metrics({"val/top1": 0.5, "epoch": 1}, step=3)
    queue.finish("FINISHED")
    assert not queue.flush(timeout_s=0.3)  # MLflow is down: nothing sent, the caller was not blocked
    assert sink.points == [] and sink.attempts >= 1
    sink.down.clear()
    assert queue.close(timeout_s=20)
    assert [(k, s) for k, _, _, s in sink.points] == [
        ("train/loss", 1),
        ("train/loss", 2),
        ("train/loss", 3),
        ("val/top1", 3),
        ("epoch", 3),
    ]
    assert sink.calls == ["finish FINISHED"]  # after the metrics, as queued


def test_a_write_mlflow_refuses_is_dropped_at_once_and_the_queue_goes_on():
    """A 4xx (a bad value, a deleted run) is MLflow's answer, not an outage: retrying it would block every
    write behind it for the rest of the run."""
    sink = FlakySink()
    queue = MetricQueue(sink)  # type: ignore[arg-type]

    def refuse(_sink: RunSink) -> None:
        raise UserError("MLflow at http://mlflow:5000: INVALID_PARAMETER_VALUE: tag value too long")

    queue.call("tags", refuse)
    queue.log_metrics({"val/top1": 0.5}, step=1)
    queue.finish("FINISHED")
    assert queue.close(timeout_s=10)
    assert (queue.refused, queue.failures) == (1, 0)
    assert [k for k, *_ in sink.points] == ["val/top1"] and sink.calls == ["finish FINISHED"]


def test_mlflow_errors_are_transient_by_their_http_status():
    from mlflow.exceptions import MlflowException, RestException
    from mlflow.protos import databricks_pb2 as codes

    assert is_transient(MlflowException("API request failed: connection refused"))  # INTERNAL_ERROR: 500
    assert is_transient(MlflowException("slow down", error_code=codes.REQUEST_LIMIT_EXCEEDED))  # 429
    assert is_transient(RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "busy"}))  # 503
    assert is_transient(ConnectionError("reset"))  # no HTTP status: the store's side
    for code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED", "UNAUTHENTICATED"):
        assert not is_transient(MlflowException("no", error_code=getattr(codes, code))), code
        assert not is_transient(RestException({"error_code": code, "message": "no"})), code


def test_when_reachable_retries_an_outage_and_gives_up_on_a_refusal_at_once():
    answers = iter([MlflowUnavailable("down"), MlflowUnavailable("down"), "ok"])

    def flaky() -> str:
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    assert when_reachable(flaky, "tag", wait_s=5, every_s=0.01) == "ok"
    calls = []

    def refused() -> None:
        calls.append(1)
        raise UserError("MLflow at http://mlflow:5000: PERMISSION_DENIED")

    assert when_reachable(refused, "tag", wait_s=30, every_s=0.01) is None
    assert calls == [1]


def test_a_resend_carries_the_original_timestamp():
    sink = FlakySink()
    clock = iter([100.0, 200.0])
    queue = MetricQueue(sink, clock=lambda: next(clock))  # type: ignore[arg-type]
    queue.log_metrics({"a": 1.0}, step=1)
    queue.log_metrics({"a": 2.0}, step=2)
    assert queue.close(timeout_s=10)
    assert [ts for _, _, ts, _ in sink.points] == [100_000, 200_000]  # queued time, not sent time


def test_the_bound_drops_step_curves_first_never_epoch_metrics():
    import time

    sink = FlakySink()
    sink.down.set()
    queue = MetricQueue(sink, max_points=4)  # type: ignore[arg-type]
    queue.log_metrics({"val/top1": 0.1, "epoch": 1}, step=10)
    deadline = time.monotonic() + 10
    while sink.attempts == 0 and time.monotonic() < deadline:  # the thread now holds epoch 1, retrying
        time.sleep(0.01)
    for step in range(1, 6):
        queue.log_step_metrics({"train/loss": float(step)}, step)
    queue.log_metrics({"val/top1": 0.2, "epoch": 2}, step=20)
    # 5 step points + 2 epoch metrics queued, bound 4: the 3 oldest step points go, nothing else.
    assert queue.dropped == 3
    sink.down.clear()
    assert queue.close(timeout_s=20)
    keys = [(k, s) for k, _, _, s in sink.points]
    assert keys == [
        ("val/top1", 10),
        ("epoch", 10),
        ("train/loss", 4),
        ("train/loss", 5),
        ("val/top1", 20),
        ("epoch", 20),
    ]


def test_close_gives_up_after_its_timeout_and_says_so(caplog):
    sink = FlakySink()
    sink.down.set()
    queue = MetricQueue(sink)  # type: ignore[arg-type]
    queue.log_metrics({"val/top1": 0.5}, step=1)
    with caplog.at_level("WARNING"):
        assert not queue.close(timeout_s=0.5)
    assert "not sent" in caplog.text
    with pytest.raises(RuntimeError):
        queue.log_metrics({"x": 1.0}, step=2)


def test_epochs_logged_reads_the_epoch_metric(tmp_path):
    sink = RunSink.create(f"sqlite:///{tmp_path / 'm.db'}", "e", "r")
    sink.log_metrics({"epoch": 1, "val/top1": 0.1}, step=7)
    sink.log_metrics({"epoch": 2, "val/top1": 0.2}, step=14)
    assert epochs_logged(sink) == {1, 2}
    assert sink.epoch_history("val/top1") == [(1, 0.1), (2, 0.2)]


def test_epochs_logged_gives_up_on_an_unreachable_store():
    class Down:
        def logged_values(self, key: str) -> set[int]:
            raise MlflowUnavailable("down")

    assert epochs_logged(Down(), wait_s=0.0, every_s=0.0) == set()  # type: ignore[arg-type]


def test_interval_meter_reports_each_interval_one_cut_late():
    now = [0.0]
    meter = IntervalMeter(every_steps=2, device=__import__("torch").device("cpu"), clock=lambda: now[0])
    import torch

    results = []
    for step in range(1, 7):
        now[0] += 1.0
        meter.add(images=8, wait_s=0.25, loss_sum=torch.tensor(8.0 * step, dtype=torch.float64))
        if meter.due(step):
            results.append(meter.cut(step))
    results.append(meter.finish())
    assert results[0] is None  # the first interval's reduction is read at the next cut
    got = [r for r in results if r is not None]
    assert [r.step for r in got] == [2, 4, 6]
    first = got[0].metrics(lr=0.1)
    assert first["train/loss"] == pytest.approx((8.0 + 16.0) / 16)
    assert first["perf/images_per_s"] == pytest.approx(16 / 2.0)
    assert first["perf/data_wait_frac"] == pytest.approx(0.5 / 2.0)
    assert "train/loss" not in got[0].metrics(lr=None)  # skip_step: nothing trained
    assert not meter.due(6) and not meter.due(0)


def test_interval_meter_averages_the_pre_clip_grad_norms_of_its_steps():
    import torch

    meter = IntervalMeter(every_steps=2, device=torch.device("cpu"), clock=lambda: 0.0)
    norms = {1: 3.0, 2: 5.0, 3: 1.0, 4: 2.0}
    got = []
    for step in range(1, 7):
        # steps 5 and 6 took no clipped step (a batch without an optimizer step, or clipping off)
        meter.add(8, 0.0, torch.tensor(1.0, dtype=torch.float64), torch.tensor(norms[step]) if step in norms else None)
        if meter.due(step):
            got.append(meter.cut(step))
    got.append(meter.finish())
    metrics = [r.metrics(lr=0.1) for r in got if r is not None]
    assert [m.get("train/grad_norm") for m in metrics] == [pytest.approx(4.0), pytest.approx(1.5), None]


def test_progress_line_has_step_rate_and_etas_and_is_rate_limited():
    now = [0.0]
    line = ProgressLine(epochs=3, steps_per_epoch=100, every_s=30, clock=lambda: now[0])
    interval = Interval(step=50, loss_sum=32.0, images=64.0, wait_s=0.5, wall_s=2.0, world=2)
    text = line.line(epoch=0, step_in_epoch=50, interval=interval, elapsed_s=50.0)
    assert text is not None and text.startswith("[epoch 1/3] step 50/100 loss=0.5000 ")
    assert "images/s=64.0 data_wait=0.25" in text
    assert "eta epoch 50s, run 4m10s" in text  # 50 steps at 1/s, then 2 epochs of 100 s
    now[0] = 10.0
    assert line.line(epoch=0, step_in_epoch=60, interval=interval, elapsed_s=60.0) is None
    now[0] = 45.0
    line.epoch_s = 120.0  # a finished epoch (with validation) is the better estimate for the rest
    assert "run 4m50s" in str(line.line(epoch=0, step_in_epoch=50, interval=interval, elapsed_s=50.0))
    assert format_duration(3725) == "1h02m" and format_duration(5) == "5s"
