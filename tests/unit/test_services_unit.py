"""The pure parts of imagenet_ray.services: ports, state round trip, env, command lines, config files, the
service protocol and one-way imports, the start order, stopping trees.

No servers are started; the process tests use `sleep` and small Python children only.
"""

from __future__ import annotations

import ast
import configparser
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from imagenet_ray.errors import UserError
from imagenet_ray.services import (
    LocalStack,
    Service,
    StackOptions,
    StackState,
    mlflow_server,
    postgres,
    process,
    ray_head,
    s3,
)
from imagenet_ray.services.commands import env_sh
from imagenet_ray.services.ports import free_ports, quiet_range
from imagenet_ray.services.stack import (
    SERVICES,
    _check_options,
    _failure,
    _new_stack,
    _pick_ports,
    _PortConflict,
    _select,
    _start_once,
)

DEFAULT = StackOptions()
_PG_AUTH = {"mlflow_backend": "postgres", "mlflow_auth": True}
POSTGRES_AUTH = StackOptions(mlflow_backend="postgres", mlflow_auth=True)


def _stack(tmp_path: Path, options: StackOptions = DEFAULT) -> LocalStack:
    names = _select(None, options.mlflow_backend)
    return _new_stack(tmp_path, 6, ("imagenet", "mlflow", "checkpoints"), names, options)


@pytest.fixture
def pg_bin(monkeypatch):
    """PostgreSQL's command lines without PostgreSQL installed."""
    monkeypatch.setattr(postgres, "bin_dir", lambda: Path("/opt/pg/bin"))


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
    assert [svc.NAME for svc in SERVICES] == ["s3", "postgres", "mlflow", "ray"]
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
        "postgres": {"ports", "process", "state"},
        "mlflow_server": {"ports", "postgres", "state"},
        "ray_head": {"ports", "state"},
        "stack": {"s3", "postgres", "mlflow_server", "ray_head", "process", "ports", "protocol", "state"},
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
    assert _stack(tmp_path, POSTGRES_AUTH).alive() == {"s3": False, "postgres": False, "mlflow": False, "ray": False}


def _secrets(st: StackState) -> list[str]:
    return [st.secret_key, st.ray_auth_token, st.mlflow_password, st.postgres_password]


def test_secrets_stay_out_of_repr_and_command_lines(tmp_path, pg_bin):
    st = _stack(tmp_path, POSTGRES_AUTH)
    assert all(len(secret) >= 40 for secret in _secrets(st))
    shown = repr(st) + str(st)
    assert not [secret for secret in _secrets(st) if secret in shown]
    for svc in SERVICES:
        cmd = " ".join(svc.command(st))
        assert not [secret for secret in _secrets(st) if secret in cmd], svc.NAME


def test_state_round_trip_and_file_mode(tmp_path):
    st = _stack(
        tmp_path,
        StackOptions(
            bind_host="10.7.0.1", bind_ports={"mlflow": 5000}, netns="irc-services", mlflow_backend="postgres"
        ),
    )
    st.mlflow_auth = True
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


# -- bind addresses, namespaces, PostgreSQL and MLflow's auth -------------------------------------------


def test_version_1_state_reads_as_the_default_stack(tmp_path):
    old = _stack(tmp_path).to_dict()
    for key in ("service_names", "bind_host", "bind_ports", "netns", "mlflow_backend", "mlflow_auth"):
        del old[key]
    for key in ("mlflow_username", "mlflow_password", "postgres_password"):
        del old[key]
    old["version"] = 1
    old["processes"] = {"s3": {"pid": 1, "start_time": 2}, "mlflow": {"pid": 3, "start_time": 4}}
    st = LocalStack.from_dict(old)
    assert (st.bind_host, st.bind_ports, st.netns, st.mlflow_backend, st.mlflow_auth) == (
        "127.0.0.1",
        {},
        None,
        "sqlite",
        False,
    )
    assert [svc.NAME for svc in st.members()] == ["s3", "mlflow"]  # what a version-1 `services up` started


