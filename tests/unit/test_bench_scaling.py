"""`bench data` section 5 (bench/scaling.py) without Ray: its flags, one-line errors for bad ones, the efficiency and
slope arithmetic, shard targets cut by prepare's own planner, and the report and PNG made from a fake section."""

import argparse
import math
import os

import pytest

from imagenet_ray.bench import scaling
from imagenet_ray.errors import UserError

ALLOWED = len(os.sched_getaffinity(0))


def options(*argv):
    from imagenet_ray.bench.data import add_bench_data_args

    args = add_bench_data_args(argparse.ArgumentParser()).parse_args(["--images", "x", *argv])
    return scaling.scaling_options(args)


def test_one_core_count_is_the_e2e_count_and_no_section():
    assert options("--cores", "1") == {"cores": 1, "scaling": None}
    if ALLOWED >= 2:
        assert options() == {"cores": 2, "scaling": None}  # the default, as before


def test_a_core_list_runs_the_section_and_e2e_takes_the_largest():
    if ALLOWED < 2:
        pytest.skip("needs 2 allowed cores")
    out = options("--cores", "2,1,2", "--shard-counts", "64,16", "--prefetch", "4,1", "--plot", "s.png")
    assert out["cores"] == 2
    assert out["scaling"] == scaling.ScalingPlan((1, 2), (16, 64), (1, 4), "s.png")
    assert out["scaling"].cores_sweep and out["scaling"].wanted


def test_shard_or_prefetch_sweeps_alone_run_on_the_one_count():
    plan = options("--cores", "1", "--prefetch", "1,2")["scaling"]
    assert plan == scaling.ScalingPlan((1,), (), (1, 2), None)
    assert not plan.cores_sweep and plan.wanted


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cores", "0"], "--cores '0': 0 is out of range"),
        (["--cores", "1,x"], "--cores '1,x': not a comma-separated list of integers"),
        (["--cores", str(ALLOWED + 1)], f"--cores '{ALLOWED + 1}': {ALLOWED + 1} is more than the {ALLOWED} cores"),
        (["--shard-counts", "0"], "--shard-counts '0': 0 is out of range"),
        (["--shard-counts", "16,many"], "--shard-counts '16,many': not a comma-separated list"),
        (["--prefetch", "-1"], "--prefetch '-1': -1 is out of range"),
        (["--cores", "1", "--plot", "s.png"], "--plot s.png: nothing to plot without --cores N,N,..."),
    ],
)
def test_bad_flags_are_one_line_user_errors_naming_flag_and_value(argv, message):
    with pytest.raises(UserError) as err:
        options(*argv)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_more_shards_than_images_is_refused_before_any_work():
    scaling.check_shard_counts((16, 64), 64)
    with pytest.raises(UserError, match=r"--shard-counts 16,1024: 1024 is more than the 200 train images"):
        scaling.check_shard_counts((16, 1024), 200)


def test_efficiency_is_against_linear_from_the_smallest_count():
    assert scaling.efficiencies({1: 100.0, 2: 180.0, 4: 400.0}) == {1: 1.0, 2: 0.9, 4: 1.0}
    assert scaling.efficiencies({2: 200.0, 4: 300.0}) == {2: 1.0, 4: 0.75}  # per core from n_min = 2
    assert scaling.efficiencies({1: 0.0, 2: 5.0}) == {1: 0.0, 2: 0.0}  # no rate at n_min: no ratio


def test_loglog_slope_reads_the_growth_order():
    xs = [16, 64, 256, 1024]
    assert scaling.loglog_slope(xs, [3 * x for x in xs]) == pytest.approx(1.0)
    assert scaling.loglog_slope(xs, [x**2 / 100 for x in xs]) == pytest.approx(2.0)
    assert scaling.loglog_slope(xs, [1.5] * 4) == pytest.approx(0.0, abs=1e-12)
    assert scaling.loglog_slope(xs, [1.0 + x / 1000 for x in xs]) < 1  # a fixed part plus a linear one
    assert scaling.loglog_slope([16], [1.0]) is None and scaling.loglog_slope([16, 16], [1.0, 2.0]) is None
    assert scaling.per_unit_cost(xs, [0.5 + 0.002 * x for x in xs]) == pytest.approx(0.002)
    assert scaling.per_unit_cost([4], [1.0]) is None


def test_shard_target_gives_the_requested_count_with_prepares_own_cut():
    from imagenet_ray.data.layouts import ImageRecord
    from imagenet_ray.data.prepare import plan_shards

    sizes = [1000 + (i * 7919) % 90_000 for i in range(500)]  # uneven images, as ImageNet's
    records = tuple(ImageRecord(key=f"k{i}", wnid="n00000000", label=0, size=s) for i, s in enumerate(sizes))
    for count in (1, 2, 16, 64, 500):
        target = scaling.target_bytes_for(records, count, seed=0)
        assert len(plan_shards(records, target, 0)) == count
        assert target == 1 or len(plan_shards(records, target - 1, 0)) > count  # the smallest such target
    # At ~2 images per shard this cut jumps from 257 to 255 shards: the nearest count is taken.
    assert abs(len(plan_shards(records, scaling.target_bytes_for(records, 256, seed=0), 0)) - 256) == 1
    naive = sum(sizes) // 16  # total / count: the greedy cut leaves each shard short, one shard more
    assert len(plan_shards(records, naive, 0)) > 16


