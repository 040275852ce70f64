"""PostgreSQL (the distribution's `postgres`) as MLflow's database: data in root_dir/postgres/data.

Superuser `mlflow` with the stack's password (scram-sha-256 for every connection); databases `mlflow`
(tracking) and `mlflow_auth` (basic-auth users), as in infra/k8s/base/mlflow.yaml. PostgreSQL refuses to
run as root, so as root it runs as the `postgres` (else `nobody`) user. Why: docs/architecture.md.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
from pathlib import Path
from typing import Any

from imagenet_ray.errors import UserError
from imagenet_ray.services import process
from imagenet_ray.services.ports import LOCALHOST
from imagenet_ray.services.state import StackState, write_private

NAME = "postgres"
TITLE = "PostgreSQL"
PORTS: tuple[str, ...] = ("postgres",)
STARTUP_TIMEOUT_S = 60.0
# SIGINT to the postmaster alone is PostgreSQL's "fast" shutdown (end sessions, checkpoint, exit: about
# a second). SIGTERM would be "smart" (wait for clients), and signalling its children itself confuses it.
STOP_SIGNAL: int | None = signal.SIGINT
STOP_GRACE_S = 15.0
START_AFTER: tuple[str, ...] = ()
SUPERUSER = "mlflow"
TRACKING_DATABASE = "mlflow"
AUTH_DATABASE = "mlflow_auth"  # the basic-auth app's users and permissions
DATABASES = (TRACKING_DATABASE, AUTH_DATABASE)
INITDB_TIMEOUT_S = 120.0
LIB_DIR = Path("/usr/lib/postgresql")  # the distribution's versions, one bin/ each
_INSTALL_HINT = "install it: apt-get install postgresql"
# Sized for a small CI machine; synchronous_commit=off: a commit returns before its WAL is flushed (an OS
# crash may lose the last moments, never corrupts; fsync stays on since `services up` keeps its data).
_SETTINGS = {"shared_buffers": "32MB", "max_connections": "50", "synchronous_commit": "off"}
_HBA = """# imagenet-ray: every connection needs the stack's password, over the socket and TCP alike.
local all all scram-sha-256
host all all 0.0.0.0/0 scram-sha-256
host all all ::/0 scram-sha-256
"""


def bin_dir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin with initdb and postgres, else the one on PATH."""
    versions = [p for p in LIB_DIR.glob("*/bin") if re.fullmatch(r"\d+(\.\d+)?", p.parent.name)]
    for candidate in sorted(versions, key=lambda p: float(p.parent.name), reverse=True):
        if (candidate / "initdb").is_file() and (candidate / "postgres").is_file():
            return candidate
    found = shutil.which("initdb")
    if found and Path(found).with_name("postgres").exists():
        return Path(found).resolve().parent
    raise UserError(f"PostgreSQL `initdb` not found in /usr/lib/postgresql/*/bin or on PATH ({_INSTALL_HINT})")


