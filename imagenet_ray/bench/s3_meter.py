"""Bytes read from S3 per side: a TCP relay on 127.0.0.1 in front of the S3 endpoint, counting server→client.

The relay runs in its own process (inheriting the bench's pinned cores), so it takes no GIL time from the
driver and its CPU time is measured; it keeps a timeline, so any time window's bytes can be asked for.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from typing import IO, Any
from urllib.parse import urlparse

from imagenet_ray.errors import UserError
from imagenet_ray.runtime import temporary_env

CHUNK = 1 << 20  # bytes moved per splice/recv: large enough that the relay's CPU stays small
ENDPOINT_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "S3_ENDPOINT_URL")  # ours, boto3's, Mosaic's


def upstream_of(endpoint: str) -> tuple[str, int]:
    """(host, port) of an http:// endpoint URL; UserError for anything the relay cannot stand in front of."""
    parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
    if parsed.scheme != "http" or not parsed.hostname:
        raise UserError(f"S3 byte counter: {endpoint!r}: needs a plain http:// endpoint (a local S3 server)")
    return parsed.hostname, parsed.port or 80


class S3Meter:
    """The relay process in front of `endpoint`; `bytes_at(times)` = server→client bytes relayed by then."""

    def __init__(self, endpoint: str) -> None:
        host, port = upstream_of(endpoint)
        code = "import sys; from imagenet_ray.bench.s3_meter import serve; serve(sys.argv[1], int(sys.argv[2]))"
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code, host, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self._proc.stdout is not None and self._proc.stdin is not None
        self._out: IO[str] = self._proc.stdout
        self._in: IO[str] = self._proc.stdin
        line = self._out.readline()
        if not line.startswith("port "):
            self.close()
            raise RuntimeError(f"S3 byte counter did not start (said {line!r})")
        self.endpoint = f"http://127.0.0.1:{int(line.split()[1])}"
        self.pid = self._proc.pid

    def _ask(self, request: dict[str, Any]) -> Any:
        self._in.write(json.dumps(request) + "\n")
        self._in.flush()
        return json.loads(self._out.readline())

    def bytes_at(self, times: Sequence[float]) -> list[int]:
        """Cumulative server→client bytes at each time.perf_counter() time (CLOCK_MONOTONIC: any process)."""
        return [int(b) for b in self._ask({"at": list(times)})]

    def total(self) -> int:
        return int(self._ask({"total": True}))

    def cpu_s(self) -> float:
        import psutil

        t = psutil.Process(self.pid).cpu_times()
        return float(t.user + t.system)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._in.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    @contextlib.contextmanager
    def routed(self) -> Iterator[S3Meter]:
        """This process's S3 endpoint variables point at the relay meanwhile (children inherit them)."""
        with temporary_env(dict.fromkeys(ENDPOINT_VARS, self.endpoint)):
            yield self


def epoch_bytes(meter: S3Meter, epochs: Sequence[dict[str, Any]], started: float) -> dict[str, Any]:
    """Bytes read before the first epoch (listing, index files) and in each epoch; epoch k runs from its
    `started_at` to the next epoch's (the last to its end), so nothing read in between is lost."""
    starts = [float(e["started_at"]) for e in epochs]
    end = starts[-1] + float(epochs[-1]["wall_s"]) + 0.05
    marks = meter.bytes_at([started, *starts, end])
    per_epoch = [marks[i + 2] - marks[i + 1] for i in range(len(epochs))]
    images = [int(e["images"]) for e in epochs]
    per_image = [b / n if n else 0.0 for b, n in zip(per_epoch, images, strict=True)]
    steady = per_image[1:] or per_image
    return {
        "setup_bytes": marks[1] - marks[0],
        "epoch_bytes": per_epoch,
        "bytes_per_image": per_image,
        "first_epoch_bytes_per_image": per_image[0],
        "steady_bytes_per_image": sum(steady) / len(steady),
    }


# --- the relay process ------------------------------------------------------------------------------------------


class _Timeline:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.times: list[float] = [time.perf_counter()]
        self.totals: list[int] = [0]

    def add(self, n: int) -> None:
        with self.lock:
            self.times.append(time.perf_counter())
            self.totals.append(self.totals[-1] + n)

    def at(self, t: float) -> int:
        with self.lock:
            i = bisect_right(self.times, t)
            return self.totals[i - 1] if i else 0


def _pump_down(src: socket.socket, dst: socket.socket, timeline: _Timeline) -> None:
    """Server → client, counted. splice() moves the bytes inside the kernel (no copy through Python)."""
    splice = getattr(os, "splice", None)
    if splice is not None:
        r, w = os.pipe()
        try:
            import fcntl

            with contextlib.suppress(OSError, AttributeError):
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, CHUNK)
            while n := splice(src.fileno(), w, CHUNK):
                left = n
                while left:
                    left -= splice(r, dst.fileno(), left)
                timeline.add(n)
            return
        finally:
            os.close(r)
            os.close(w)
    buf = memoryview(bytearray(CHUNK))
    while n := src.recv_into(buf):
        dst.sendall(buf[:n])
        timeline.add(n)


def _pump_up(src: socket.socket, dst: socket.socket) -> None:
    while data := src.recv(CHUNK):
        dst.sendall(data)


def _relay(client: socket.socket, upstream: tuple[str, int], timeline: _Timeline) -> None:
    try:
        server = socket.create_connection(upstream, timeout=10)
        server.settimeout(None)
    except OSError:
        client.close()
        return

    def run(fn: Any, *args: Any) -> None:
        src, dst = args[0], args[1]
        try:
            fn(*args)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)  # pass the half-close on (HTTP keeps the other way open)
            with contextlib.suppress(OSError):
                src.shutdown(socket.SHUT_RD)

    up = threading.Thread(target=run, args=(_pump_up, client, server), daemon=True)
    up.start()
    run(_pump_down, server, client, timeline)
    up.join()
    client.close()
    server.close()


def serve(host: str, port: int) -> None:
    """Relay 127.0.0.1:<free port> to (host, port) until stdin closes; answer one JSON request a line."""
    timeline = _Timeline()
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_relay, args=(client, (host, port), timeline), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    print(f"port {listener.getsockname()[1]}", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "at" in request:
            answer: Any = [timeline.at(float(t)) for t in request["at"]]
        else:
            answer = timeline.at(float("inf"))
        print(json.dumps(answer), flush=True)
    listener.close()
