"""`imagenet-ray bench data` end to end on a few generated JPEGs: every section, positive throughputs.

No timing thresholds here: speed is measured (docs/benchmarks.md), not asserted.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def jpeg_folder(tmp_path):
    from imagenet_ray.data.classes import imagenet_classes

    wnids = imagenet_classes().wnids[:3]
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(24):
        h, w = int(rng.integers(60, 140)), int(rng.integers(60, 140))
        ys, xs = np.mgrid[0:h, 0:w]
        img = np.stack([xs * 255 // w, ys * 255 // h, np.full_like(xs, 40 * (i % 3))], -1).astype(np.uint8)
        mode = "L" if i % 8 == 0 else "RGB"  # a few grayscale JPEGs, as in ImageNet
        Image.fromarray(img).convert(mode).save(folder / f"{wnids[i % 3]}_{i:03d}.JPEG", quality=90)
    (folder / "notes.txt").write_text("not an image: ignored")
    return folder


def test_bench_data_reports_every_section(local_ray, jpeg_folder, tmp_path):
    import argparse

    from imagenet_ray.bench.data import LOCAL_S3, add_bench_data_args, format_report, run_bench_data, run_data_bench

    aws_before = {k for k in os.environ if k.startswith("AWS_")}

    cores = min(2, len(os.sched_getaffinity(0)))
    # --s3 without a URL: the benchmark starts (and stops) its own SeaweedFS for the S3 side.
    report = run_data_bench(
        str(jpeg_folder),
        crop=32,
        resize=40,
        eval_crop=32,
        max_side=64,
        passes=1,
        cores=cores,
        epochs=2,
        batch_size=8,
        kernel_batch=8,
        shard_mb=0.02,
        s3=LOCAL_S3,
        work_dir=str(tmp_path / "work"),
        variant_max_sides=(64,),
        variant_qualities=(90,),
        variant_crops=(32,),
    )

    kernel = report["kernel"]["variants"]
    assert set(kernel) == {"original", "max_side_64"}
    for v in kernel.values():
        assert v["images"] == 24
        assert {"pillow", "simplejpeg", "torchvision.io"} <= set(v["decoders"])
        assert all(d["best"] > 0 for d in v["decoders"].values())
        assert v["ceiling"] == max(d["best"] for d in v["decoders"].values())
        for preset in ("train", "eval"):
            assert v[preset]["ours"]["best"] > 0 and v[preset]["torchvision"]["best"] > 0
            assert v[preset]["ours_vs_torchvision"] > 0 and v[preset]["ours_vs_ceiling"] > 0
        whole = v["train"]["ours_whole_decode"]["best"]  # the same kernel without the crop decoder, same run
        assert whole > 0 and v["train"]["crop_decode_gain"] == v["train"]["ours"]["best"] / whole
    assert report["machine"]["versions"]["train decoder"].endswith("(crop decode)")

    e2e = report["e2e"]
    assert e2e["prepare"]["train_images"] == 24 and e2e["prepare"]["shards"] > 1
    for side in ("ray", "ray_s3", "ray_s3_cached", "dataloader"):
        s = e2e[side]
        assert s["images_per_s"] > 0 and s["time_to_first_batch_s"] > 0
        assert [e["images"] for e in s["epochs"]] == [24, 24]  # every image, every epoch
        assert s["decode_errors"] == 0
    for side in ("ray", "ray_s3"):
        store = e2e[side]["object_store"]
        assert store["capacity_mib"] > 0 and store["spilled_mib"] >= 0 and store["peak_used_mib"] >= 0
    assert e2e["ray_s3"]["shards_url"].startswith("s3://") and e2e["s3_copy_s"] > 0
    assert e2e["ray_vs_dataloader"] > 0 and e2e["ray_s3_vs_dataloader"] > 0
    assert not any(k.startswith("AWS_") and k not in aws_before for k in os.environ)  # environment restored
    assert e2e["ray_s3"]["s3_read"]["steady_bytes_per_image"] > 0  # through the byte counter
    # The node cache: the shards are copied from S3 once (the dataset's build already opens them: sampling, the
    # schema), later epochs read none of them again.
    cached = e2e["ray_s3_cached"]["s3_read"]
    assert cached["setup_bytes"] + cached["epoch_bytes"][0] > 0
    assert cached["steady_bytes_per_image"] < 0.05 * e2e["ray_s3"]["s3_read"]["steady_bytes_per_image"], cached
    assert e2e["ray_s3"]["cpu"]["cores_used"] > 0 and "driver" in e2e["ray_s3"]["cpu"]["groups"]

    # Peers from the same S3 server: the floor (DataLoader over our Parquet, our kernel) always runs; Mosaic and
    # LitData run where their packages are installed (the bench extra), else they are skip records.
    from imagenet_ray.bench import peers

    sides = e2e["peers"]["sides"]
    floor = sides["parquet:ours"]
    assert [e["images"] for e in floor["epochs"]] == [24, 24] and floor["images_per_s"] > 0
    assert floor["decode_errors"] == 0 and floor["s3_read"]["first_epoch_bytes_per_image"] > 0
    for peer in ("mosaic", "litdata"):
        for decoder in ("ours", "default"):
            s = sides[f"{peer}:{decoder}"]
            if peers.missing_package(peer):
                assert s["skipped"] == "not installed" and s["package"] == peers.PACKAGES[peer]
            else:
                assert [e["images"] for e in s["epochs"]] == [24, 24]
                assert s["s3_read"]["first_epoch_bytes_per_image"] > 0  # cold cache: read from S3
    goals = e2e["peers"]["summary"]["goals"]
    assert goals["ray_vs_floor"]["value"] > 0 and goals["ray_vs_floor"]["met"] in (True, False)

    stored = report["variants"]["variants"]
    assert set(stored) == {"original", "max_side_64_q90"}
    assert all(v["train"]["32"]["best"] > 0 and v["eval"]["best"] > 0 and v["mean_bytes"] > 0 for v in stored.values())

    gpu = report["gpu"]
    assert gpu.get("skipped") == "no CUDA device" or all(v["best"] > 0 for v in gpu["variants"].values())

    text = format_report(report)
    for heading in (
        "train decoder: libjpeg-turbo",
        "whole decode",
        "crop decode gain",
        "1. kernel",
        "2. end to end",
        "3. GPU decode",
        "ours / torchvision",
        "Ray (local) / DataLoader",
        "Ray (S3) / DataLoader",
        "Parquet on S3",
        "object store peak",
        "4. stored variants",
        "2b. readers from S3",
        "DataLoader(our Parquet), our kernel",
        "goal ray_vs_floor",
    ):
        assert heading in text
    json.dumps(report)  # the --json payload

    # The CLI entry point (what `imagenet-ray bench data` runs), kernel only, writing JSON.
    parser = add_bench_data_args(argparse.ArgumentParser())
    out = tmp_path / "bench.json"
    args = parser.parse_args(
        [
            "--images",
            str(jpeg_folder),
            "--limit",
            "6",
            "--crop",
            "32",
            "--resize",
            "40",
            "--eval-crop",
            "32",
            "--passes",
            "1",
            "--skip-e2e",
            "--skip-gpu",
            "--variants",
            "256,512",
            "--variant-qualities",
            "90",
            "--json",
            str(out),
        ]
    )
    assert run_bench_data(args) == 0
    saved = json.loads(out.read_text())
    assert saved["images"]["count"] == 6 and "e2e" not in saved and "kernel" in saved
    assert list(saved["variants"]["variants"]) == ["original", "max_side_256_q90", "max_side_512_q90"]


def test_kernel_in_fresh_processes_reports_each_and_the_median(jpeg_folder, tmp_path, capsys):
    from imagenet_ray.bench.data import main

    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "--images",
                str(jpeg_folder),
                "--crop",
                "32",
                "--resize",
                "40",
                "--eval-crop",
                "32",
                "--max-side",
                "64",
                "--passes",
                "1",
                "--kernel-processes",
                "2",
                "--skip-e2e",
                "--skip-gpu",
                "--skip-variants",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    kernel = json.loads(out.read_text())["kernel"]
    assert kernel["processes"]["count"] == 2
    for name, v in kernel["processes"]["variants"].items():
        first = kernel["variants"][name]  # the full result shown in the table is process 1's
        assert "breakdown" in first
        ratios = v["train_ours_vs_torchvision"]["per_process"]
        assert len(ratios) == 2 and all(r > 0 for r in ratios) and ratios[0] == first["train"]["ours_vs_torchvision"]
        assert min(ratios) <= v["train_ours_vs_torchvision"]["median"] <= max(ratios)
    assert "over 2 fresh processes" in capsys.readouterr().out


def test_scaling_sections_report_cores_shards_prefetch_and_the_plot(jpeg_folder, tmp_path):
    """`--cores 1,2 --shard-counts 2,4 --prefetch 1,2 --plot`, through the command in a process of its own: the
    section starts a Ray per core count, and this process may hold the package's Ray (one per process)."""
    import subprocess
    import sys

    cores = "1,2" if len(os.sched_getaffinity(0)) >= 2 else "1"
    out, png = tmp_path / "scaling.json", tmp_path / "plots" / "scaling.png"
    argv = ["--images", str(jpeg_folder), "--crop", "32", "--epochs", "2", "--batch-size", "8", "--repeat", "1"]
    argv += ["--shard-mb", "0.02", "--cores", cores, "--shard-counts", "2,4", "--prefetch", "1,2"]
    argv += ["--skip-kernel", "--skip-e2e", "--skip-gpu", "--skip-variants", "--work-dir", str(tmp_path / "work")]
    argv += ["--plot", str(png), "--json", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "imagenet_ray", "bench", "data", *argv], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "5. scaling" in done.stdout and "log-log slope" in done.stdout

    section = json.loads(out.read_text())["scaling"]
    assert section["settings"]["images_per_epoch"] == 24 and section["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def measured(side):
        assert [e["images"] for e in side["epochs"]] == [24, 24] and side["decode_errors"] == 0  # every image, twice
        assert side["images_per_s"] > 0 and side["time_to_first_batch_s"] > 0 and side["epoch_start_s"] > 0

    measured(section["base"]["ray"])
    assert section["base"]["ray"]["dataset_open_s"] > 0 and section["base"]["prepare"]["shards"] > 1
    if cores == "1,2":
        rows = section["cores"]["points"]
        assert [r["cores"] for r in rows] == [1, 2] and rows[0]["ray_efficiency"] == rows[0]["floor_efficiency"] == 1
        for r in rows:
            measured(r["ray"])
            measured(r["floor"])
            assert r["ray_efficiency"] > 0 and r["floor_efficiency"] > 0 and len(r["core_ids"]) == r["cores"]
        assert rows[1]["ray"] == section["base"]["ray"]  # the largest count's point is the base point

    shards = section["shards"]
    assert [r["requested"] for r in shards["points"]] == [2, 4]
    for r in shards["points"]:
        measured(r["ray"])
        assert abs(r["actual"] - r["requested"]) <= 1 and r["train_images"] == 24  # same images in every cut
        assert r["image_bytes"] == shards["points"][0]["image_bytes"] and r["dataset_open_s"] > 0
    assert set(shards["loglog_slope"]) == {"epoch_start_s", "time_to_first_batch_s", "dataset_open_s"}

    prefetch = section["prefetch"]["points"]
    assert [r["prefetch_batches"] for r in prefetch] == [1, 2]
    for r in prefetch:
        measured(r["ray"])
        assert r["object_store_peak_mib"] >= 0 and r["object_store_capacity_mib"] > 0
    assert prefetch[1]["ray"] == section["base"]["ray"]  # prefetch 2 is the default: the base point