def fake_side(rate, start=0.4, first=2.0, peak=100.0):
    return {
        "images_per_s": rate,
        "in_epoch_images_per_s": rate * 1.1,
        "epoch_start_s": start,
        "time_to_first_batch_s": first,
        "dataset_open_s": 0.05,
        "object_store": {"peak_used_mib": peak, "capacity_mib": 2000.0, "spilled_mib": 0.0},
    }


def fake_section(parts=("cores", "shards", "prefetch")):
    points = {
        1: {"ray": fake_side(300.0), "floor": fake_side(400.0)},
        2: {"ray": fake_side(550.0), "floor": fake_side(790.0)},
    }
    prep = {"shard_mb": 1.0, "shard_bytes_mean": 2**20, "total_bytes": 64 * 2**20, "prepare_s": 3.0}
    prep |= {"train_images": 10_000, "image_bytes": 63 * 2**20}
    runs = [
        (c, dict(prep, shards=c), fake_side(500.0, start=0.3 + c / 1000, first=1.0 + c / 500)) for c in (16, 64, 256)
    ]
    section = {
        "settings": {"images_per_epoch": 10_000, "epochs": 3, "batch_size": 64},
        "cores": scaling.cores_sweep(points, [0, 1]),
        "shards": scaling.shard_sweep(2, runs),
        "prefetch": {
            "cores": 2,
            "object_store_limit_mib": None,
            "points": [
                {
                    "prefetch_batches": p,
                    "object_store_peak_mib": 50.0 * p,
                    "object_store_capacity_mib": 2000.0,
                    "spilled_mib": 0.0,
                    "images_per_s": 500.0,
                }
                for p in (1, 2, 4)
            ],
        },
    }
    return {k: v for k, v in section.items() if k == "settings" or k in parts}


def test_sweeps_summarise_rates_efficiency_and_slopes():
    section = fake_section()
    rows = section["cores"]["points"]
    assert [r["cores"] for r in rows] == [1, 2] and section["cores"]["counts"] == [1, 2]
    assert rows[1]["ray_efficiency"] == pytest.approx(550 / 600) and rows[1]["floor_efficiency"] == pytest.approx(
        790 / 800
    )
    assert rows[1]["core_ids"] == [0, 1]
    shards = section["shards"]
    assert [(r["requested"], r["actual"]) for r in shards["points"]] == [(16, 16), (64, 64), (256, 256)]
    slope = shards["loglog_slope"]
    assert 0 < slope["epoch_start_s"] < 1 and slope["dataset_open_s"] == pytest.approx(0.0, abs=1e-12)
    assert shards["ms_per_shard"]["epoch_start_s"] == pytest.approx(1.0)
    assert shards["ms_per_shard"]["time_to_first_batch_s"] == pytest.approx(2.0)


def test_text_report_has_a_table_per_sweep():
    from imagenet_ray.bench.data import format_report

    report = {
        "machine": {"cpu_model": "cpu", "nproc": 2, "versions": {}},
        "images": {"count": 3, "folder": "f"},
        "scaling": fake_section() | {"plot": "s.png"},
    }
    text = format_report(report)
    for needle in (
        "5. scaling",
        "Ray img/s",
        "efficiency",
        "epoch_start_s vs shards: log-log slope",
        "at most linear",
        "store peak MiB",
        "object-store limit: unset",
        "plot: s.png",
    ):
        assert needle in text
    only = "\n".join(scaling.format_scaling(fake_section(("prefetch",))))
    assert "prefetch" in only and "Ray img/s" not in only and "slope" not in only


@pytest.mark.parametrize("parts", [("cores", "shards", "prefetch"), ("shards",), ("cores", "prefetch")])
def test_plot_writes_a_png_with_a_panel_per_sweep(tmp_path, parts):
    path = tmp_path / "sub" / "scaling.png"
    scaling.plot_scaling(fake_section(parts), str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width = int.from_bytes(data[16:20], "big")  # the IHDR chunk: one 5-inch panel per sweep at 110 dpi
    assert math.isclose(width, 550 * len(parts), rel_tol=0.05)


def test_plot_without_a_sweep_is_refused(tmp_path):
    with pytest.raises(UserError, match="nothing to plot"):
        scaling.plot_scaling(fake_section(()), str(tmp_path / "s.png"))
    assert not (tmp_path / "s.png").exists()


def test_too_many_shards_or_a_ray_in_this_process_stop_the_bench_before_any_section(tmp_path, monkeypatch):
    import numpy as np
    import ray
    from PIL import Image

    from imagenet_ray.bench.data import run_data_bench

    for i in range(3):
        Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(tmp_path / f"n01440764_{i}.JPEG")
    plan = scaling.ScalingPlan((1,), shard_counts=(4, 7))
    with pytest.raises(UserError, match=r"--shard-counts 4,7: 7 is more than the 6 train images"):
        run_data_bench(str(tmp_path), repeat=2, kernel=True, e2e=True, gpu=True, variants=True, scaling=plan)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # e.g. the caller's ray.init
    with pytest.raises(UserError, match="the scaling section starts its own Ray; this process has one"):
        run_data_bench(
            str(tmp_path), repeat=2, kernel=True, e2e=True, gpu=True, scaling=scaling.ScalingPlan((1,), (4,))
        )
