"""Local services on 127.0.0.1: an S3 server (SeaweedFS), an MLflow tracking server storing artifacts
in that S3, and a Ray head for `ray job submit`. Used by `imagenet-ray services up|down|status` and
by the integration tests' session fixture.

    stack = start_stack(root_dir)       # fresh free ports, random credentials, data under root_dir
    stack.env()                         # AWS_*, MLFLOW_*, RAY_ADDRESS, RAY_AUTH_* for clients
    stack.stop()

Modules: ports (free ports), process (own-session children, stopping whole trees), s3,
mlflow_server, ray_head (one service each: command line, environment, health check), stack
(LocalStack, start_stack), commands (up/down/status).
"""

from imagenet_ray.services.commands import down, status, up
from imagenet_ray.services.stack import LocalStack, start_stack

__all__ = ["LocalStack", "start_stack", "up", "down", "status"]