def test_passwords_kept_in_the_data_are_reused_by_the_next_start(tmp_path):
    a, b = _stack(tmp_path, POSTGRES_AUTH), _stack(tmp_path, POSTGRES_AUTH)
    kept = ("mlflow_username", "mlflow_password", "postgres_password")
    assert [getattr(a, k) for k in kept] == [getattr(b, k) for k in kept]  # PostgreSQL and MLflow keep them
    assert a.secret_key != b.secret_key and a.ray_auth_token != b.ray_auth_token  # per start, as before
    other = _stack(tmp_path / "other", POSTGRES_AUTH)
    assert other.postgres_password != a.postgres_password and other.mlflow_password != a.mlflow_password
    path = tmp_path / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("{broken")
    with pytest.raises(UserError, match=r"credentials\.json: unreadable"):
        _stack(tmp_path, POSTGRES_AUTH)


def test_clients_use_loopback_ports_and_servers_the_bind_address(tmp_path):
    opts = StackOptions(ports={"mlflow": 41000}, bind_host="10.7.0.1", bind_ports={"mlflow": 5000, "s3": 8333})
    st = _stack(tmp_path, opts)
    assert st.ports["mlflow"] == 41000 and st.mlflow_uri == "http://127.0.0.1:41000"
    assert st.bind_port("mlflow") == 5000 and st.bind_port("s3") == 8333
    assert st.bind_port("filer") == st.ports["filer"]  # not given: the same number, in the namespace
    assert st.peer_host == "10.7.0.1"
    assert _stack(tmp_path, StackOptions(bind_host="0.0.0.0")).peer_host == "127.0.0.1"  # never advertise a wildcard

    weed = s3.command(st)
    assert "-ip=10.7.0.1" in weed and "-ip.bind=10.7.0.1" in weed and "-s3.port=8333" in weed
    assert f"-filer.port={st.ports['filer']}" in weed
    ray = ray_head.command(st)
    assert "--node-ip-address=10.7.0.1" in ray and "--dashboard-host=10.7.0.1" in ray
    ml = mlflow_server.command(st)
    assert ml[ml.index("--host") + 1] == "10.7.0.1" and ml[ml.index("--port") + 1] == "5000"
    assert "--app-name" not in ml  # no auth asked for

    # The servers (MLflow writing artifacts, Ray jobs) reach S3 and MLflow inside their namespace.
    inner = st.server_env()
    assert inner["MLFLOW_S3_ENDPOINT_URL"] == inner["AWS_ENDPOINT_URL"] == "http://10.7.0.1:8333"
    assert inner["MLFLOW_TRACKING_URI"] == "http://10.7.0.1:5000"
    assert st.service_env()["AWS_ENDPOINT_URL_S3"] == "http://10.7.0.1:8333"
    assert ray_head.environ(st, {"PATH": "/usr/bin"})["MLFLOW_TRACKING_URI"] == "http://10.7.0.1:5000"
    assert st.env()["AWS_ENDPOINT_URL"] == st.s3_endpoint == f"http://127.0.0.1:{st.ports['s3']}"
    default = _stack(tmp_path)
    assert default.server_env() == default.env()  # on loopback, servers and clients see the same stack


def test_given_client_ports_are_kept_and_never_picked_twice():
    given = {"s3": 30001, "mlflow": 30002}
    ports = _pick_ports(given)
    assert ports["s3"] == 30001 and ports["mlflow"] == 30002
    assert sorted(ports) == sorted(name for svc in SERVICES for name in svc.PORTS)
    assert len(set(ports.values())) == len(ports)


def test_options_are_checked_before_anything_starts():
    with pytest.raises(UserError, match="unknown port name"):
        _check_options(StackOptions(bind_ports={"mlfow": 5000}))
    with pytest.raises(UserError, match="out of range"):
        _check_options(StackOptions(ports={"s3": 70000}))
    with pytest.raises(UserError, match="IPv4"):
        _check_options(StackOptions(bind_host="services-host"))
    _check_options(StackOptions(bind_host="10.7.0.1", bind_ports={"postgres": 5432}))


