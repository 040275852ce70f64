"""Capacity planning (`imagenet-ray plan`): CPU decode cores and decode-group pods that keep data wait under 5 %.

model: the pure arithmetic and the sourced GPU table; rates: measured inputs; manifest: the RayCluster's decode
group and the overlay that sizes it; command: the CLI. The method and its sources: docs/cluster.md.
"""

from imagenet_ray.capacity.model import (
    GPU_TABLE,
    Plan,
    PlanInputs,
    Sourced,
    decode_capacity,
    plan_capacity,
    predict_data_wait,
    scale_to_size,
)
from imagenet_ray.capacity.rates import KernelSample, measure_kernel

__all__ = [
    "GPU_TABLE",
    "KernelSample",
    "Plan",
    "PlanInputs",
    "Sourced",
    "decode_capacity",
    "measure_kernel",
    "plan_capacity",
    "predict_data_wait",
    "scale_to_size",
]