def server_user() -> pwd.struct_passwd | None:
    """Who runs PostgreSQL when we are root (it refuses root): `postgres`, else `nobody`; None: us."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise UserError("running as root, but there is neither a `postgres` nor a `nobody` user to run PostgreSQL as")


def _as_server_user(cmd: list[str]) -> list[str]:
    """`cmd` run as server_user(): setpriv execs it (pid and signals stay the server's), and it composes
    under `ip netns exec`, which must run first, as root."""
    user = server_user()
    if user is None:
        return cmd
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise UserError(f"`setpriv` (util-linux) not found: needed to run PostgreSQL as {user.pw_name!r}, not root")
    return [setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--", *cmd]


def home(stack: StackState) -> Path:
    return stack.root_dir / "postgres"


def data_dir(stack: StackState) -> Path:
    return home(stack) / "data"


def socket_dir(stack: StackState) -> Path:
    return home(stack) / "run"


def _searchable_by(path: Path, user: pwd.struct_passwd) -> bool:
    st = path.stat()
    if st.st_uid == user.pw_uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in os.getgrouplist(user.pw_name, user.pw_gid):
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _open_path_for(stack: StackState, user: pwd.struct_passwd) -> None:
    """Let `user` reach root_dir/postgres: root_dir (0700 from `services up`) opens for search to the
    user's group only; a directory above it that bars the user is the caller's to choose differently."""
    for parent in reversed(stack.root_dir.parents):
        if not _searchable_by(parent, user):
            raise UserError(
                f"PostgreSQL runs as user {user.pw_name!r} (it refuses root), which cannot reach {stack.root_dir}: "
                f"{parent} is not searchable for it; put the stack in a directory it can reach (tempfile.mkdtemp())"
            )
    if not _searchable_by(stack.root_dir, user):
        os.chown(stack.root_dir, -1, user.pw_gid)  # its group now: search only, whatever the old group had
        os.chmod(stack.root_dir, (stat.S_IMODE(stack.root_dir.stat().st_mode) & ~stat.S_IRWXG) | stat.S_IXGRP)


def _own(path: Path, user: pwd.struct_passwd | None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    if user is not None:
        os.chown(path, user.pw_uid, user.pw_gid)


def _server_env(base: dict[str, str]) -> dict[str, str]:
    # Nothing of the stack's (keys, tokens, passwords) for a server running as another user.
    return {"PATH": base.get("PATH", os.defpath), "LC_ALL": "C", "LANG": "C"}


def _initdb(stack: StackState, user: pwd.struct_passwd | None) -> None:
    """Create the cluster: superuser `mlflow`, its password from a 0600 file removed right after."""
    pwfile = home(stack) / ".initdb-password"
    write_private(pwfile, stack.postgres_password + "\n")
    try:
        if user is not None:
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        cmd = [
            str(bin_dir() / "initdb"),
            f"--pgdata={data_dir(stack)}",
            f"--username={SUPERUSER}",
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--encoding=UTF8",
            "--locale=C",
        ]
        code = process.run_logged(
            _as_server_user(cmd),
            env=_server_env(dict(os.environ)),
            cwd=home(stack),
            log_path=stack.log_path(NAME),
            timeout_s=INITDB_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise UserError(f"initdb took over {INITDB_TIMEOUT_S:.0f} s; see {stack.log_path(NAME)}") from None
    finally:
        pwfile.unlink(missing_ok=True)
    if code != 0:
        raise UserError(f"initdb failed with code {code}; see {stack.log_path(NAME)}")


def prepare(stack: StackState) -> None:
    """Find the binaries, give the server user its directories, initdb on first start, write pg_hba."""
    bin_dir()
    user = server_user()
    if user is not None:
        _open_path_for(stack, user)
    for path in (home(stack), socket_dir(stack)):
        _own(path, user)
    if not (data_dir(stack) / "PG_VERSION").exists():
        _initdb(stack, user)
    hba = data_dir(stack) / "pg_hba.conf"
    write_private(hba, _HBA)
    if user is not None:
        os.chown(hba, user.pw_uid, user.pw_gid)


def command(stack: StackState) -> list[str]:
    settings = {**_SETTINGS, "listen_addresses": stack.bind_host or "*", "unix_socket_permissions": "0700"}
    return _as_server_user(
        [
            str(bin_dir() / "postgres"),
            "-D",
            str(data_dir(stack)),
            "-p",
            str(stack.bind_port("postgres")),
            "-k",
            str(socket_dir(stack)),
            *(arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")),
        ]
    )


def environ(stack: StackState, base: dict[str, str]) -> dict[str, str]:
    return _server_env(base)


def cwd(stack: StackState) -> Path:
    return home(stack)


def connect(stack: StackState, dbname: str = "postgres", *, timeout_s: int = 3) -> Any:  # a psycopg.Connection
    """A connection as the superuser through the client port (127.0.0.1:ports["postgres"])."""
    import psycopg

    return psycopg.connect(
        host=LOCALHOST,
        port=stack.ports["postgres"],
        user=SUPERUSER,
        password=stack.postgres_password,
        dbname=dbname,
        connect_timeout=timeout_s,
        autocommit=True,  # CREATE DATABASE cannot run inside a transaction
    )


def healthy(stack: StackState) -> bool:
    """A real login with the password succeeds."""
    try:
        with connect(stack) as conn:
            conn.execute("SELECT 1")
        return True
    except Exception:
        return False


def after_start(stack: StackState) -> None:
    """Create MLflow's databases (keeping existing ones: `services up` reuses its data)."""
    with connect(stack, timeout_s=10) as conn:
        existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        for name in DATABASES:
            if name not in existing:
                conn.execute(f'CREATE DATABASE "{name}"')


def sqlalchemy_uri(stack: StackState, database: str) -> str:
    """For a server of the stack (MLflow), at the address it reaches PostgreSQL on; no password (libpq
    reads it from PGPASSFILE, see `pgpass_line`)."""
    return f"postgresql://{SUPERUSER}@{stack.peer_host}:{stack.bind_port('postgres')}/{database}"


def pgpass_line(stack: StackState) -> str:
    """A libpq password file's line for the superuser (any host, port and database of this stack)."""
    escaped = stack.postgres_password.replace("\\", "\\\\").replace(":", "\\:")
    return f"*:*:*:{SUPERUSER}:{escaped}\n"


def diagnostics(stack: StackState) -> str:
    return ""  # PostgreSQL logs to stderr, i.e. into its own log


def url(stack: StackState) -> str:
    return f"postgresql://{SUPERUSER}@{LOCALHOST}:{stack.ports['postgres']}/{TRACKING_DATABASE}"


def cleanup(stack: StackState) -> None:
    pass  # its socket and lock files live under root_dir/postgres/run