def test_postgres_joins_the_stack_only_under_an_mlflow_on_postgres():
    assert _select(None, "sqlite") == ("s3", "mlflow", "ray")
    assert _select(None, "postgres") == ("s3", "postgres", "mlflow", "ray")
    assert _select(("mlflow",), "postgres") == ("postgres", "mlflow")  # its database comes with it
    assert _select(("s3", "postgres", "mlflow"), "postgres") == ("s3", "postgres", "mlflow")
    with pytest.raises(UserError, match="mlflow_backend='postgres'"):
        _select(("postgres",), "sqlite")
    with pytest.raises(UserError, match="unknown mlflow_backend"):
        _select(None, "mysql")
    with pytest.raises(UserError, match="unknown service"):
        _select(("s3", "redis"), "sqlite")


def test_env_has_mlflow_credentials_only_with_auth(tmp_path):
    assert "MLFLOW_TRACKING_USERNAME" not in _stack(tmp_path).env()
    st = _stack(tmp_path, POSTGRES_AUTH)
    env = st.env()
    assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == (
        st.mlflow_username,
        st.mlflow_password,
    )
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{st.ports['mlflow']}"
    assert st.postgres_password not in env.values()  # only MLflow's server needs the database


def test_server_commands_run_inside_the_namespace(tmp_path):
    assert process.in_netns(["weed", "server"], None) == ["weed", "server"]
    assert process.in_netns(["weed", "server"], "irc-services") == [
        "ip",
        "netns",
        "exec",
        "irc-services",
        "weed",
        "server",
    ]


def test_mlflow_on_postgres_with_auth_gets_passwords_through_private_files(tmp_path, monkeypatch):
    st = _stack(tmp_path, StackOptions(bind_host="10.7.0.1", bind_ports={"mlflow": 5000}, **_PG_AUTH))
    mlflow_server.prepare(st)
    cmd = mlflow_server.command(st)
    uri = cmd[cmd.index("--backend-store-uri") + 1]
    assert uri == f"postgresql://mlflow@10.7.0.1:{st.bind_port('postgres')}/mlflow"  # no password in argv
    assert cmd[cmd.index("--app-name") + 1] == "basic-auth"
    hosts = cmd[cmd.index("--allowed-hosts") + 1].split(",")
    client = st.ports["mlflow"]
    for host in ("127.0.0.1", "localhost", "10.7.0.1", "mlflow"):
        assert {host, f"{host}:{client}", f"{host}:5000"} <= set(hosts), host

    for path in (mlflow_server.pgpass_path(st), mlflow_server.auth_config_path(st)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert mlflow_server.pgpass_path(st).read_text() == f"*:*:*:mlflow:{st.postgres_password}\n"

    base = {"PATH": "/usr/bin", "MLFLOW_AUTH_ADMIN_PASSWORD": "users-own", "PGPASSWORD": "x", **st.env()}
    env = mlflow_server.environ(st, base)
    assert env["PGPASSFILE"] == str(mlflow_server.pgpass_path(st))
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(mlflow_server.auth_config_path(st))
    assert len(env["MLFLOW_FLASK_SERVER_SECRET_KEY"]) >= 32
    for scrubbed in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "PGPASSWORD"):
        assert scrubbed not in env, scrubbed

    # Read as MLflow's auth config reader does (configparser with interpolation, section [mlflow]).
    config = configparser.ConfigParser()
    config.read(env["MLFLOW_AUTH_CONFIG_PATH"])
    ini = config["mlflow"]
    assert (ini["admin_username"], ini["admin_password"]) == (st.mlflow_username, st.mlflow_password)
    assert ini["database_uri"] == f"postgresql://mlflow@10.7.0.1:{st.bind_port('postgres')}/mlflow_auth"
    assert ini["default_permission"] == "READ"


def test_mlflow_auth_on_sqlite_keeps_its_users_beside_the_runs(tmp_path):
    st = _stack(tmp_path, StackOptions(mlflow_auth=True))
    assert mlflow_server.backend_store_uri(st) == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert mlflow_server.auth_database_uri(st) == f"sqlite:///{tmp_path / 'mlflow' / 'basic_auth.db'}"
    assert "PGPASSFILE" not in mlflow_server.environ(st, {"PATH": "/usr/bin"})
    st.mlflow_password = "50%-off-password"  # configparser interpolates %: written doubled
    mlflow_server.prepare(st)
    config = configparser.ConfigParser()
    config.read(mlflow_server.auth_config_path(st))
    assert config["mlflow"]["admin_password"] == "50%-off-password"


