"""The capacity model as pure arithmetic: GPU rates (a sourced table, scaled with resolution), the data-wait
prediction, and the plan (decode cores, decode pods, bandwidth) from rates that each say where they came from.
The reasoning behind every factor is in docs/cluster.md ("Sizing the cluster").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from imagenet_ray.errors import ConfigError

REFERENCE_SIZE = 224  # every table rate is at this train crop
DEFAULT_MAX_WAIT = 0.05
# Measured end to end / kernel per core: 1,105 img/s from 2 cores vs 2 × ~907 (docs/benchmarks.md, run 4).
DEFAULT_EFFICIENCY = 0.6
# Kernel rates move ±7 % between processes and 25-30 % between sessions on one machine (docs/benchmarks.md).
DEFAULT_HEADROOM = 1.2
DEFAULT_BANDWIDTH_GBPS = 25.0  # an ENA-class node NIC (e.g. EC2 c6i/c7i.16xlarge: 25 Gb/s)
LABEL_BYTES = 8  # int64 label next to each decoded image


@dataclass(frozen=True)
class Sourced:
    """A rate or size and where it came from (measured / table / argument / manifest), shown next to it."""

    value: float
    source: str


@dataclass(frozen=True)
class GpuRate:
    """Training images/s of one GPU for one model at `size` px, mixed precision, channels_last."""

    gpu: str
    model: str
    images_per_s: float
    size: int
    source: str  # where the figure it rests on is published
    measured: str  # what was measured there
    note: str  # how the number here follows from it, and how sure it is


_DLE = "https://github.com/NVIDIA/DeepLearningExamples/tree/master/PyTorch/Classification/ConvNets/resnet50v1.5"
_LAMBDA = "https://github.com/lambdal/deeplearning-benchmark (pytorch/pytorch-train-throughput-fp16.csv)"
_FFCV = "https://github.com/libffcv/ffcv-imagenet#configurations"
_H100_OVER_A100 = 2791 / 1582  # Lambda's harness, same software on both: 1.76

GPU_TABLE: tuple[GpuRate, ...] = (
    GpuRate(
        "a100",
        "resnet50",
        2470,
        REFERENCE_SIZE,
        _DLE + "#training-performance-nvidia-dgx-a100-8x-a100-80gb",
        "ResNet-50 v1.5, PyTorch (NGC pytorch-21.03), DGX A100 80GB, mixed precision, benchmark_training: "
        "2,470 img/s on 1 GPU, 16,621 on 8 (2,078 per GPU)",
        "the 1-GPU figure, the faster one (sizing for a faster GPU errs towards more decode). FFCV's rn50 "
        "(BlurPool, evaluation included) ran 3,042 img/s per A100 at ~167 px, i.e. 1,684 at 224 by pixels",
    ),
    GpuRate(
        "h100",
        "resnet50",
        round(2470 * _H100_OVER_A100, -1),
        REFERENCE_SIZE,
        _LAMBDA,
        "NGC PyTorch 22.10, NVIDIA's ResNet-50 v1.5, fp16 AMP, 224 px: H100 80GB SXM5 2,616-2,791 img/s "
        "(1 GPU), 20,728-22,088 on 8; A100 80GB SXM4 1,582 in the same harness",
        "derived, not measured: Lambda's harness runs the A100 36 % below NVIDIA's own figure, so its "
        "H100/A100 ratio (1.76) is applied to the A100 row; Lambda's own 2,791 is the floor. Measure it: "
        "python -m imagenet_ray.bench.gpu",
    ),
    GpuRate(
        "h200",
        "resnet50",
        round(2470 * _H100_OVER_A100, -1),
        REFERENCE_SIZE,
        _LAMBDA,
        "no published ResNet-50 training figure found for the H200",
        "taken equal to the H100 row: same GH100 compute and Tensor-core TFLOPS as the H100 SXM, 4.8 vs "
        "3.35 TB/s of HBM (likely a lower bound for a partly bandwidth-bound CNN); unconfirmed",
    ),
    GpuRate(
        "a100",
        "resnet18",
        5550,
        REFERENCE_SIZE,
        _FFCV,
        "rn18, 88 epochs on 1 x A100 (p4d.24xlarge) in 187.3 min, 160->192 px progressive, evaluation "
        "included: 88 x 1,281,167 / 11,238 s = 10,032 img/s at 167 px (root-mean-square side)",
        "derived: x (167/224)^2 (pixels) = 5,550 at 224; NVIDIA's ResNet-50 A100 figure x the FLOP ratio "
        "(4.1/1.8 GFLOPs) gives 5,600",
    ),
    GpuRate(
        "h100",
        "resnet18",
        round(5550 * _H100_OVER_A100, -1),
        REFERENCE_SIZE,
        _FFCV,
        "the A100 resnet18 row",
        "derived, not measured: x 1.76, Lambda's H100/A100 ratio for ResNet-50",
    ),
    GpuRate(
        "h200",
        "resnet18",
        round(5550 * _H100_OVER_A100, -1),
        REFERENCE_SIZE,
        _FFCV,
        "the H100 resnet18 row",
        "taken equal to the H100 (see the h200 resnet50 row); unconfirmed",
    ),
)
GPU_KINDS = tuple(sorted({r.gpu for r in GPU_TABLE}))


def table_rate(gpu: str, model: str) -> GpuRate:
    """The table's row for (gpu, model); a ConfigError naming what the table has otherwise."""
    for row in GPU_TABLE:
        if row.gpu == gpu and row.model == model:
            return row
    known = ", ".join(f"{r.gpu}/{r.model}" for r in GPU_TABLE)
    raise ConfigError(f"plan: no GPU table entry for {gpu}/{model} (table: {known}); give --gpu-images-per-s")


