"""`bench data` section 4 (bench/variants.py): the stored variants are prepare's, sizes and rates come out
per variant, the cores-per-GPU arithmetic, and one-line errors for bad lists. Generated images only."""

import io
import math

import numpy as np
import pytest
from PIL import Image

from imagenet_ray.bench import variants
from imagenet_ray.errors import UserError


@pytest.fixture(scope="module")
def originals():
    """10 textured JPEGs with a longer side of 400-500 px (synth's images: stripes, a blob, noise)."""
    from imagenet_ray.data.synth import class_style, encode_jpeg, render_image

    rng = np.random.default_rng(0)
    return [encode_jpeg(render_image(class_style(i, 10), rng), grayscale=i == 3, quality=92) for i in range(10)]


def quantization(data):
    return Image.open(io.BytesIO(data)).quantization


def reference_quantization(quality):
    """The tables Pillow writes at `quality` (what normalize_for_storage's encoder uses)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="JPEG", quality=quality, subsampling=2)
    return quantization(buf.getvalue())


def test_each_variant_is_prepares_bytes_at_its_max_side_and_quality(originals):
    grid = variants.variant_grid((128, 256), (90, 95))
    assert [v.name for v in grid] == [
        "original",
        "max_side_128_q90",
        "max_side_128_q95",
        "max_side_256_q90",
        "max_side_256_q95",
    ]
    stored = variants.make_variants(originals, grid)
    assert stored["original"] == originals  # prepare keeps plain JPEGs byte-exact
    for v in grid[1:]:
        for src, data in zip(originals, stored[v.name], strict=True):
            img, source = Image.open(io.BytesIO(data)), Image.open(io.BytesIO(src))
            assert max(img.size) == v.max_side  # every source is larger: shrunk to exactly the max side
            assert img.size[0] / img.size[1] == pytest.approx(source.size[0] / source.size[1], rel=0.02)
            assert img.mode == source.mode  # grayscale stays grayscale
            expected = reference_quantization(v.quality)
            assert all(img.quantization[k] == expected[k] for k in img.quantization)


def test_bytes_per_image_fall_with_max_side_and_quality(originals):
    grid = variants.variant_grid((128, 192, 256, 384), (90, 95))
    stored = variants.make_variants(originals, grid)
    mean = {name: variants.sizes(datas)["mean_bytes"] for name, datas in stored.items()}
    for q in (90, 95):
        by_side = [mean[f"max_side_{m}_q{q}"] for m in (128, 192, 256, 384)]
        assert by_side == sorted(by_side) and len(set(by_side)) == 4
    for m in (128, 192, 256, 384):
        assert mean[f"max_side_{m}_q90"] < mean[f"max_side_{m}_q95"]
    s = variants.sizes(stored["original"])
    assert s["mb_per_imagenet"] == pytest.approx(s["mean_bytes"] * 1_281_167 / 1e6)
    assert 400 <= max(s["mean_width"], s["mean_height"]) <= 500


def test_measurement_gives_positive_finite_rates_for_every_variant(originals):
    import os

    from imagenet_ray.bench.data import format_report, run_variants

    grid = variants.variant_grid((96, 160), (90,))
    section = run_variants(
        originals,
        grid,
        core=max(os.sched_getaffinity(0)),
        crops=(64, 48),
        resize=72,
        eval_crop=64,
        batch=4,
        passes=2,
        gpu_rates={64: 1000.0},
    )
    assert section["reference"] == "max_side_160_q90" and section["train_crops"] == [64, 48]
    assert set(section["variants"]) == {v.name for v in grid}
    for row in section["variants"].values():
        rates = [row["train"]["64"], row["train"]["48"], row["eval"]]
        assert all(math.isfinite(r["best"]) and r["best"] > 0 and len(r["passes"]) == 2 for r in rates)
        assert row["cores_per_gpu"]["64"] == pytest.approx(1000.0 / row["train"]["64"]["best"])
        assert row["images"] == len(originals)
    original = section["variants"]["original"]
    assert original["vs_original"] == {"bytes": 1.0, "train_64": 1.0, "train_48": 1.0, "eval": 1.0}
    assert section["variants"]["max_side_160_q90"]["vs_reference"]["train_64"] == 1.0
    assert section["gpu_images_per_s"]["48"]["source"] == "∝ pixels from 64 px"
    text = format_report(
        {
            "machine": {"cpu_model": "x", "nproc": 2, "versions": {}},
            "images": {"count": 10, "folder": "f"},
            "variants": section,
        }
    )
    assert "4. stored variants" in text and "max_side_96_q90" in text


def test_cores_per_gpu_arithmetic():
    assert variants.cores_per_gpu(3000, 1500) == 2.0
    assert variants.cores_per_gpu(3000, 0) == math.inf
    given = variants.DEFAULT_GPU_IMAGES_PER_S
    assert given == {224: 3000.0, 160: 4500.0}
    assert variants.gpu_rate_at(224, given) == (3000.0, "given")
    # 192 px: time per image affine in pixels through 160 and 224 px
    rate, source = variants.gpu_rate_at(192, given)
    t160, t224 = 1 / 4500, 1 / 3000
    assert rate == pytest.approx(1 / (t160 + (t224 - t160) * (192**2 - 160**2) / (224**2 - 160**2)))
    assert 3000 < rate < 4500 and "160 and 224" in source
    assert variants.gpu_rate_at(112, {224: 3000.0}) == (12000.0, "∝ pixels from 224 px")

    # summarise: cores per GPU = G / the best train pass, per crop; ratios against both baselines
    grid = variants.variant_grid((256,), (90,))
    stored = {"original": [b"x" * 1000], "max_side_256_q90": [b"x" * 250]}
    timed = {}
    for name, rate in (("original", 500.0), ("max_side_256_q90", 1500.0)):
        for preset, k in (("train224", 1.0), ("train160", 1.2), ("eval", 0.8)):
            timed[variants.side_name(name, preset)] = {"best": rate * k, "passes": [rate * k]}
    table = variants.summarise(grid, stored, timed, (224, 160), given)
    small = table["variants"]["max_side_256_q90"]
    assert small["cores_per_gpu"] == {"224": 2.0, "160": pytest.approx(4500 / 1800)}
    assert small["vs_original"] == pytest.approx({"bytes": 0.25, "train_224": 3.0, "train_160": 3.0, "eval": 3.0})
    assert table["variants"]["original"]["vs_reference"]["train_224"] == pytest.approx(1 / 3)
    assert small["kb_per_image"] == 0.25 and small["mb_per_imagenet"] == pytest.approx(250 * 1_281_167 / 1e6)


def test_defaults_and_reference():
    grid = variants.variant_grid(variants.DEFAULT_MAX_SIDES, variants.DEFAULT_QUALITIES)
    assert len(grid) == 11 and grid[0].name == "original"
    assert variants.reference_variant(grid).name == "max_side_512_q90"
    assert variants.train_crops(224) == (224, 192, 160) and variants.train_crops(160) == (160, 192)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--variants", "256,abc"], "--variants '256,abc': not a comma-separated list of integers ≥ 1"),
        (["--variants", "256,0"], "--variants '256,0': 0 is out of range"),
        (["--variant-qualities", "90,101"], "--variant-qualities '90,101': 101 is out of range (each must be 1..100)"),
        (["--variant-gpu-rates", "224:3000"], "--variant-gpu-rates '224:3000': expected CROP=IMAGES_PER_S"),
        (["--variant-gpu-rates", "224=-1"], "--variant-gpu-rates '224=-1': '224=-1' needs a crop ≥ 1 and a rate > 0"),
    ],
)
def test_bad_lists_are_one_line_errors_naming_the_argument(tmp_path, argv, message):
    from imagenet_ray.bench.data import main

    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        main(["--images", str(tmp_path), "--skip-kernel", "--skip-e2e", "--skip-gpu", *argv])
    assert "\n" not in str(err.value)


def test_parsed_lists_keep_order_once():
    assert variants.parse_int_list("512,256,512", "--variants", 1) == (512, 256)
    assert variants.parse_gpu_rates("224=3000,160=4500.5") == {224: 3000.0, 160: 4500.5}
