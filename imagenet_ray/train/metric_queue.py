"""Rank 0's MLflow writes off the training thread: a bounded queue sent in order by one thread and
retried until MLflow answers again, so no step waits for MLflow and an outage costs no training. Writes
keep their queue-time timestamp (a resend stores nothing twice); when full, the oldest step-curve points
go first, never epoch metrics, tags or artifacts (docs/dashboard.md)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from imagenet_ray.errors import UserError
from imagenet_ray.tracking import MlflowUnavailable, RunSink

log = logging.getLogger(__name__)

_BATCH_METRICS = 1000  # MLflow's cap on metrics in one log_batch
_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)


@dataclass
class _Write:
    """One queued write: metric values (coalesced into batches) or another call on the sink."""

    describe: str
    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)  # key, value, timestamp ms, step
    call: Callable[[RunSink], None] | None = None
    droppable: bool = False  # step-curve points may go when the queue is full


class MetricQueue:
    """Queue writes to `sink`; `close()` sends what is left (waiting up to its timeout)."""

    def __init__(
        self,
        sink: RunSink,
        max_points: int = 200_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sink, self.max_points = sink, max_points
        self._clock = clock
        self._pending: deque[_Write] = deque()
        self._points = 0  # metric values in _pending
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False  # the thread holds a write it has not finished
        self._abandon = threading.Event()  # set by close(): stop retrying
        self.dropped = 0
        self.failures = 0  # failed attempts (each retried)
        self.refused = 0  # writes MLflow refused (a 4xx answer): dropped, not retried
        self._thread = threading.Thread(target=self._run, name="mlflow-writer", daemon=True)
        self._thread.start()

    # -- queueing (the training thread) -----------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int, droppable: bool = False) -> None:
        now = int(self._clock() * 1000)
        points = [(k, float(v), now, step) for k, v in metrics.items()]
        self._put(_Write(f"metrics at step {step}", metrics=points, droppable=droppable))

    def log_step_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Step-curve points: the first to go when MLflow is away long enough to fill the queue."""
        self.log_metrics(metrics, step, droppable=True)

    def call(self, describe: str, fn: Callable[[RunSink], None]) -> None:
        """Any other write (a tag, an artifact, the run's end), in order with the metrics."""
        self._put(_Write(describe, call=fn))

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        self.call(f"artifact {artifact_file}", lambda s: s.log_dict(data, artifact_file))

    def log_artifact(self, content: dict[str, Any] | bytes, artifact_file: str) -> None:
        """A JSON artifact (a dict) or a picture (PNG bytes)."""
        if isinstance(content, bytes):
            self.call(f"artifact {artifact_file}", lambda s: s.log_image(content, artifact_file))
        else:
            self.log_dict(content, artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.call("tags", lambda s: s.set_tags(tags))

    def finish(self, status: str) -> None:
        self.call(f"run status {status}", lambda s: s.finish(status))

    def _put(self, write: _Write) -> None:
        with self._cond:
            if self._closing:
                raise RuntimeError("MetricQueue is closed")
            self._pending.append(write)
            self._points += len(write.metrics)
            self._drop_to_bound()
            self._cond.notify()

    def _drop_to_bound(self) -> None:
        if self._points <= self.max_points:
            return
        kept: deque[_Write] = deque()
        for w in self._pending:
            if self._points > self.max_points and w.droppable:
                self._points -= len(w.metrics)
                self.dropped += len(w.metrics)
                if self.dropped == len(w.metrics):
                    log.warning(
                        "MLflow unreachable and over %d metric values queued: dropping the oldest step curves",
                        self.max_points,
                    )
                continue
            kept.append(w)
        self._pending = kept

    # -- sending (the writer thread) --------------------------------------------------------------
    def _take(self) -> list[_Write] | None:
        """The next writes to send: consecutive metric writes as one batch, or one call."""
        with self._cond:
            while not self._pending and not self._closing:
                self._cond.wait()
            if not self._pending:
                return None
            first = self._pending.popleft()
            taken = [first]
            if first.call is None:
                size = len(first.metrics)
                while (
                    self._pending
                    and self._pending[0].call is None
                    and size + len(self._pending[0].metrics) <= _BATCH_METRICS
                ):
                    size += len(self._pending[0].metrics)
                    taken.append(self._pending.popleft())
            self._points -= sum(len(w.metrics) for w in taken)
            self._busy = True
            return taken

    def _send(self, writes: list[_Write]) -> None:
        if writes[0].call is not None:
            writes[0].call(self.sink)
        else:
            self.sink.log_metric_values([p for w in writes for p in w.metrics])

    def _run(self) -> None:
        while (writes := self._take()) is not None:
            attempt = 0
            while True:
                try:
                    self._send(writes)
                    break
                except Exception as exc:
                    if isinstance(exc, UserError) and not isinstance(exc, MlflowUnavailable):
                        # MLflow answered no (a bad value, a deleted run): the same write gets the same answer.
                        self.refused += 1
                        log.warning("MLflow refused %s, dropped: %s", writes[0].describe, exc)
                        break
                    if not self._retry(writes, attempt, exc):  # closed while MLflow was away
                        break
                    attempt += 1
            if attempt:
                log.warning("MLflow reachable again after %d failed attempts", attempt)
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _retry(self, writes: list[_Write], attempt: int, exc: BaseException) -> bool:
        """After failed attempt number `attempt` (0-based): wait the backoff; False when closed meanwhile.
        An outage keeps the writes, which are never reordered."""
        self.failures += 1
        if attempt == 0:
            log.warning("MLflow write failed (%s), retrying: %s", writes[0].describe, exc)
        return not self._abandon.wait(_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)])

    # -- waiting ----------------------------------------------------------------------------------
    def flush(self, timeout_s: float) -> bool:
        """Wait until everything queued so far is sent; False if `timeout_s` passed first."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._pending) + int(self._busy)

    def close(self, timeout_s: float) -> bool:
        """Send what is left (waiting up to `timeout_s` for MLflow) and stop the thread; False (and a
        warning naming what was lost) when MLflow did not come back in time."""
        sent = self.flush(timeout_s)
        with self._cond:
            self._closing = True
            lost = len(self._pending) + int(self._busy)
            self._abandon.set()
            self._pending.clear()
            self._cond.notify_all()
        self._thread.join(timeout=15)
        if not sent:
            log.warning("MLflow unreachable for %.0f s at the end of the run: %d writes not sent", timeout_s, lost)
        return sent


def epochs_logged(sink: RunSink, wait_s: float = 60.0, every_s: float = 5.0) -> set[int]:
    """The epochs already in the run (values of its `epoch` metric), waiting up to `wait_s` for MLflow;
    if it stays away, none (an epoch may then be logged twice rather than training stopping)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return sink.logged_values("epoch")
        except Exception as exc:
            if time.monotonic() >= deadline:
                log.warning("MLflow unreachable (%s): cannot tell which epochs are logged; logging each epoch", exc)
                return set()
            time.sleep(every_s)


def last_logged_step(sink: RunSink, key: str = "perf/images_per_s") -> int:
    """The last step of step curve `key` in the run: a restarted attempt does not log again the steps the
    lost one logged (-1: none, or MLflow unreachable)."""
    try:
        return max(sink.logged_steps(key), default=-1)
    except Exception as exc:
        log.warning("MLflow unreachable (%s): step curves may get a second point at some steps", exc)
        return -1