def scale_to_size(images_per_s: float, from_size: int, to_size: int) -> float:
    """Images/s at `to_size` px from a rate at `from_size`, assuming per-image GPU work ∝ pixels.

    Optimistic for small crops (fixed per-image costs do not shrink), so it errs towards more decode cores."""
    return images_per_s * (from_size / to_size) ** 2


def gpu_rate_from_table(gpu: str, model: str, size: int) -> Sourced:
    row = table_rate(gpu, model)
    rate = scale_to_size(row.images_per_s, row.size, size)
    scaled = "" if size == row.size else f", scaled ∝ pixels from {row.size} to {size} px"
    return Sourced(rate, f"table: {row.gpu}/{row.model} {row.images_per_s:,.0f} img/s at {row.size} px{scaled}")


def predict_data_wait(decode_images_per_s: float, consume_images_per_s: float) -> float:
    """Steady-state fraction of training time spent waiting for data: max(0, 1 - decode / consume).

    The consumer (the GPUs, or a throttled step) takes `consume` images/s when never starved; the decode
    side delivers at most `decode`, overlapped by prefetching, so the step runs decode/consume of the time.
    """
    if consume_images_per_s <= 0:
        raise ValueError(f"consume rate must be > 0, got {consume_images_per_s}")
    if decode_images_per_s < 0:
        raise ValueError(f"decode rate must be ≥ 0, got {decode_images_per_s}")
    return max(0.0, 1.0 - decode_images_per_s / consume_images_per_s)


def decode_capacity(images_per_core_s: float, cores: float, efficiency: float = DEFAULT_EFFICIENCY) -> float:
    """Images/s that `cores` Ray CPUs deliver through the pipeline, from the kernel's one-core rate."""
    return images_per_core_s * cores * efficiency


def serial_rate(step_images_per_s: float, decode_images_per_s: float) -> float:
    """Images/s of a GPU that decodes (nvJPEG) and then trains on each batch, one after the other."""
    return 1.0 / (1.0 / step_images_per_s + 1.0 / decode_images_per_s)


def gbps(images_per_s: float, bytes_per_image: float) -> float:
    return images_per_s * bytes_per_image * 8 / 1e9


@dataclass(frozen=True)
class PlanInputs:
    """Everything the plan is computed from; each measured or looked-up rate carries its source."""

    gpus: int
    gpu_kind: str
    model: str
    gpu_size: int  # the train crop at which the GPUs are fastest (the smallest of the schedule)
    decode_size: int  # the crop the CPU kernel decodes to (data.train_crop)
    decode_on: str  # "cpu", or "gpu": the CPU side only reads bytes, the GPU decodes (nvJPEG)
    variant: str  # the prepared dataset: "original" or "max_side_N"
    gpu_rate: Sourced  # training images/s per GPU at gpu_size
    gpu_decode_rate: Sourced | None  # nvJPEG images/s per GPU (decode_on=gpu), when measured
    per_core_rate: Sourced  # images per CPU-second: read (+ decode + augment with decode_on=cpu)
    bytes_per_image: Sourced  # stored (Parquet) bytes per train image
    cpus_per_pod: Sourced  # Ray CPUs of one decode pod
    max_replicas: int  # the decode group's maxReplicas in the manifest
    gpus_per_train_node: int  # 0 when unknown
    bandwidth_gbps: Sourced  # object storage → one decode pod
    max_wait: float = DEFAULT_MAX_WAIT
    headroom: float = DEFAULT_HEADROOM
    efficiency: float = DEFAULT_EFFICIENCY


@dataclass(frozen=True)
class Plan:
    inputs: PlanInputs
    consume_images_per_s: float  # what the GPUs' steps take when never starved
    deliverable_images_per_s: float  # what they can take from the CPU side (less with GPU decode time)
    wait_floor: float  # data wait even with unlimited CPUs: GPU decode time counts as data wait
    needed_images_per_s: float  # the least delivery for data wait ≤ max_wait
    target_images_per_s: float  # sized for: deliverable × headroom
    cores: int
    replicas_for_cores: int
    replicas_for_bandwidth: int
    replicas: int
    capacity_images_per_s: float  # what `replicas` pods deliver (their cores, their bandwidth)
    predicted_wait: float
    storage_gbps: float  # read from object storage at the deliverable rate, all pods together
    storage_gbps_per_pod: float
    bandwidth_ok: bool
    train_node_ingress_gbps: float  # into one train node (decoded crops, or JPEG bytes with GPU decode)
    meets_target: bool
    notes: tuple[str, ...]


