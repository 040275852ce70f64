"""The pure parts of imagenet_ray.services: ports, state round trip, env, command lines, the service
protocol and one-way imports, stopping trees.

No servers are started; the process tests use `sleep` children only.
"""

from __future__ import annotations

import ast
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagenet_ray.errors import UserError
from imagenet_ray.services import LocalStack, Service, StackState, mlflow_server, process, ray_head, s3
from imagenet_ray.services.commands import env_sh
from imagenet_ray.services.ports import free_ports, quiet_range
from imagenet_ray.services.stack import SERVICES, _failure, _new_stack, _PortConflict


def _stack(tmp_path: Path) -> LocalStack:
    return _new_stack(tmp_path, 6, ("imagenet", "mlflow", "checkpoints"))


def test_free_ports_are_distinct_bindable_and_outside_the_ephemeral_range():
    ports = free_ports(25)
    assert len(set(ports)) == 25
    span = quiet_range()
    if span is not None:  # never a port the kernel hands to port-0 binds or outgoing connections
        assert all(span[0] <= p <= span[1] for p in ports), ports
    socks = []
    try:
        for port in ports:
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", port))
    finally:
        for s in socks:
            s.close()


def test_new_stack_has_a_port_per_service_port_and_random_secrets(tmp_path):
    a, b = _stack(tmp_path), _stack(tmp_path)
    names = [name for svc in SERVICES for name in svc.PORTS]
    assert sorted(a.ports) == sorted(names) and len(set(a.ports.values())) == len(names)
    assert a.secret_key != b.secret_key and a.access_key != b.access_key and a.ray_auth_token != b.ray_auth_token
    assert len(a.secret_key) >= 40 and len(a.ray_auth_token) >= 64


def test_addresses_and_env(tmp_path):
    st = _stack(tmp_path)
    assert st.s3_endpoint == f"http://127.0.0.1:{st.ports['s3']}"
    assert st.mlflow_uri == f"http://127.0.0.1:{st.ports['mlflow']}"
    assert st.ray_gcs_address == f"127.0.0.1:{st.ports['gcs']}"
    assert st.dashboard_url == f"http://127.0.0.1:{st.ports['dashboard']}"
    env = st.env()
    assert env["AWS_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL_S3"] == env["MLFLOW_S3_ENDPOINT_URL"] == st.s3_endpoint
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (st.access_key, st.secret_key)
    assert env["AWS_REGION"] == "us-east-1"
    assert env["MLFLOW_TRACKING_URI"] == st.mlflow_uri
    assert env["RAY_ADDRESS"] == st.dashboard_url
    assert env["RAY_AUTH_TOKEN"] == st.ray_auth_token and env["RAY_AUTH_MODE"] == "token"
    assert st.ray_auth_headers() == {"Authorization": f"Bearer {st.ray_auth_token}"}


def test_each_service_implements_the_protocol():
    assert [svc.NAME for svc in SERVICES] == ["s3", "mlflow", "ray"]
    for svc in SERVICES:
        assert isinstance(svc, Service), svc.NAME
    members = [name for name in vars(Service) if not name.startswith("_")] + list(Service.__annotations__)
    for svc in SERVICES:
        for name in members:
            assert hasattr(svc, name), (svc.NAME, name)


def test_services_import_the_state_and_never_the_stack():
    """One-way imports: commands → stack → service modules → protocol/state → process/ports."""
    services_dir = Path(s3.__file__).parent

    def imported(module: str) -> set[str]:
        tree = ast.parse((services_dir / f"{module}.py").read_text())
        names = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        names |= {
            f"imagenet_ray.services.{alias.name}"
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "imagenet_ray.services"
            for alias in node.names
        }
        return {n.rsplit(".", 1)[1] for n in names if n.startswith("imagenet_ray.services.")}

    allowed = {
        "ports": set(),
        "process": set(),
        "state": {"ports", "process"},
        "protocol": {"state"},
        "s3": {"ports", "state"},
        "mlflow_server": {"ports", "state"},
        "ray_head": {"ports", "state"},
        "stack": {"s3", "mlflow_server", "ray_head", "process", "ports", "protocol", "state"},
        "commands": {"stack", "state"},
    }
    for module, may_import in allowed.items():
        assert imported(module) <= may_import, (module, imported(module) - may_import)


