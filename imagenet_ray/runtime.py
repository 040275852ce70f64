"""Where the program runs: absolute URLs for Ray jobs, connecting to (or starting) Ray, GPUs in the cluster."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from imagenet_ray.errors import UserError
from imagenet_ray.redact import RedactingFilter


def absolute_url(url: str) -> str:
    """Local paths become absolute (a Ray job's cwd is a temporary copy of the working dir)."""
    return url if "://" in url else os.path.abspath(url)


def ensure_ray(min_cpus: float, job: str = "jobs/train.py") -> None:
    """Connect to the cluster this runs in (a Ray job or RAY_ADDRESS), else start a local Ray.

    `job`: the jobs/ script that runs this command as a Ray job (named in the hint for a job-API address)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "")
    if address.startswith(("http://", "https://")):
        raise UserError(
            f"RAY_ADDRESS={address} is a job-API URL: submit with `ray job submit --address {address} "
            f"--working-dir . -- python {job} ...`, or unset RAY_ADDRESS to run on a local Ray"
        )
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Training workers reserve their CPUs; Ray Data needs at least one more for decoding.
        start_local_ray(num_cpus=max(os.cpu_count() or 1, math.ceil(min_cpus) + 1), log_to_driver=True)


LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # Ray's switch for a loopback-only node


def start_local_ray(**init_kwargs: Any) -> None:
    """Start a Ray instance private to this process tree, every listener on loopback.

    `_node_ip_address="127.0.0.1"` alone is not enough: `ray.init` swaps a loopback address for the machine's
    (services.resolve_ip_for_localhost), and with it gcs_server, raylet, the agents, the driver and every
    worker listen on all interfaces. With Ray's cluster mode off (the switch macOS and Windows use), the
    node's address is 127.0.0.1 and every gRPC server binds it; the spawned processes inherit the switch.
    The switch is read at import and at call time, so both are set. (docs/reliability.md, "Listeners")"""
    import ray
    import ray._private.ray_constants as ray_constants

    before_flag = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    # Both restored after: a later connection to a real cluster (after ray.shutdown) must advertise a
    # reachable address.
    try:
        with temporary_env(LOOPBACK_ENV):
            ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", **init_kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before_flag


@contextlib.contextmanager
def temporary_env(values: Mapping[str, str]) -> Iterator[None]:
    """`values` in os.environ inside the block (child processes inherit them); each variable is as it was
    (or absent) after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def cluster_has_gpu() -> bool:
    """Whether the connected Ray cluster has at least one GPU."""
    import ray

    return bool(ray.cluster_resources().get("GPU", 0) >= 1)


_WORKER_HANDLER = "imagenet_ray.worker"


def configure_worker_logging() -> None:
    """On a Ray worker, send the package's INFO messages (the epoch line) to stdout as plain text,
    whatever Ray did to the root logger; idempotent."""
    package = logging.getLogger("imagenet_ray")
    if any(h.get_name() == _WORKER_HANDLER for h in package.handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(RedactingFilter())
    handler.set_name(_WORKER_HANDLER)
    handler.setFormatter(logging.Formatter("%(message)s"))
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    package.propagate = False  # printed once, here, even where Ray gave the root logger a handler
    quiet_train_report_dumps()


def quiet_train_report_dumps() -> None:
    """Ray Train V2 logs every `report` (a ~700-character dump, per worker per epoch) through a logger
    named by its file path: a child of the root logger, outside `ray.train`, so RunConfig's
    LoggingConfig does not reach it. Raise that one logger to WARNING in this process."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
