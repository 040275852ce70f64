"""The capacity planner without Ray: the arithmetic (hand-computed), the GPU table and resolution scaling, rates
read from bench JSON files and measured on a tiny prepared dataset, the manifest, the overlay, and the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from imagenet_ray import storage
from imagenet_ray.bench.data import summarise_kernel_processes
from imagenet_ray.capacity import manifest as k8s
from imagenet_ray.capacity import model, rates
from imagenet_ray.capacity.model import PlanInputs, Sourced, plan_capacity, predict_data_wait
from imagenet_ray.cli import main
from imagenet_ray.cluster.manifest import parse_quantity
from imagenet_ray.config import load_config
from imagenet_ray.data.format import write_manifest
from imagenet_ray.data.layouts import detect_and_list
from imagenet_ray.data.prepare import PrepareOptions, build_manifest, plan_tasks, write_shard
from imagenet_ray.data.synth import write_synthetic_imagenet
from imagenet_ray.errors import ConfigError, UserError
from test_k8s_manifests import render, validate

ROOT = Path(__file__).resolve().parents[2]
BASE_MANIFEST = str(ROOT / k8s.DEFAULT_MANIFEST)
FFCV_RN50 = str(ROOT / "configs/resnet50_fast_88ep.yaml")


# --- a tiny prepared dataset, prepared without Ray (prepare's own pure writer) ---------------------------------


def _prepare(root: Path, max_side: int | None = None) -> str:
    raw, out = root / "raw", root / f"prepared-{max_side}"
    if not raw.exists():
        write_synthetic_imagenet(str(raw), 2, 8, 1, seed=0)
    listing = detect_and_list(str(raw))
    opts = PrepareOptions(shard_mb=0.05, max_side=max_side)  # several shards of a few images each
    receipts = [write_shard(task) for task in plan_tasks(listing, str(out), opts)]
    write_manifest(storage.resolve(str(out)), build_manifest(listing, receipts, opts))
    return str(out)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return _prepare(tmp_path_factory.mktemp("capacity"))


# --- the model ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "decode,consume,wait",
    [(900, 1000, 0.1), (1000, 1000, 0.0), (2500, 1000, 0.0), (0, 500, 1.0), (750, 3000, 0.75)],
)
def test_predict_data_wait(decode, consume, wait):
    assert predict_data_wait(decode, consume) == pytest.approx(wait)


def test_predict_data_wait_rejects_impossible_rates():
    with pytest.raises(ValueError):
        predict_data_wait(100, 0)
    with pytest.raises(ValueError):
        predict_data_wait(-1, 100)


def test_small_rate_helpers():
    assert model.decode_capacity(904, 60, 0.6) == pytest.approx(32_544)
    assert model.serial_rate(4000, 12000) == pytest.approx(3000)  # 1/4000 + 1/12000 s per image
    assert model.gbps(10_000, 100_000) == pytest.approx(8.0)


@pytest.mark.parametrize("to_size,rate", [(224, 1000), (160, 1960), (112, 4000), (448, 250)])
def test_scaling_is_proportional_to_pixels(to_size, rate):
    assert model.scale_to_size(1000, 224, to_size) == pytest.approx(rate)


def test_gpu_table_rows_and_sources():
    assert model.GPU_KINDS == ("a100", "h100", "h200")
    assert model.table_rate("a100", "resnet50").images_per_s == 2470  # NVIDIA DLE, DGX A100, 1 GPU, AMP
    # Lambda's same-harness H100/A100 ratio (2,791 / 1,582) applied to NVIDIA's A100 figure, rounded to 10
    assert model.table_rate("h100", "resnet50").images_per_s == 4360
    assert model.table_rate("h200", "resnet50").images_per_s == 4360  # no published figure: = H100
    assert model.table_rate("a100", "resnet18").images_per_s == 5550  # FFCV rn18 88 epochs, scaled to 224
    assert model.table_rate("h100", "resnet18").images_per_s == 9790
    for row in model.GPU_TABLE:
        assert row.size == 224 and row.source.startswith("https://") and row.measured and row.note
    with pytest.raises(ConfigError, match=r"no GPU table entry for h100/vit_b_16.*--gpu-images-per-s"):
        model.table_rate("h100", "vit_b_16")


def test_table_rate_scaled_to_the_planning_crop():
    rate = model.gpu_rate_from_table("a100", "resnet50", 160)
    assert rate.value == pytest.approx(2470 * 1.96)
    assert "table: a100/resnet50" in rate.source and "from 224 to 160 px" in rate.source
    assert model.gpu_rate_from_table("a100", "resnet50", 224).value == 2470


def _inputs(**changes) -> PlanInputs:
    fields = dict(
        gpus=8,
        gpu_kind="h100",
        model="resnet50",
        gpu_size=160,
        decode_size=192,
        decode_on="cpu",
        variant="original",
        gpu_rate=Sourced(1000, "test"),
        gpu_decode_rate=None,
        per_core_rate=Sourced(500, "test"),
        bytes_per_image=Sourced(100_000, "test"),
        cpus_per_pod=Sourced(10, "test"),
        max_replicas=16,
        gpus_per_train_node=8,
        bandwidth_gbps=Sourced(25, "test"),
        max_wait=0.05,
        headroom=1.25,
        efficiency=0.5,
    )
    fields.update(changes)
    return PlanInputs(**fields)


def test_plan_sized_by_cores():
    plan = plan_capacity(_inputs())
    assert plan.consume_images_per_s == 8000  # 8 GPUs x 1,000
    assert plan.needed_images_per_s == pytest.approx(7600)  # data wait 5 % at 0.95 x 8,000
    assert plan.target_images_per_s == 10_000  # x 1.25 headroom
    assert plan.cores == 40  # 10,000 / (500 x 0.5)
    assert (plan.replicas_for_cores, plan.replicas_for_bandwidth, plan.replicas) == (4, 1, 4)
    assert plan.capacity_images_per_s == 10_000  # 40 cores x 250; 4 x 25 Gb/s would carry 125,000
    assert plan.storage_gbps == pytest.approx(6.4)  # 8,000 x 100 kB x 8 bit
    assert plan.storage_gbps_per_pod == pytest.approx(1.6) and plan.bandwidth_ok
    assert plan.train_node_ingress_gbps == pytest.approx(8000 * (192 * 192 * 3 + 8) * 8 / 1e9)
    assert plan.predicted_wait == 0 and plan.meets_target and plan.notes == ()


def test_plan_sized_by_bandwidth():
    plan = plan_capacity(_inputs(bytes_per_image=Sourced(1_000_000, "test"), bandwidth_gbps=Sourced(10, "test")))
    # 8,000 images/s x 1 MB = 64 Gb/s, x 1.25 = 80 Gb/s over 10 Gb/s pods: 8 pods (cores alone: 4)
    assert (plan.replicas_for_cores, plan.replicas_for_bandwidth, plan.replicas) == (4, 8, 8)
    assert plan.capacity_images_per_s == pytest.approx(10_000)  # 8 x 10 Gb/s / 1 MB, below 80 cores' 20,000
    assert plan.storage_gbps_per_pod == pytest.approx(8.0) and plan.bandwidth_ok


def test_plan_with_gpu_decode_has_a_wait_floor():
    plan = plan_capacity(_inputs(decode_on="gpu", gpu_decode_rate=Sourced(3000, "test")))
    # each GPU: 1/1000 s of step + 1/3000 s of nvJPEG per image = 750 images/s; the decode share is wait
    assert plan.deliverable_images_per_s == pytest.approx(6000)
    assert plan.wait_floor == pytest.approx(0.25) and plan.predicted_wait == pytest.approx(0.25)
    assert plan.cores == 30 and plan.replicas == 3  # 6,000 x 1.25 / 250
    assert plan.train_node_ingress_gbps == pytest.approx(6000 * 100_000 * 8 / 1e9)  # JPEG bytes
    assert not plan.meets_target and any("more decode pods cannot help" in n for n in plan.notes)


def test_plan_notes_unmeasured_gpu_decode_and_too_many_pods():
    plan = plan_capacity(_inputs(decode_on="gpu", max_replicas=2))
    assert plan.wait_floor == 0 and plan.replicas == 4
    assert any("nvJPEG time" in n for n in plan.notes)
    assert any("4 decode pods exceed the manifest's maxReplicas 2" in n for n in plan.notes)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"gpus": 0}, "--gpus must be ≥ 1"),
        ({"max_wait": 1.0}, "--max-wait"),
        ({"headroom": 0.9}, "--headroom"),
        ({"efficiency": 0.0}, "--efficiency"),
        ({"per_core_rate": Sourced(0, "x")}, "images per core-second must be > 0"),
    ],
)
def test_plan_rejects_bad_inputs(changes, message):
    with pytest.raises(ConfigError, match=message):
        plan_capacity(_inputs(**changes))


# --- rates ----------------------------------------------------------------------------------------------------


def test_gpu_crop_range_over_the_progressive_schedule():
    assert rates.gpu_crop_range(load_config(FFCV_RN50).data, 88) == (160, 192)
    assert rates.gpu_crop_range(load_config(ROOT / "configs/smoke.yaml").data, 2) == (64, 64)


def test_bytes_per_image_and_variant_from_the_manifest(dataset):
    manifest = json.loads((Path(dataset) / "_manifest.json").read_text())
    files = sorted((Path(dataset) / "train").glob("*.parquet"))
    assert len(files) >= 3
    expected = sum(f.stat().st_size for f in files) / manifest["splits"]["train"]["num_images"]
    assert rates.bytes_per_image(manifest) == pytest.approx(expected)
    assert rates.manifest_variant(manifest) == "original"
    assert rates.variant_name(256) == "max_side_256"


def test_measured_kernel_runs_the_pipelines_kernel_on_the_datasets_rows(dataset, monkeypatch):
    from imagenet_ray.data import transforms

    calls = []
    real = transforms.train_batch

    def counted(batch, size, rng, *args):
        calls.append((len(batch["image"]), size))
        return real(batch, size, rng, *args)

    monkeypatch.setattr(transforms, "train_batch", counted)
    sample = rates.measure_kernel(dataset, 48, rows_per_shard=4, shards=2, passes=2)
    # shards hold fewer than 4 rows here, so more shards are read until 8 rows are in the sample
    assert sample.images == 8 and sample.shards >= 3
    assert sample.read_cpu_s > 0 and sample.decode_cpu_s > 0
    assert 10 < sample.images_per_core_s < 1e6
    assert all(size == 48 and rows <= 32 for rows, size in calls)
    assert len(calls) == 1 + 2 * sample.shards  # a warm-up chunk, then every shard's chunk per pass


def test_measured_read_only_with_gpu_decode(dataset):
    cpu = rates.measure_kernel(dataset, 48, rows_per_shard=4, shards=2)
    gpu = rates.measure_kernel(dataset, 48, "gpu", rows_per_shard=4, shards=2)
    assert gpu.decode_cpu_s == 0 and gpu.images == cpu.images
    assert gpu.images_per_core_s > cpu.images_per_core_s


def test_measure_kernel_needs_a_prepared_dataset(tmp_path):
    with pytest.raises(UserError, match=r"_manifest\.json"):
        rates.measure_kernel(str(tmp_path), 64)


def _kernel_result(rate: float) -> dict:
    return {
        "train": {
            "ours": {"best": rate},
            "torchvision": {"best": rate / 2.5},
            "ours_vs_torchvision": 2.5,
            "ours_vs_ceiling": 1.0,
        },
        "eval": {"ours_vs_torchvision": 2.2},
    }


def _bench_json(path: Path, per_process: list[float] | None, crop: int = 224) -> str:
    runs = [{"variants": {"original": _kernel_result(r), "max_side_256": _kernel_result(3 * r)}} for r in per_process]
    kernel = dict(runs[0])
    if len(runs) > 1:
        kernel["processes"] = summarise_kernel_processes(runs)  # what bench data writes for several processes
    path.write_text(json.dumps({"settings": {"crop": crop}, "kernel": kernel}))
    return str(path)


def test_kernel_rate_from_bench_json_takes_the_median_over_processes(tmp_path):
    path = _bench_json(tmp_path / "b.json", [900, 950, 910])
    rate = rates.kernel_rate_from_bench_json(path, "original", 224)
    assert rate.value == 910 and "median of 3 processes" in rate.source
    assert rates.kernel_rate_from_bench_json(path, "max_side_256", 224).value == 2730


def test_kernel_rate_from_bench_json_of_one_process_and_its_crop(tmp_path, caplog):
    path = _bench_json(tmp_path / "b.json", [904], crop=224)
    rate = rates.kernel_rate_from_bench_json(path, "original", 192)
    assert rate.value == 904 and "best pass of 1 process" in rate.source
    assert "measured the kernel at crop 224, the config decodes to 192" in caplog.text


def test_kernel_rate_from_bench_json_errors(tmp_path):
    path = _bench_json(tmp_path / "b.json", [904])
    with pytest.raises(UserError, match="no kernel result for the dataset's variant 'max_side_320'"):
        rates.kernel_rate_from_bench_json(path, "max_side_320", 224)
    (tmp_path / "skip.json").write_text(json.dumps({"settings": {}, "e2e": {}}))
    with pytest.raises(UserError, match="no kernel section"):
        rates.kernel_rate_from_bench_json(str(tmp_path / "skip.json"), "original", 224)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match=r"bad\.json"):
        rates.kernel_rate_from_bench_json(str(tmp_path / "bad.json"), "original", 224)


def test_gpu_rates_from_the_gpu_scripts_results(tmp_path):
    results = {
        "device": "NVIDIA H200",
        "ceiling": {"images_per_s": 3600.0, "batch": 256, "steps": 50, "size": 224, "compile": False},
        "gpu_decode": {"images_per_s": 9000.0, "batch": 256, "size": 224},
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    train, decode = rates.gpu_rates_from_json(str(path), "resnet50", 160)
    assert train.value == pytest.approx(3600 * 1.96) and "NVIDIA H200" in train.source
    assert decode is not None and decode.value == 9000
    with pytest.raises(UserError, match="measures resnet50, the config trains resnet18"):
        rates.gpu_rates_from_json(str(path), "resnet18", 160)
    del results["gpu_decode"]  # cut short on the device after the ceiling
    path.write_text(json.dumps(results))
    assert rates.gpu_rates_from_json(str(path), "resnet50", 224)[1] is None


# --- the manifest and the overlay -----------------------------------------------------------------------------------


def test_reads_the_decode_group_of_the_base_manifest():
    group = k8s.read_worker_group(BASE_MANIFEST, "decode")
    assert (group.cluster, group.index, group.cpus_per_pod, group.cpus_from) == (
        "imagenet-ray",
        1,
        60.0,
        "resources.limits.cpu",
    )
    assert (group.replicas, group.min_replicas, group.max_replicas, group.gpus_per_pod) == (0, 0, 16, 0)
    assert k8s.gpus_per_node(BASE_MANIFEST) == 8
    with pytest.raises(UserError, match=r"no group 'cpu'.*groups: head, train, decode"):
        k8s.read_worker_group(BASE_MANIFEST, "cpu")


@pytest.mark.parametrize("text,cpus", [("60", 60.0), ("500m", 0.5), (2, 2.0), ("1.5", 1.5)])
def test_parse_cpu(text, cpus):
    assert parse_quantity(text, "cpu") == cpus


def test_ray_cpus_follow_kuberay(tmp_path):
    cluster = yaml.safe_load(Path(BASE_MANIFEST).read_text())
    decode = cluster["spec"]["workerGroupSpecs"][1]
    decode["rayStartParams"]["num-cpus"] = "12"
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(cluster))
    assert k8s.read_worker_group(str(tmp_path / "a.yaml"), "decode").cpus_per_pod == 12
    del decode["rayStartParams"]["num-cpus"]
    decode["template"]["spec"]["containers"][0]["resources"] = {"requests": {"cpu": "7500m"}}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cluster))
    group = k8s.read_worker_group(str(tmp_path / "b.yaml"), "decode")
    assert (group.cpus_per_pod, group.cpus_from) == (8.0, "resources.requests.cpu")  # rounded up, like KubeRay
    with pytest.raises(UserError, match="not a Kubernetes quantity"):
        parse_quantity("lots", "cpu")


def _decode_groups(docs: list[dict]) -> list[dict]:
    specs = [d["spec"] for d in docs if d["kind"] == "RayCluster"]
    specs += [d["spec"]["rayClusterSpec"] for d in docs if d["kind"] == "RayJob"]
    return [g for spec in specs for g in spec["workerGroupSpecs"] if g["groupName"] == "decode"]


@pytest.mark.parametrize("replicas,max_replicas", [(3, 16), (20, 20)])
def test_overlay_sizes_the_decode_group_of_the_cluster_and_every_job(tmp_path, replicas, max_replicas):
    group = k8s.read_worker_group(BASE_MANIFEST, "decode")
    written = k8s.write_overlay(str(tmp_path / "overlay"), group, replicas, "test")
    assert written == tmp_path / "overlay" / "kustomization.yaml"
    docs = render(tmp_path / "overlay")
    groups = _decode_groups(docs)
    assert len(groups) == 5  # the RayCluster and the 4 RayJobs' embedded clusters
    for g in groups:
        assert (g["replicas"], g["minReplicas"], g["maxReplicas"]) == (replicas, replicas, max_replicas)
    for doc in docs:
        validate(doc)
    if shutil.which("kubectl"):
        out = subprocess.run(
            ["kubectl", "kustomize", str(tmp_path / "overlay")], capture_output=True, text=True, check=True
        )
        theirs = [d for d in yaml.safe_load_all(out.stdout) if d]
        key = lambda d: (d["kind"], d["metadata"]["name"])
        assert sorted(theirs, key=key) == sorted(docs, key=key)


def test_overlay_refuses_a_foreign_kustomization_and_a_base_without_one(tmp_path):
    group = k8s.read_worker_group(BASE_MANIFEST, "decode")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "kustomization.yaml").write_text("resources: [../base]\n")
    with pytest.raises(UserError, match="was not written by imagenet-ray plan"):
        k8s.write_overlay(str(tmp_path / "mine"), group, 2, "test")
    k8s.write_overlay(str(tmp_path / "ours"), group, 2, "first")
    k8s.write_overlay(str(tmp_path / "ours"), group, 5, "second")  # its own file: rewritten
    assert "value: 5}" in (tmp_path / "ours" / "kustomization.yaml").read_text()
    shutil.copy(BASE_MANIFEST, tmp_path / "raycluster.yaml")
    loose = k8s.read_worker_group(str(tmp_path / "raycluster.yaml"), "decode")
    with pytest.raises(UserError, match=r"has no kustomization\.yaml"):
        k8s.write_overlay(str(tmp_path / "x"), loose, 2, "test")


# --- the command ------------------------------------------------------------------------------------------------------


def _plan(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(["plan", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_plan_json(dataset, capsys):
    argv = ["--gpus", "8", "--config", FFCV_RN50, "--data", dataset, "--decode-images-per-core-s", "904"]
    rc, out, err = _plan([*argv, "--manifest", BASE_MANIFEST, "--json"], capsys)
    assert rc == 0 and err == ""
    plan = json.loads(out)
    inputs = plan["inputs"]
    assert inputs["gpu_size"] == 160 and inputs["decode_size"] == 192 and inputs["variant"] == "original"
    assert inputs["gpu_rate"]["value"] == pytest.approx(4360 * (224 / 160) ** 2)  # the h100 row at 160 px
    assert inputs["per_core_rate"] == {"value": 904.0, "source": "argument"}
    # 8 x 8,545.6 = 68,365 images/s; x 1.2 = 82,038; / (904 x 0.6) = 151.3 -> 152 cores -> 3 pods of 60
    assert plan["consume_images_per_s"] == pytest.approx(68_364.8)
    assert plan["cores"] == 152 and plan["replicas"] == 3 and plan["predicted_wait"] == 0


def test_cli_plan_table_measures_the_kernel_and_writes_the_overlay(dataset, tmp_path, capsys):
    overlay = tmp_path / "sized"
    argv = ["--gpus", "1", "--gpu-kind", "a100", "--config", str(ROOT / "configs/smoke.yaml"), "--data", dataset]
    rc, out, _ = _plan([*argv, "--manifest", BASE_MANIFEST, "--write-overlay", str(overlay)], capsys)
    assert rc == 0
    assert out.startswith("plan: 1 x a100 training resnet18 (decode on cpu, original)\ninputs:\n")
    assert "measured on this machine: read + train kernel at 64 px" in out
    assert "table: a100/resnet18 5,550 img/s at 224 px, scaled ∝ pixels from 224 to 64 px" in out
    assert "decode pods (60 CPUs)" in out and f"wrote {overlay / 'kustomization.yaml'}" in out
    (cluster,) = [d for d in render(overlay) if d["kind"] == "RayCluster"]
    assert cluster["spec"]["workerGroupSpecs"][1]["replicas"] >= 1


@pytest.mark.parametrize(
    "extra,code,message",
    [
        (["--gpus", "0"], 2, "--gpus must be ≥ 1"),
        (["--gpu-kind", "v100"], 2, "--gpu-kind must be one of a100, h100, h200"),
        (["--max-wait", "1.5"], 2, "--max-wait must be within (0, 1)"),
        (["--group", "cpu"], 1, "no group 'cpu'"),
        (["--gpu-json", "/nonexistent/results.json"], 1, "plan --gpu-json /nonexistent/results.json"),
    ],
)
def test_cli_plan_errors_are_one_line(dataset, capsys, extra, code, message):
    argv = ["--config", FFCV_RN50, "--data", dataset, "--decode-images-per-core-s", "900", "--manifest", BASE_MANIFEST]
    rc, out, err = _plan([*argv, *extra], capsys)
    assert rc == code and out == ""
    assert err.count("\n") == 1 and err.startswith("imagenet-ray: error: ") and message in err


def test_cli_plan_needs_a_prepared_dataset(tmp_path, capsys):
    rc, _, err = _plan(["--config", FFCV_RN50, "--data", str(tmp_path), "--manifest", BASE_MANIFEST], capsys)
    assert rc == 1 and "no _manifest.json" in err and err.count("\n") == 1


def test_cli_plan_on_a_max_side_variant_reads_its_bench_row(tmp_path, capsys):
    variant = _prepare(tmp_path, max_side=32)
    bench = _bench_json(tmp_path / "b.json", [900.0], crop=192)
    argv = ["--config", FFCV_RN50, "--data", variant, "--manifest", BASE_MANIFEST, "--json"]
    rc, _, err = _plan([*argv, "--bench-json", bench], capsys)
    assert rc == 1 and "no kernel result for the dataset's variant 'max_side_32'" in err
    payload = json.loads(Path(bench).read_text())
    payload["kernel"]["variants"]["max_side_32"] = _kernel_result(2000)
    Path(bench).write_text(json.dumps(payload))
    rc, out, _ = _plan([*argv, "--bench-json", bench], capsys)
    assert rc == 0 and json.loads(out)["inputs"]["per_core_rate"]["value"] == 2000
    assert np.isclose(json.loads(out)["inputs"]["gpu_rate"]["value"], 4360 * 1.96)
