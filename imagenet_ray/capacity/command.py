"""`imagenet-ray plan`: arguments → PlanInputs (each rate measured, read or looked up, with its source) →
the plan as a short table (or JSON), and optionally a kustomize overlay with the decode group's size."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from imagenet_ray.capacity import manifest as k8s
from imagenet_ray.capacity import rates
from imagenet_ray.capacity.model import (
    DEFAULT_BANDWIDTH_GBPS,
    DEFAULT_EFFICIENCY,
    DEFAULT_HEADROOM,
    DEFAULT_MAX_WAIT,
    GPU_KINDS,
    Plan,
    PlanInputs,
    Sourced,
    gpu_rate_from_table,
    plan_capacity,
)
from imagenet_ray.errors import ConfigError

if TYPE_CHECKING:
    from imagenet_ray.config import ExperimentConfig

log = logging.getLogger(__name__)


def add_plan_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--gpus", type=int, default=None, help="GPUs to feed (default: the config's train.num_workers)")
    p.add_argument("--gpu-kind", default="h100", help=f"for the GPU table: {', '.join(GPU_KINDS)} (default h100)")
    p.add_argument("--config", default=None, help="configs/NAME.yaml: model, crops, decode_on (default: embedded)")
    p.add_argument("--data", default=None, help="prepared dataset URL (default: the config's data.url)")
    p.add_argument("overrides", nargs="*", help="config overrides, dotted.key=value")
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument("--gpu-images-per-s", type=float, default=None, help="measured rate per GPU at the crop")
    gpu.add_argument(
        "--gpu-json", default=None, help="the GPU script's results.json (python -m imagenet_ray.bench.gpu)"
    )
    p.add_argument("--gpu-decode-images-per-s", type=float, default=None, help="nvJPEG rate per GPU (decode_on=gpu)")
    kernel = p.add_mutually_exclusive_group()
    kernel.add_argument("--decode-images-per-core-s", type=float, default=None, help="kernel images per CPU-second")
    kernel.add_argument("--bench-json", default=None, help="`imagenet-ray bench data --json` output")
    p.add_argument("--sample-rows", type=int, default=rates.SAMPLE_ROWS_PER_SHARD, help="rows per shard timed")
    p.add_argument("--sample-shards", type=int, default=rates.SAMPLE_SHARDS, help="train shards timed")
    p.add_argument(
        "--bandwidth-gbps",
        type=float,
        default=DEFAULT_BANDWIDTH_GBPS,
        help=f"object storage → one decode pod, Gb/s (default {DEFAULT_BANDWIDTH_GBPS:g}: an ENA-class NIC)",
    )
    p.add_argument("--max-wait", type=float, default=DEFAULT_MAX_WAIT, help="data-wait fraction to stay under")
    p.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM, help="decode capacity over the GPUs' rate")
    p.add_argument("--efficiency", type=float, default=DEFAULT_EFFICIENCY, help="pipeline / kernel rate per core")
    p.add_argument("--manifest", default=k8s.DEFAULT_MANIFEST, help="the RayCluster manifest")
    p.add_argument("--group", default=k8s.DEFAULT_GROUP, help="its CPU decode worker group")
    p.add_argument("--write-overlay", default=None, metavar="DIR", help="write DIR/kustomization.yaml with the size")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def run_plan(args: argparse.Namespace) -> int:
    from imagenet_ray.config import load_config

    cfg = load_config(args.config, args.overrides)
    inputs = build_inputs(args, cfg)
    plan = plan_capacity(inputs)
    print(json.dumps(plan_json(plan), indent=1) if args.json else format_plan(plan))  # the command's product
    if args.write_overlay:
        group = k8s.read_worker_group(args.manifest, args.group)
        summary = f"{plan.replicas} x {inputs.cpus_per_pod.value:g}-CPU decode pods for {_fleet(inputs)}"
        log.info("wrote %s", k8s.write_overlay(args.write_overlay, group, plan.replicas, summary))
    return 0


def build_inputs(args: argparse.Namespace, cfg: ExperimentConfig) -> PlanInputs:
    """Every input of the plan, from the arguments, the config, the dataset and the manifest."""
    from imagenet_ray.data.format import read_manifest
    from imagenet_ray.runtime import absolute_url

    if args.gpu_kind not in GPU_KINDS:
        raise ConfigError(f"plan: --gpu-kind must be one of {', '.join(GPU_KINDS)}")
    if cfg.train.precision == "fp32":
        log.warning("plan: the GPU table is for mixed precision; train.precision=fp32 trains slower")
    url = absolute_url(args.data or cfg.data.url)
    dataset = read_manifest(url)
    variant = rates.manifest_variant(dataset)
    gpu_size, _ = rates.gpu_crop_range(cfg.data, cfg.train.epochs)
    gpu_rate, gpu_decode = _gpu_rates(args, cfg.model.name, gpu_size)
    group = k8s.read_worker_group(args.manifest, args.group)
    return PlanInputs(
        gpus=args.gpus if args.gpus is not None else cfg.train.max_workers,
        gpu_kind=args.gpu_kind,
        model=cfg.model.name,
        gpu_size=gpu_size,
        decode_size=cfg.data.train_crop,
        decode_on=cfg.data.decode_on,
        variant=variant,
        gpu_rate=gpu_rate,
        gpu_decode_rate=gpu_decode if cfg.data.decode_on == "gpu" else None,
        per_core_rate=_kernel_rate(args, url, variant, cfg.data.train_crop, cfg.data.decode_on),
        bytes_per_image=Sourced(rates.bytes_per_image(dataset), f"manifest of {url} (train split)"),
        cpus_per_pod=Sourced(group.cpus_per_pod, f"{args.manifest}, group {group.name} ({group.cpus_from})"),
        max_replicas=group.max_replicas,
        gpus_per_train_node=k8s.gpus_per_node(args.manifest),
        bandwidth_gbps=Sourced(
            args.bandwidth_gbps,
            "argument" if args.bandwidth_gbps != DEFAULT_BANDWIDTH_GBPS else "default: an ENA-class node NIC",
        ),
        max_wait=args.max_wait,
        headroom=args.headroom,
        efficiency=args.efficiency,
    )


def _gpu_rates(args: argparse.Namespace, model: str, size: int) -> tuple[Sourced, Sourced | None]:
    decode = None
    if args.gpu_decode_images_per_s is not None:
        decode = Sourced(args.gpu_decode_images_per_s, "argument")
    if args.gpu_images_per_s is not None:
        return Sourced(args.gpu_images_per_s, f"argument (at {size} px)"), decode
    if args.gpu_json:
        train, measured_decode = rates.gpu_rates_from_json(args.gpu_json, model, size)
        return train, decode or measured_decode
    return gpu_rate_from_table(args.gpu_kind, model, size), decode


def _kernel_rate(args: argparse.Namespace, url: str, variant: str, crop: int, decode_on: str) -> Sourced:
    if args.decode_images_per_core_s is not None:
        return Sourced(args.decode_images_per_core_s, "argument")
    if args.bench_json:
        if decode_on == "gpu":
            raise ConfigError("plan: --bench-json times the CPU kernel; with decode_on=gpu the CPU only reads")
        return rates.kernel_rate_from_bench_json(args.bench_json, variant, crop)
    return rates.kernel_rate(url, crop, decode_on, args.sample_rows, args.sample_shards)


# --- output -----------------------------------------------------------------------------------------------------


def _fleet(p: PlanInputs) -> str:
    return f"{p.gpus} x {p.gpu_kind} training {p.model} (decode on {p.decode_on}, {p.variant})"


def format_plan(plan: Plan) -> str:
    p = plan.inputs
    rows_in = [
        (f"GPU images/s per GPU at {p.gpu_size} px", f"{p.gpu_rate.value:,.0f}", p.gpu_rate.source),
        (
            "images per CPU-second" + (" (read)" if p.decode_on == "gpu" else ""),
            f"{p.per_core_rate.value:,.0f}",
            p.per_core_rate.source,
        ),
        ("bytes per image", f"{p.bytes_per_image.value:,.0f}", p.bytes_per_image.source),
        ("Ray CPUs per decode pod", f"{p.cpus_per_pod.value:g}", p.cpus_per_pod.source),
        ("Gb/s per decode pod", f"{p.bandwidth_gbps.value:g}", p.bandwidth_gbps.source),
        ("efficiency, headroom", f"{p.efficiency:.2f}, {p.headroom:.2f}", "docs/cluster.md"),
    ]
    if p.gpu_decode_rate is not None:
        rows_in.insert(1, ("nvJPEG images/s per GPU", f"{p.gpu_decode_rate.value:,.0f}", p.gpu_decode_rate.source))
    per_core = p.per_core_rate.value * p.efficiency
    needed = f"{plan.needed_images_per_s:,.0f} images/s" if plan.wait_floor <= p.max_wait else "unreachable"
    rows_out = [
        ("GPU steps take", f"{plan.consume_images_per_s:,.0f} images/s", "when never starved"),
        (f"needed for data wait ≤ {p.max_wait:.0%}", needed, ""),
        (f"sized for (x {p.headroom:g})", f"{plan.target_images_per_s:,.0f} images/s", _sized_for(plan)),
        (
            "CPU cores (read only)" if p.decode_on == "gpu" else "decode cores",
            f"{plan.cores:,}",
            f"{plan.target_images_per_s:,.0f} / ({p.per_core_rate.value:,.0f} x {p.efficiency:g})",
        ),
        (
            f"decode pods ({p.cpus_per_pod.value:g} CPUs)",
            f"{plan.replicas}",
            f"for cores {plan.replicas_for_cores}, for bandwidth {plan.replicas_for_bandwidth}",
        ),
        (
            "object storage read",
            f"{plan.storage_gbps:,.1f} Gb/s",
            f"{plan.storage_gbps_per_pod:,.1f} per pod of {p.bandwidth_gbps.value:g}: "
            + ("ok" if plan.bandwidth_ok else "TOO MUCH"),
        ),
        ("into each train node", f"{plan.train_node_ingress_gbps:,.1f} Gb/s", _ingress_what(p)),
        (
            "predicted data wait",
            f"{plan.predicted_wait:.2f}",
            f"{_pods(plan.replicas)} deliver {plan.capacity_images_per_s:,.0f} images/s "
            f"({per_core:,.0f} per core); floor {plan.wait_floor:.2f}",
        ),
    ]
    lines = [f"plan: {_fleet(p)}", "inputs:"]
    lines += [f"  {name:38s}{value:>16s}   {source}" for name, value, source in rows_in]
    lines.append("result:")
    lines += [f"  {name:38s}{value:>16s}   {how}".rstrip() for name, value, how in rows_out]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _pods(n: int) -> str:
    return f"{n} pod" if n == 1 else f"{n} pods"


def _sized_for(plan: Plan) -> str:
    if plan.deliverable_images_per_s < plan.consume_images_per_s:
        return f"of {plan.deliverable_images_per_s:,.0f} images/s: the steps plus nvJPEG on the GPUs"
    return "of what the steps take"


def _ingress_what(p: PlanInputs) -> str:
    if p.decode_on == "gpu":
        return "JPEG bytes (decode_on=gpu)"
    return f"uint8 crops at data.train_crop {p.decode_size} px"


def plan_json(plan: Plan) -> dict[str, Any]:
    return asdict(plan)
