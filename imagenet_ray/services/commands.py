"""`imagenet-ray services up | down | status`: the stack as a long-lived local service.

State: <state_dir>/state.json and <state_dir>/env.sh (`export` lines; both 0600). Data (S3 volumes,
MLflow db, logs) lives in <state_dir> too, so `down` then `up` keeps buckets and runs.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from imagenet_ray.errors import UserError
from imagenet_ray.services.stack import LocalStack, start_stack
from imagenet_ray.services.state import write_private

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
ENV_FILE = "env.sh"


def env_sh(stack: LocalStack) -> str:
    """Shell lines that point AWS/MLflow/Ray clients at the stack."""
    return export_lines(stack.env(), "imagenet-ray local services")


def export_lines(env: dict[str, str], what: str) -> str:
    """`export` lines for `env`, to be `source`d (they hold credentials: write them 0600)."""
    lines = [
        f"# {what}: `source` this file (it holds credentials; keep it private).",
        # A session token from the user's own AWS login would be sent with our keys and refused.
        "unset AWS_SESSION_TOKEN AWS_SECURITY_TOKEN",
    ]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
    return "\n".join(lines) + "\n"


def _describe(stack: LocalStack) -> list[tuple[str, str]]:
    return [(svc.TITLE, svc.url(stack)) for svc in stack.members()]


def _load_running(state_dir: Path) -> LocalStack | None:
    state = state_dir / STATE_FILE
    if not state.exists():
        return None
    return LocalStack.load(state)


def up(state_dir: Path) -> int:
    state_dir = Path(state_dir)
    old = _load_running(state_dir)
    if old is not None and any(old.alive().values()):
        raise UserError(
            f"services already running (state in {state_dir / STATE_FILE}); "
            f"stop them with `imagenet-ray services down --dir {state_dir}`"
        )
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)  # credentials and data of this stack: owner only
    stack = start_stack(state_dir)
    try:
        stack.save(state_dir / STATE_FILE)
        write_private(state_dir / ENV_FILE, env_sh(stack))
    except BaseException:
        stack.stop()
        raise
    # The addresses and the env.sh line are this command's product (people and scripts read them): stdout,
    # whatever the logging setup. The same holds for the `status` table.
    width = max(len(title) for title, _ in _describe(stack))
    for title, url in _describe(stack):
        print(f"{title:<{width}}  {url}")
    print(f"logs in {stack.logs_dir}")
    print(f"source {state_dir / ENV_FILE}")
    return 0


def down(state_dir: Path) -> int:
    state_dir = Path(state_dir)
    stack = _load_running(state_dir)
    if stack is None:
        log.info("no services running (no %s)", state_dir / STATE_FILE)
        return 0
    stack.stop()
    for name in (STATE_FILE, ENV_FILE):  # the credentials are dead with the servers
        (state_dir / name).unlink(missing_ok=True)
    log.info("stopped %s (data kept in %s)", ", ".join(svc.TITLE for svc in stack.members()), state_dir)
    return 0


def status(state_dir: Path) -> int:
    state_dir = Path(state_dir)
    stack = _load_running(state_dir)
    if stack is None:
        print(f"no services (no {state_dir / STATE_FILE}); start them with `imagenet-ray services up`")
        return 1
    health = stack.health()
    width = max(len(title) for title, _ in _describe(stack))
    for svc in stack.members():
        print(f"{svc.TITLE:<{width}}  {svc.url(stack)}  {'up' if health[svc.NAME] else 'down'}")
    return 0 if all(health.values()) else 1