def test_the_stack_is_its_state_plus_lifecycle(tmp_path):
    st = _stack(tmp_path)
    assert isinstance(st, StackState) and isinstance(st, LocalStack)
    path = tmp_path / "state.json"
    st.save(path)
    assert type(LocalStack.load(path)) is LocalStack  # `services down` gets a stack it can stop
    assert st.alive() == {"s3": False, "mlflow": False, "ray": False}  # nothing started


def test_secrets_stay_out_of_repr_and_command_lines(tmp_path):
    st = _stack(tmp_path)
    shown = repr(st) + str(st)
    assert st.secret_key not in shown and st.ray_auth_token not in shown
    for svc in SERVICES:
        cmd = " ".join(svc.command(st))
        assert st.secret_key not in cmd and st.ray_auth_token not in cmd, svc.NAME


def test_state_round_trip_and_file_mode(tmp_path):
    st = _stack(tmp_path)
    st.processes = {
        "s3": process.ProcessRef(123, 456),
        "mlflow": process.ProcessRef(124, None),
        "ray": process.ProcessRef(125, 789),
    }
    assert LocalStack.from_dict(st.to_dict()) == st
    path = tmp_path / "state" / "state.json"
    st.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert LocalStack.load(path) == st


def test_unreadable_state_is_one_user_error(tmp_path):
    bad = tmp_path / "state.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="unreadable services state"):
        LocalStack.load(bad)
    bad.write_text('{"version": 99}')
    with pytest.raises(UserError, match="version"):
        LocalStack.load(bad)


def test_env_sh_sources_to_the_same_values(tmp_path):
    st = _stack(tmp_path)
    st.secret_key = 'we\'ird $ecret "quoted" `x`'
    f = tmp_path / "env.sh"
    f.write_text(env_sh(st))
    out = subprocess.run(
        ["bash", "-c", f"export AWS_SESSION_TOKEN=stale; source {f}; env -0"], capture_output=True, check=True
    ).stdout.decode()
    seen = dict(item.split("=", 1) for item in out.split("\0") if "=" in item)
    for key, value in st.env().items():
        assert seen[key] == value, key
    assert "AWS_SESSION_TOKEN" not in seen


