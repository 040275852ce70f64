"""`imagenet-ray predict` on a local Ray: a folder with broken files (every input a row, the broken ones listed,
top-1 as the model gives it in this process), a raw ILSVRC layout with a training checkpoint, and
`bench predict` on the same tiny folder."""

import json

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from imagenet_ray.cli import main
from imagenet_ray.config import load_config, to_yaml
from imagenet_ray.data.layouts import detect_and_list
from imagenet_ray.data.synth import class_style, encode_jpeg, render_image
from imagenet_ray.data.transforms import eval_image
from imagenet_ray.predict import MARKER_NAME, PredictRequest, run_predict
from imagenet_ray.train.checkpoint import write_checkpoint_dir
from imagenet_ray.train.device import to_model_input
from imagenet_ray.train.models import build_model

pytestmark = pytest.mark.ray

WNIDS = ["n01440764", "n01443537", "n01484850"]
NAMES = ["tench", "goldfish", "great white shark"]
RESIZE, CROP = 40, 32


def _model(num_classes=3):
    torch.manual_seed(0)
    return build_model("resnet18", num_classes).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A logged-model directory as imagenet_ray.lifecycle writes it: weights.pt + meta.json."""
    root = tmp_path_factory.mktemp("model")
    torch.save(_model().state_dict(), root / "weights.pt")
    meta = {"architecture": "resnet18", "num_classes": 3, "blurpool": False, "wnids": WNIDS, "names": NAMES}
    meta |= {"resize": RESIZE, "crop": CROP, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """9 JPEGs (3 in a subfolder, one grayscale), one file that is no image, one truncated JPEG, one text file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    good = {}
    for i in range(9):
        key = f"sub/img_{i}.jpg" if i % 3 == 0 else f"img_{i}.jpg"
        good[key] = encode_jpeg(render_image(class_style(i % 3, 3), rng), grayscale=i == 4)
    files = dict(good)
    files["broken.jpg"] = b"this is not an image"
    files["cut.JPEG"] = good["img_1.jpg"][: len(good["img_1.jpg"]) // 3]
    files["notes.txt"] = b"not listed: not an image by name"
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    return root, good, {"broken.jpg", "cut.JPEG"}


def _top1_in_process(data: bytes) -> int:
    image = torch.from_numpy(eval_image(data, RESIZE, CROP))[None]
    with torch.inference_mode():
        return int(_model()(to_model_input(image)).argmax(1))


def test_folder_every_file_is_a_row_broken_ones_listed_top1_as_in_process(
    local_ray, model_dir, image_folder, tmp_path, capsys
):
    root, good, broken = image_folder
    out = tmp_path / "out"
    argv = ["predict", "--model", str(model_dir), "--images", str(root), "--out", str(out), "--workers", "1"]
    assert main([*argv, "--batch-size", "4"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("predicted 9 of 11 images, 2 broken") and str(out) in line, line

    table = pads.dataset(str(out), format="parquet").to_table()  # readers skip _SUCCESS and _tmp-*
    rows = {r["key"]: r for r in table.to_pylist()}
    assert table.num_rows == len(rows) == len(good) + len(broken)  # rows + broken == inputs, each once
    assert {k for k, r in rows.items() if r["error"] is not None} == broken
    for key in broken:
        assert rows[key]["top5_index"] is None and rows[key]["top5_prob"] is None and rows[key]["error"]
    for key, data in good.items():
        row = rows[key]
        assert row["error"] is None and len(row["top5_index"]) == 3  # 3 classes: top-3
        assert row["top5_index"][0] == _top1_in_process(data), key
        assert row["top5_wnid"] == [WNIDS[i] for i in row["top5_index"]]
        assert row["top5_name"] == [NAMES[i] for i in row["top5_index"]]
        assert row["top5_prob"] == sorted(row["top5_prob"], reverse=True) and sum(row["top5_prob"]) == pytest.approx(1)

    marker = json.loads((out / MARKER_NAME).read_text())
    assert (marker["images"], marker["predicted"], marker["broken"]) == (11, 9, 2)
    assert sorted(marker["broken_keys"]) == sorted(broken)
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(marker["files"])
    assert not list(out.glob("_tmp-*")), "the temporary prefix is gone"

    # A finished output is never overwritten.
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already holds finished predictions" in err


def test_raw_layout_val_split_with_a_training_checkpoint(local_ray, synth_raw, tmp_path):
    raw, summary = synth_raw
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    model = _model()
    cfg = load_config(None, ["model.name=resnet18", f"eval.resize={RESIZE}", f"eval.crop={CROP}"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    write_checkpoint_dir(
        ckpt, model=model, optimizer=optimizer, epoch=1, step=1, mlflow_run_id=None, config_yaml=to_yaml(cfg)
    )

    result = run_predict(PredictRequest(model=str(ckpt), images=str(raw), out=str(tmp_path / "out"), workers="1"))
    assert (result.images, result.broken) == (summary.val_images, 0)  # the val split by default
    table = pads.dataset(str(tmp_path / "out"), format="parquet").to_table()
    listing = detect_and_list(str(raw))
    assert sorted(table.column("key").to_pylist()) == sorted(r.key for r in listing.val)
    # A checkpoint's classes are named from the input's class list when it has as many classes.
    assert {w for ws in table.column("top5_wnid").to_pylist() for w in ws} <= set(listing.classes.wnids)


def test_bench_predict_measures_both_sides_on_the_same_input(local_ray, model_dir, image_folder, tmp_path, capsys):
    root, _, _ = image_folder
    out = tmp_path / "bench.json"
    argv = ["bench", "predict", "--images", str(root), "--model", str(model_dir), "--cores", "2"]
    assert main([*argv, "--rounds", "1", "--batch-size", "4", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert (res["images"], res["broken"], res["cores"], res["workers"]) == (11, 2, 2, 1)
    assert len(res["plain_images_per_s"]) == len(res["ray_images_per_s"]) == 1
    assert res["ratio"] == pytest.approx(res["ray_median"] / res["plain_median"]) and res["ratio"] > 0
    assert "ratio (Ray / plain)" in capsys.readouterr().out
