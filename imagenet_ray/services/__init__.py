"""Local services on 127.0.0.1 for `imagenet-ray services` and the integration tests: an S3 server
(SeaweedFS), an MLflow server storing artifacts in it, and a Ray head for `ray job submit`.

    stack = start_stack(root_dir); stack.env(); stack.stop()
Imports flow one way: commands → stack → (s3, mlflow_server, ray_head) → protocol, state → process, ports.
"""

from imagenet_ray.services.commands import down, status, up
from imagenet_ray.services.protocol import Service
from imagenet_ray.services.stack import SERVICES, LocalStack, start_stack
from imagenet_ray.services.state import StackState

__all__ = ["SERVICES", "LocalStack", "Service", "StackState", "down", "start_stack", "status", "up"]