def test_service_commands_use_every_picked_port(tmp_path):
    st = _stack(tmp_path)
    weed = " ".join(s3.command(st))
    for name in s3.PORTS:
        assert f"={st.ports[name]}" in weed, name
    assert "-ip.bind=127.0.0.1" in weed and "-master.telemetry=false" in weed and "-s3.port.iceberg=0" in weed
    ray = " ".join(ray_head.command(st))
    for name in (
        "gcs",
        "dashboard",
        "client_server",
        "dashboard_agent_http",
        "dashboard_agent_grpc",
        "runtime_env_agent",
        "metrics_export",
        "object_manager",
        "node_manager",
    ):
        assert f"={st.ports[name]}" in ray, name
    assert f"--temp-dir=/tmp/irray-{st.ports['gcs']}" in ray and "--num-cpus=6" in ray
    assert len(str(ray_head.temp_dir(st))) < 20  # Ray's unix socket paths below it must stay < 107 chars
    renv = ray_head.environ(st, {"PATH": "/usr/bin", "RAY_ADDRESS": "http://elsewhere:8265"})
    assert "RAY_ADDRESS" not in renv and renv["AWS_SECRET_ACCESS_KEY"] == st.secret_key
    assert renv["AUTOSCALER_METRIC_PORT"] == str(st.ports["autoscaler_metrics"])
    assert renv["DASHBOARD_METRIC_PORT"] == str(st.ports["dashboard_metrics"])
    assert renv["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    wenv = s3.environ(st, {"PATH": "/usr/bin", **st.env()})
    assert not [k for k in wenv if k.startswith("AWS_")]  # weed would add an identity from them
    ml = mlflow_server.command(st)
    assert ml[ml.index("--port") + 1] == str(st.ports["mlflow"]) and ml[ml.index("--workers") + 1] == "1"


def test_a_bind_failure_in_the_new_part_of_a_log_is_a_port_conflict(tmp_path):
    st = _stack(tmp_path)
    log = st.log_path("s3")
    log.parent.mkdir(parents=True)
    log.write_text("F1129 old run: listen tcp 127.0.0.1:1: bind: address already in use\n")
    offset = log.stat().st_size
    assert type(_failure(st, s3, offset, "S3 exited")) is UserError  # an old failure does not count
    with open(log, "a") as f:
        f.write("F1129 s3 failed to listen on grpc port 2: bind: address already in use\n")
    err = _failure(st, s3, offset, "S3 (SeaweedFS) exited with code 255 while starting")
    assert isinstance(err, _PortConflict) and str(err).endswith(f"; see {log}")


def test_identities_file_is_private(tmp_path):
    st = _stack(tmp_path)
    s3.prepare(st)
    path = s3.identities_path(st)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert st.secret_key in path.read_text()


def test_missing_weed_binary_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="`weed` binary not found"):
        s3.binary()


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")

# A leader with: a child in its session, a child in a new session (like a Ray job's entrypoint)
# with its own child, and a child that ignores SIGTERM.
_TREE = r"""
import os, signal, subprocess, sys, time
subprocess.Popen(["sleep", "300"])
subprocess.Popen(["sh", "-c", "sleep 301 & wait"], start_new_session=True)
subprocess.Popen([sys.executable, "-c",
                  "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(302)"])
print("ready", flush=True)
time.sleep(600)
"""


def _descendants(pid: int) -> set[int]:
    table = process._proc_table()
    found, grew = {pid}, True
    while grew:
        grew = False
        for p, st in table.items():
            if p not in found and st.ppid in found and st.state != "Z":
                found.add(p)
                grew = True
    return found - {pid}


@needs_proc
def test_stop_trees_kills_the_whole_tree_including_new_sessions(tmp_path):
    popen, ref = process.spawn(
        [sys.executable, "-c", _TREE], env=dict(os.environ), cwd=tmp_path, log_path=tmp_path / "logs" / "tree.log"
    )
    deadline = time.monotonic() + 20
    while "ready" not in (tmp_path / "logs" / "tree.log").read_text() or len(_descendants(ref.pid)) < 4:
        assert time.monotonic() < deadline, "tree did not start"
        time.sleep(0.05)
    members = _descendants(ref.pid) | {ref.pid}
    assert os.getsid(ref.pid) == ref.pid  # its own session
    assert process.is_alive(ref)

    t0 = time.monotonic()
    left = process.stop_trees([(ref, 1.0)], kill_wait_s=5.0)
    assert left == []
    assert time.monotonic() - t0 < 5  # TERM-ignoring child: SIGKILLed after the 1 s grace
    table = process._proc_table()
    assert not [p for p in members if p in table and table[p].state != "Z"]
    assert not process.is_alive(ref)
    assert popen.poll() is not None


@needs_proc
def test_a_reused_pid_is_never_signalled(tmp_path):
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        real = process.start_time_of(proc.pid)
        impostor = process.ProcessRef(proc.pid, real + 1)  # same pid, different start: not ours
        assert not process.is_alive(impostor)
        assert process.stop_trees([(impostor, 0.1)], kill_wait_s=0.5) == []
        assert proc.poll() is None  # untouched
        assert process.is_alive(process.ProcessRef(proc.pid, real))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
