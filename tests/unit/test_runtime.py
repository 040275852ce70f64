"""Runtime helpers: absolute URLs, refusing a job-API RAY_ADDRESS, and worker logging."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import ray

from imagenet_ray.errors import UserError
from imagenet_ray.runtime import absolute_url, configure_worker_logging, ensure_ray


def test_absolute_url_keeps_urls_and_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_url("s3://bucket/x") == "s3://bucket/x"
    assert absolute_url("file:///a/b") == "file:///a/b"
    assert absolute_url("data/p") == os.path.join(str(tmp_path), "data", "p")
    assert absolute_url("/abs") == "/abs"


def test_ensure_ray_refuses_a_job_api_address(monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("must not start Ray"))
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(UserError, match=r"job-API URL.*python jobs/train\.py"):
        ensure_ray(1)
    with pytest.raises(UserError, match=r"python jobs/evaluate\.py"):  # each command names its own job
        ensure_ray(1, job="jobs/evaluate.py")


def test_every_command_names_a_job_that_exists():
    import re

    repo = Path(__file__).resolve().parents[2]
    named = set()
    for path in (repo / "imagenet_ray").rglob("*.py"):
        named |= set(re.findall(r'ensure_ray\([^)]*job="([^"]+)"', path.read_text()))
    assert named == {"jobs/prepare.py", "jobs/evaluate.py", "jobs/predict.py"}
    assert all((repo / job).is_file() for job in named | {"jobs/train.py"})


def test_ensure_ray_starts_a_loopback_ray_with_a_cpu_to_spare(monkeypatch):
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **k: calls.append(k))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    ensure_ray(3.5)
    assert calls == [
        {"num_cpus": 5, "include_dashboard": False, "log_to_driver": True, "_node_ip_address": "127.0.0.1"}
    ]


def test_configure_worker_logging_prints_plain_info_once(monkeypatch, capsys):
    package = logging.getLogger("imagenet_ray")
    monkeypatch.setattr(package, "handlers", [])
    monkeypatch.setattr(package, "level", logging.NOTSET)
    monkeypatch.setattr(package, "propagate", True)
    configure_worker_logging()
    configure_worker_logging()
    logging.getLogger("imagenet_ray.train.runner").info("[epoch 1/2] x")
    assert capsys.readouterr().out == "[epoch 1/2] x\n"
    assert len(package.handlers) == 1 and package.propagate is False


def test_temporary_env_sets_and_restores_each_variable(monkeypatch):
    import os

    from imagenet_ray.runtime import temporary_env

    monkeypatch.setenv("IR_TEST_KEPT", "before")
    monkeypatch.delenv("IR_TEST_NEW", raising=False)
    try:
        with temporary_env({"IR_TEST_KEPT": "inside", "IR_TEST_NEW": "inside"}):
            assert os.environ["IR_TEST_KEPT"] == os.environ["IR_TEST_NEW"] == "inside"
            raise RuntimeError("restored on errors too")
    except RuntimeError:
        pass
    assert os.environ["IR_TEST_KEPT"] == "before" and "IR_TEST_NEW" not in os.environ
