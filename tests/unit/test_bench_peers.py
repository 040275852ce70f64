"""The pure parts of `bench data`'s peer readers: the S3 byte counter, arguments, ratios and goals, skip records."""

import argparse
import socket
import threading
import time

import pytest

from imagenet_ray.bench import peers
from imagenet_ray.bench.s3_meter import S3Meter, epoch_bytes, upstream_of
from imagenet_ray.errors import UserError


def _one_response_server(payload: bytes) -> socket.socket:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        conn.recv(1024)  # the request
        conn.sendall(payload)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return server


def test_relay_counts_exactly_the_bytes_of_a_response():
    payload = bytes(range(256)) * 12_345 + b"tail"  # ~3 MB, not a multiple of the relay's chunk
    server = _one_response_server(payload)
    meter = S3Meter(f"http://127.0.0.1:{server.getsockname()[1]}")
    try:
        before = time.perf_counter()
        client = socket.create_connection(("127.0.0.1", int(meter.endpoint.rsplit(":", 1)[1])))
        client.sendall(b"GET /bucket/key HTTP/1.1\r\nHost: x\r\n\r\n")
        received = bytearray()
        while data := client.recv(1 << 16):
            received += data
        client.close()
        assert bytes(received) == payload  # relayed unchanged
        deadline = time.monotonic() + 5
        while meter.total() != len(payload) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert meter.total() == len(payload)  # server → client only: the request's bytes are not counted
        assert meter.bytes_at([before - 1, time.perf_counter()]) == [0, len(payload)]
        assert meter.cpu_s() >= 0
    finally:
        meter.close()
        server.close()


def test_relay_needs_a_plain_http_endpoint():
    assert upstream_of("http://127.0.0.1:8333") == ("127.0.0.1", 8333)
    with pytest.raises(UserError, match="plain http://"):
        upstream_of("https://s3.amazonaws.com")


class _FakeMeter:
    """Cumulative bytes 1,000 per second since t=0."""

    def bytes_at(self, times):
        return [int(1000 * t) for t in times]


def test_epoch_bytes_splits_the_timeline_at_epoch_starts():
    epochs = [
        {"started_at": 1.0, "wall_s": 2.0, "images": 100},
        {"started_at": 3.0, "wall_s": 1.0, "images": 100},
        {"started_at": 4.0, "wall_s": 0.95, "images": 50},
    ]
    out = epoch_bytes(_FakeMeter(), epochs, started=0.5)
    assert out["setup_bytes"] == 500
    assert out["epoch_bytes"] == [2000, 1000, 1000]  # the last epoch runs to its end + 0.05 s
    assert out["bytes_per_image"] == [20.0, 10.0, 20.0]
    assert out["first_epoch_bytes_per_image"] == 20.0 and out["steady_bytes_per_image"] == 15.0


def test_peer_arguments():
    parser = argparse.ArgumentParser()
    peers.add_peer_args(parser)
    assert peers.peer_options(parser.parse_args([])) == {
        "peer_sides": ("parquet", "mosaic", "litdata"),
        "peer_decoders": ("ours", "default"),
    }
    opts = peers.peer_options(parser.parse_args(["--peers", "litdata, parquet", "--peer-decoders", "ours"]))
    assert opts == {"peer_sides": ("parquet", "litdata"), "peer_decoders": ("ours",)}  # in the canonical order
    assert peers.peer_options(parser.parse_args(["--skip-peers"]))["peer_sides"] == ()
    with pytest.raises(UserError, match="--peers ffcv: expected a comma-separated subset of parquet,mosaic,litdata"):
        peers.peer_options(parser.parse_args(["--peers", "ffcv"]))
    with pytest.raises(UserError, match="--peer-decoders"):
        peers.peer_options(parser.parse_args(["--peer-decoders", ""]))


