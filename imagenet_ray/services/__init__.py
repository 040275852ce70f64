"""Local services for `imagenet-ray services`, the tests and the local cluster: an S3 server (SeaweedFS),
an MLflow server storing artifacts in it (sqlite, or PostgreSQL with basic auth), a Ray head.

    stack = start_stack(root_dir); stack.env(); stack.stop()
Imports flow one way: commands → stack → services (mlflow_server → postgres) → protocol, state → process.
"""

from imagenet_ray.services.commands import down, status, up
from imagenet_ray.services.protocol import Service
from imagenet_ray.services.stack import SERVICES, LocalStack, StackOptions, start_stack
from imagenet_ray.services.state import StackState

__all__ = ["SERVICES", "LocalStack", "Service", "StackOptions", "StackState", "down", "start_stack", "status", "up"]