def plan_capacity(p: PlanInputs) -> Plan:
    """Decode cores and pods for data wait ≤ p.max_wait with p.headroom to spare, and the wait they give."""
    _check_inputs(p)
    consume = p.gpus * p.gpu_rate.value
    per_gpu = p.gpu_rate.value
    if p.decode_on == "gpu" and p.gpu_decode_rate is not None:
        per_gpu = serial_rate(p.gpu_rate.value, p.gpu_decode_rate.value)
    deliverable = p.gpus * per_gpu
    per_core = decode_capacity(p.per_core_rate.value, 1, p.efficiency)
    target = deliverable * p.headroom
    cores = math.ceil(target / per_core)
    replicas_for_cores = math.ceil(cores / p.cpus_per_pod.value)
    storage = gbps(deliverable, p.bytes_per_image.value)
    replicas_for_bandwidth = math.ceil(storage * p.headroom / p.bandwidth_gbps.value)
    replicas = max(1, replicas_for_cores, replicas_for_bandwidth)
    by_bandwidth = replicas * p.bandwidth_gbps.value * 1e9 / 8 / p.bytes_per_image.value
    capacity = min(decode_capacity(p.per_core_rate.value, replicas * p.cpus_per_pod.value, p.efficiency), by_bandwidth)
    predicted = predict_data_wait(min(capacity, deliverable), consume)
    return Plan(
        inputs=p,
        consume_images_per_s=consume,
        deliverable_images_per_s=deliverable,
        wait_floor=predict_data_wait(deliverable, consume),
        needed_images_per_s=consume * (1 - p.max_wait),
        target_images_per_s=target,
        cores=cores,
        replicas_for_cores=replicas_for_cores,
        replicas_for_bandwidth=replicas_for_bandwidth,
        replicas=replicas,
        capacity_images_per_s=capacity,
        predicted_wait=predicted,
        storage_gbps=storage,
        storage_gbps_per_pod=storage / replicas,
        bandwidth_ok=storage / replicas <= p.bandwidth_gbps.value,
        train_node_ingress_gbps=gbps(per_gpu * _gpus_per_node(p), _bytes_to_train_node(p)),
        meets_target=predicted <= p.max_wait,
        notes=_notes(p, replicas, predicted),
    )


def _check_inputs(p: PlanInputs) -> None:
    if p.gpus < 1:
        raise ConfigError(f"plan: --gpus must be ≥ 1, got {p.gpus}")
    positive = {
        "GPU images/s": p.gpu_rate.value,
        "images per core-second": p.per_core_rate.value,
        "bytes per image": p.bytes_per_image.value,
        "CPUs per decode pod": p.cpus_per_pod.value,
        "bandwidth": p.bandwidth_gbps.value,
    }
    if p.gpu_decode_rate is not None:
        positive["GPU decode images/s"] = p.gpu_decode_rate.value
    for name, value in positive.items():
        if not value > 0:
            raise ConfigError(f"plan: {name} must be > 0, got {value}")
    if not 0 < p.max_wait < 1:
        raise ConfigError(f"plan: --max-wait must be within (0, 1), got {p.max_wait}")
    if p.headroom < 1:
        raise ConfigError(f"plan: --headroom must be ≥ 1, got {p.headroom}")
    if not 0 < p.efficiency <= 1:
        raise ConfigError(f"plan: --efficiency must be within (0, 1], got {p.efficiency}")


def _gpus_per_node(p: PlanInputs) -> int:
    return min(p.gpus, p.gpus_per_train_node) if p.gpus_per_train_node > 0 else p.gpus


def _bytes_to_train_node(p: PlanInputs) -> float:
    """Per image into a train node: uint8 crops at data.train_crop, or the JPEG bytes with GPU decode."""
    if p.decode_on == "gpu":
        return p.bytes_per_image.value
    return p.decode_size * p.decode_size * 3 + LABEL_BYTES


def _notes(p: PlanInputs, replicas: int, predicted: float) -> tuple[str, ...]:
    notes = []
    if p.decode_on == "gpu" and p.gpu_decode_rate is None:
        notes.append(
            "decode_on=gpu: nvJPEG time on the GPU counts as data wait and is not included "
            "(give --gpu-decode-images-per-s or --gpu-json from the GPU script)"
        )
    if predicted > p.max_wait:
        notes.append(
            f"the GPUs' own decode time alone gives a data wait of {predicted:.2f} > {p.max_wait:.2f}: "
            "more decode pods cannot help; decode on the CPU instead"
        )
    if replicas > p.max_replicas:
        notes.append(f"{replicas} decode pods exceed the manifest's maxReplicas {p.max_replicas}")
    return tuple(notes)