def test_a_missing_peer_package_is_a_skip_record(monkeypatch):
    import importlib.metadata

    def version(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert peers.missing_package("mosaic") == "mosaicml-streaming"
    assert peers.missing_package("litdata") == "litdata"
    assert peers.missing_package("parquet") is None  # needs nothing beyond the project
    record = peers.skip_record("mosaic")
    assert record["skipped"] == "not installed" and record["package"] == "mosaicml-streaming"


def _side(rate, first=None):
    return {"images_per_s": rate, "first_epoch_images_per_s": first or rate / 2, "epochs": []}


def test_ratios_and_goals():
    e2e = {
        "epochs": 3,
        "batch_size": 64,
        "ray": _side(1100.0),
        "ray_s3": _side(1000.0),
        "peers": {
            "workers": 2,
            "sides": {
                "parquet:ours": _side(1250.0),
                "mosaic:ours": _side(800.0),
                "mosaic:default": _side(500.0),
                "litdata:ours": _side(1100.0),
                "litdata:default": peers.skip_record("litdata"),
            },
        },
    }
    summary = peers.summarise(e2e)
    assert summary["ratios"]["parquet:ours"] == {"ray_s3": 0.8, "ray_local": 0.88, "ray_s3_cached": None}
    assert summary["peer_goals_ray_side"] == "ray_s3"  # no cached side measured: the peers against plain S3
    assert "litdata:default" not in summary["ratios"]
    goals = summary["goals"]
    assert goals["ray_vs_floor"] == {"value": 0.8, "target": ">= 0.9", "met": False}
    assert goals["ahead_of_mosaic_same_kernel"]["met"] is True  # 1.25
    assert goals["further_ahead_of_mosaic_default"] == {"value": 2.0, "target": "> mosaic:ours ratio", "met": True}
    assert goals["ahead_of_litdata_same_kernel"]["met"] is False  # 0.91
    assert goals["further_ahead_of_litdata_default"]["met"] is None  # not measured: skipped
    e2e["peers"]["summary"] = summary
    text = "\n".join(peers.format_table(e2e))
    assert "skipped: not installed" in text and "goal ray_vs_floor: 0.80 (target >= 0.9): MISSED" in text
    assert "goal further_ahead_of_litdata_default: — " in text and "not measured" in text
    # With Ray's node cache measured, the peers (who cache locally too) are compared with it.
    e2e["ray_s3_cached"] = _side(1200.0)
    cached = peers.summarise(e2e)
    assert cached["peer_goals_ray_side"] == "ray_s3_cached"
    assert cached["goals"]["ahead_of_mosaic_same_kernel"]["value"] == 1.5  # 1200 / 800
    assert cached["goals"]["ray_vs_floor"]["value"] == 0.8  # the floor is still against plain S3 reads
    e2e["peers"]["summary"] = cached
    assert "the same, shards cached on the node" in "\n".join(peers.format_table(e2e))


def test_process_groups():
    own = {7: "driver"}
    assert peers.process_group("python", "anything", 7, own) == "driver"
    assert peers.process_group("raylet", "/x/raylet --flags", 1, own) == "ray: raylet + gcs"
    assert peers.process_group("python", "ray::RayTrainWorker.run", 1, own) == "train worker"
    assert peers.process_group("python", "ray::SplitCoordinator.start_epoch", 1, own).startswith("ray: actors")
    assert peers.process_group("python", "ray::IDLE", 1, own) == "ray: task workers (read + decode)"
    assert peers.process_group("python", "ray::ReadParquet->MapBatches(_train_map)", 1, own).startswith("ray: task")
    assert peers.process_group("weed", "weed server -s3", 1, own) == "S3 server"
    assert peers.process_group("python", "python .../ray/dashboard/agent.py", 1, own).startswith("ray: dashboard")
    worker = "python .../ray/_private/workers/default_worker.py --metrics-agent-port=1"  # before its ray:: title
    assert peers.process_group("python", worker, 1, own) == "ray: task workers (read + decode)"


def test_a_failing_peer_side_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    calls = []

    def failing(remote, cache, decoder, *rest):
        calls.append(decoder)
        if decoder == "ours":
            raise IndexError("index 0 is out of bounds for axis 0 with size 0\n(more lines)")
        return {"images_per_s": 1.0, "epochs": []}

    monkeypatch.setattr(peers, "missing_package", lambda side: None)
    monkeypatch.setattr(peers, "write_mds", lambda local, remote: {"s": 0})
    monkeypatch.setattr(peers, "run_mosaic_side", failing)
    monkeypatch.setattr(peers, "observed", lambda run: run())
    out = peers.run_peer_sides("local", "s3://b/p", tmp_path, 32, 8, 1, lambda b: {}, ("mosaic",), ("ours", "default"))
    assert calls == ["ours", "default"]
    failed = out["sides"]["mosaic:ours"]
    assert failed["skipped"] == "failed: IndexError: index 0 is out of bounds for axis 0 with size 0"
    assert out["sides"]["mosaic:default"] == {"images_per_s": 1.0, "epochs": []}