def test_the_default_mlflow_is_unchanged(tmp_path):
    st = _stack(tmp_path)
    mlflow_server.prepare(st)
    cmd = mlflow_server.command(st)
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert "--app-name" not in cmd and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert not mlflow_server.pgpass_path(st).exists() and not mlflow_server.auth_config_path(st).exists()
    env = mlflow_server.environ(st, {"PATH": "/usr/bin", **st.env()})
    assert not {"PGPASSFILE", "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_TRACKING_URI"} & set(env)


def test_postgres_command_line_and_environment(tmp_path, pg_bin, monkeypatch):
    st = _stack(tmp_path, StackOptions(bind_host="10.7.0.1", bind_ports={"postgres": 5432}, **_PG_AUTH))
    monkeypatch.setattr(postgres, "server_user", lambda: None)  # not root: runs as us
    cmd = postgres.command(st)
    assert cmd[:3] == ["/opt/pg/bin/postgres", "-D", str(tmp_path / "postgres" / "data")]
    assert cmd[cmd.index("-p") + 1] == "5432" and cmd[cmd.index("-k") + 1] == str(tmp_path / "postgres" / "run")
    settings = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-c"]
    assert {"listen_addresses=10.7.0.1", "shared_buffers=32MB", "max_connections=50"} <= set(settings)
    env = postgres.environ(st, {"PATH": "/usr/bin", **st.env(), "PGPASSWORD": "x"})
    assert env == {"PATH": "/usr/bin", "LC_ALL": "C", "LANG": "C"}  # nothing of the stack's secrets
    assert postgres.url(st) == f"postgresql://mlflow@127.0.0.1:{st.ports['postgres']}/mlflow"
    assert postgres.STOP_SIGNAL == signal.SIGINT  # fast shutdown, to the postmaster alone


def test_postgres_runs_as_an_unprivileged_user_under_root(tmp_path, pg_bin, monkeypatch):
    import pwd

    user = pwd.getpwnam("nobody")
    monkeypatch.setattr(postgres, "server_user", lambda: user)
    cmd = postgres.command(_stack(tmp_path, POSTGRES_AUTH))
    setpriv = cmd[: cmd.index("--") + 1]
    assert Path(setpriv[0]).name == "setpriv"  # execs: the pid and signals stay the server's
    assert setpriv[1:] == [f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--"]
    assert cmd[len(setpriv)] == "/opt/pg/bin/postgres"


def test_a_missing_postgresql_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(postgres, "LIB_DIR", tmp_path / "none")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match=r"`initdb` not found.*apt-get install postgresql"):
        postgres.bin_dir()


def test_the_newest_postgresql_version_is_used(tmp_path, monkeypatch):
    for version in ("9.6", "13", "15"):
        for name in ("initdb", "postgres"):
            (tmp_path / version / "bin").mkdir(parents=True, exist_ok=True)
            (tmp_path / version / "bin" / name).touch()
    (tmp_path / "16" / "bin").mkdir(parents=True)  # a client-only install: no server binaries
    monkeypatch.setattr(postgres, "LIB_DIR", tmp_path)
    assert postgres.bin_dir() == tmp_path / "15" / "bin"


def test_pgpass_escapes_its_separators(tmp_path):
    st = _stack(tmp_path)
    st.postgres_password = r"a:b\c"
    assert postgres.pgpass_line(st) == "*:*:*:mlflow:a\\:b\\\\c\n"
    assert (
        postgres.sqlalchemy_uri(st, "mlflow_auth")
        == f"postgresql://mlflow@127.0.0.1:{st.ports['postgres']}/mlflow_auth"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs PostgreSQL as another user")
def test_root_dir_opens_to_the_server_users_group_only():
    import pwd
    import shutil
    import tempfile

    user = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="irray-unit-"))  # under /tmp, which anyone may search
    try:
        root = base / "stack"
        root.mkdir(mode=0o750)
        base.chmod(0o755)
        postgres._open_path_for(_stack(root), user)
        assert stat.S_IMODE(root.stat().st_mode) == 0o710  # search for its group, no listing, nobody else
        assert root.stat().st_gid == user.pw_gid

        base.chmod(0o700)  # like pytest's base temp dir: not ours to open
        with pytest.raises(UserError, match=rf"cannot reach {root}: {base} is not searchable for it"):
            postgres._open_path_for(_stack(root), user)
    finally:
        shutil.rmtree(base)


# -- start order ----------------------------------------------------------------------------------------


class _FakeService:
    """A `sleep` server whose health the test controls; records what it saw when it was launched."""

    PORTS: tuple[str, ...] = ()
    STARTUP_TIMEOUT_S = 20.0
    STOP_GRACE_S = 1.0
    STOP_SIGNAL = None

    def __init__(self, name: str, after: tuple[str, ...] = (), cmd: tuple[str, ...] = ("sleep", "60")):
        self.NAME = self.TITLE = name
        self.START_AFTER = after
        self.cmd = list(cmd)
        self.ready = False
        self.launched_when: dict[str, bool] | None = None
        self.others: list[_FakeService] = []

    def prepare(self, stack):
        pass

    def command(self, stack):
        return self.cmd

    def environ(self, stack, base):
        self.launched_when = {o.NAME: o.ready for o in self.others}
        return dict(os.environ)

    def cwd(self, stack):
        return stack.root_dir

    def healthy(self, stack):
        return self.ready

    def after_start(self, stack):
        pass

    def diagnostics(self, stack):
        return ""

    def url(self, stack):
        return ""

    def cleanup(self, stack):
        pass


def _stop_all(st: LocalStack) -> None:
    assert process.stop_trees([(ref, 1.0) for ref in st.processes.values()], kill_wait_s=5.0) == []


def test_a_service_starts_only_once_those_it_starts_after_are_healthy(tmp_path):
    db, app = _FakeService("db"), _FakeService("app", after=("db",))
    db.others = app.others = [db, app]
    st = _stack(tmp_path)
    timer = threading.Timer(1.0, lambda: setattr(db, "ready", True))
    app_ready = threading.Timer(1.5, lambda: setattr(app, "ready", True))
    timer.start()
    app_ready.start()
    try:
        _start_once(st, (db, app))
        assert app.launched_when == {"db": True, "app": False}  # launched after db was healthy
        assert db.launched_when == {"db": False, "app": False}
        assert set(st.processes) == {"db", "app"}
    finally:
        timer.cancel()
        app_ready.cancel()
        _stop_all(st)


def test_a_failed_dependency_means_its_dependent_never_starts(tmp_path):
    db, app = _FakeService("db", cmd=("sh", "-c", "exit 3")), _FakeService("app", after=("db",))
    st = _stack(tmp_path)
    try:
        with pytest.raises(UserError, match="db exited with code 3 while starting"):
            _start_once(st, (db, app))
        assert app.launched_when is None and "app" not in st.processes
    finally:
        _stop_all(st)


# A leader that stops its own child on SIGINT (like PostgreSQL's fast shutdown) and ignores SIGTERM; the
# child notes any SIGTERM it gets (it must get none: only the leader is signalled).
_SELF_STOPPING = r"""
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", (
    "import signal, sys, time\n"
    "def note(*_): open(sys.argv[1], 'w').write('TERM')\n"
    "signal.signal(signal.SIGTERM, note)\n"
    "time.sleep(300)\n"), sys.argv[1]])
def stop(*_):
    child.kill(); child.wait(); sys.exit(0)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(600)
"""


@needs_proc
def test_a_leader_signal_goes_to_the_leader_alone(tmp_path):
    noted = tmp_path / "child-got-sigterm"
    log = tmp_path / "logs" / "leader.log"
    popen, ref = process.spawn(
        [sys.executable, "-c", _SELF_STOPPING, str(noted)], env=dict(os.environ), cwd=tmp_path, log_path=log
    )
    deadline = time.monotonic() + 20
    while "ready" not in log.read_text() or not _descendants(ref.pid):
        assert time.monotonic() < deadline, "leader did not start"
        time.sleep(0.05)
    t0 = time.monotonic()
    assert process.stop_trees([(ref, 10.0)], kill_wait_s=5.0, leader_signals={ref: signal.SIGINT}) == []
    assert time.monotonic() - t0 < 5  # stopped by its own SIGINT handling, long before the SIGKILL
    assert popen.wait(5) == 0 and not noted.exists()
