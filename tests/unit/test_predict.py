"""`predict`'s pure parts without Ray: decode with broken files kept, top-k, rows, accounting (rows + broken ==
inputs), the model from a logged-model directory and from a training checkpoint, the inputs it detects, the
output prefix it claims, and the CLI's one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from imagenet_ray.cli import main
from imagenet_ray.config import load_config, to_yaml
from imagenet_ray.data.classes import ClassList, imagenet_classes
from imagenet_ray.data.format import MANIFEST_FORMAT, SHARD_SCHEMA, shard_name, write_manifest
from imagenet_ray.data.synth import write_synthetic_imagenet
from imagenet_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_image
from imagenet_ray.errors import UserError
from imagenet_ray.predict import (
    MARKER_NAME,
    PREDICTION_SCHEMA,
    PipelineOptions,
    Predictor,
    account,
    claim_out,
    class_names_for,
    decode_batch,
    load_model_spec,
    model_input,
    open_inputs,
    parse_workers,
    predict_local,
    prediction_table,
    top_k,
)
from imagenet_ray.storage import resolve
from imagenet_ray.train.checkpoint import write_checkpoint_dir
from imagenet_ray.train.device import to_model_input
from imagenet_ray.train.models import build_model

WNIDS = ["n01440764", "n01443537", "n01484850"]
NAMES = ["tench", "goldfish", "great white shark"]


def _model(num_classes: int = 3, blurpool: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", num_classes, blurpool=blurpool).eval()


def _model_dir(root, **changes):
    """A logged-model directory as the lifecycle contract describes it: weights.pt + meta.json."""
    root.mkdir(parents=True, exist_ok=True)
    torch.save(_model().state_dict(), root / "weights.pt")
    meta = {
        "architecture": "resnet18",
        "num_classes": 3,
        "blurpool": False,
        "wnids": WNIDS,
        "names": NAMES,
        "resize": 40,
        "crop": 32,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "checkpoint_url": "s3://ckpt/x",
        "val_top1": 0.5,
        "val_top5": 1.0,
        "dataset_digest": "abc",
    }
    meta.update(changes)
    (root / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))
    return root


def _checkpoint(root, num_classes: int = 3, blurpool: bool = False):
    root.mkdir(parents=True, exist_ok=True)
    model = _model(num_classes, blurpool)
    overrides = ["model.name=resnet18", f"model.blurpool={str(blurpool).lower()}", "eval.resize=48", "eval.crop=40"]
    write_checkpoint_dir(
        root,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        epoch=3,
        step=30,
        mlflow_run_id=None,
        config_yaml=to_yaml(load_config(None, overrides)),
    )
    return root


# --- decode, top-k, rows, accounting ---------------------------------------------------------------------------


def test_decode_keeps_every_row_and_names_the_broken_ones(jpeg_bytes):
    good = jpeg_bytes(120, 90)
    batch = {"key": np.array(["a.jpg", "b.jpg", "c.jpg", "d.jpg"], dtype=object)}
    batch["image"] = np.array([good, b"garbage", good[: len(good) // 3], b""], dtype=object)
    out = decode_batch(batch, 40, 32)
    assert out["image"].shape == (4, 32, 32, 3) and out["image"].dtype == np.uint8
    assert list(out["key"]) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]  # never dropped, never reordered
    assert out["error"][0] == "" and all(out["error"][1:]), out["error"]
    np.testing.assert_array_equal(out["image"][0], eval_image(good, 40, 32))  # the project's kernel
    assert not out["image"][1:].any(), "a broken row is never filled with another image"


def test_top_k_is_softmax_sorted_descending():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, 0.0, 5.0, 1.0]])
    probs, indices = top_k(logits, 3)
    assert indices.tolist() == [[1, 2, 0], [2, 3, 0]] and indices.dtype == np.int64
    expected = torch.softmax(logits, 1).topk(3).values.numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-6)
    assert probs.dtype == np.float32 and (np.diff(probs, axis=1) <= 0).all()


def test_prediction_rows_null_for_broken_files():
    probs = np.array([[0.7, 0.2], [0.6, 0.3]], np.float32)
    indices = np.array([[2, 0], [1, 2]])
    table = prediction_table(["a", "b", "c"], ["", "cannot decode image", ""], probs, indices, WNIDS, NAMES)
    assert table.schema == PREDICTION_SCHEMA
    rows = table.to_pylist()
    assert rows[0] == {
        "key": "a",
        "top5_index": [2, 0],
        "top5_wnid": [WNIDS[2], WNIDS[0]],
        "top5_name": [NAMES[2], NAMES[0]],
        "top5_prob": [pytest.approx(0.7), pytest.approx(0.2)],
        "error": None,
    }
    assert rows[1] == {
        "key": "b",
        "top5_index": None,
        "top5_wnid": None,
        "top5_name": None,
        "top5_prob": None,
        "error": "cannot decode image",
    }
    assert rows[2]["top5_wnid"] == [WNIDS[1], WNIDS[2]]
    all_broken = prediction_table(
        ["x"], ["bad"], np.empty((0, 2), np.float32), np.empty((0, 2), np.int64), WNIDS, NAMES
    )
    assert all_broken.to_pylist()[0]["top5_index"] is None
    with pytest.raises(ValueError, match="2 predictions for 1 decoded rows"):
        prediction_table(["a", "b"], ["", "bad"], probs, indices, WNIDS, NAMES)


def test_accounting_rows_plus_broken_equals_inputs():
    predicted, broken = account(4, ["a", "b", "c", "d"], [None, "bad", None, "empty"])
    assert (predicted, broken) == (2, ["b", "d"])
    with pytest.raises(RuntimeError, match="3 rows, the input lists 4 images"):
        account(4, ["a", "b", "c"], [None] * 3)
    with pytest.raises(RuntimeError, match="repeat 1 keys"):
        account(3, ["a", "b", "a"], [None] * 3)


def test_workers_is_a_pool_size_or_a_range():
    assert parse_workers("3") == (3, 3) and parse_workers("1:8") == (1, 8)
    assert PipelineOptions(workers=2, max_workers=2).concurrency == 2
    assert PipelineOptions(workers=1, max_workers=8).concurrency == (1, 8)
    for bad in ("0", "4:2", "x", "1:"):
        with pytest.raises(UserError, match="--workers"):
            parse_workers(bad)


# --- the model ------------------------------------------------------------------------------------------------


def test_model_input_is_trainings_normalisation():
    images = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    x = model_input(images, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(x, to_model_input(images)) and x.is_contiguous(memory_format=torch.channels_last)


def test_logged_model_dir_predicts_as_the_model_does_in_process(tmp_path, jpeg_bytes):
    spec = load_model_spec(str(_model_dir(tmp_path / "model")))
    assert (spec.architecture, spec.num_classes, spec.resize, spec.crop) == ("resnet18", 3, 40, 32)
    assert spec.wnids == tuple(WNIDS) and spec.names == tuple(NAMES)
    data = [jpeg_bytes(120, 90), jpeg_bytes(64, 100, mode="L"), b"broken"]
    batch = decode_batch(
        {"key": np.array(["a", "b", "c"], dtype=object), "image": np.array(data, dtype=object)}, 40, 32
    )
    table = Predictor(spec)(batch)
    with torch.inference_mode():
        logits = _model()(to_model_input(torch.from_numpy(batch["image"][:2])))
    rows = table.to_pylist()
    assert [r["top5_index"][0] for r in rows[:2]] == logits.argmax(1).tolist()
    np.testing.assert_allclose([r["top5_prob"][0] for r in rows[:2]], torch.softmax(logits, 1).max(1).values, rtol=1e-5)
    assert rows[2]["error"] and rows[2]["top5_index"] is None


def test_logged_model_dir_that_is_wrong_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"meta\.json lacks crop"):
        load_model_spec(str(_model_dir(tmp_path / "a", crop=None)))
    with pytest.raises(UserError, match="must list 4 classes"):
        load_model_spec(str(_model_dir(tmp_path / "b", num_classes=4)))
    with pytest.raises(UserError, match="do not fit resnet34 with 3 classes"):
        load_model_spec(str(_model_dir(tmp_path / "c", architecture="resnet34")))
    broken = _model_dir(tmp_path / "d")
    (broken / "weights.pt").write_bytes(b"nope")
    with pytest.raises(UserError, match="not a PyTorch state dict"):
        load_model_spec(str(broken))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_a_logged_and_registered_model_loads_by_models_uri(tmp_path, monkeypatch):
    from imagenet_ray.lifecycle import log_classifier, register
    from imagenet_ray.tracking import RunSink

    monkeypatch.chdir(tmp_path)  # anything MLflow writes relative to the cwd lands here
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sink = RunSink.create(uri, "imagenet-ray", "train resnet18", params={"model.name": "resnet18"})
    config = {"model": {"name": "resnet18"}, "eval": {"resize": 40, "crop": 32}}
    state = {"model": _model().state_dict(), "epoch": 1, "config_yaml": yaml.safe_dump(config)}
    metrics = {"val/top1": 0.5, "val/top5": 1.0}
    model_uri = log_classifier(sink, state, name="best", wnids=WNIDS, val_metrics=metrics, dataset_digest=None)
    version = register(
        model_uri, "fish", tracking_uri=uri, run_id=sink.run_id, val_top1=0.5, val_top5=1.0, dataset_digest=None
    )
    sink.finish()
    for ref in (model_uri, f"models:/fish/{version}", f"runs:/{sink.run_id}/best"):
        spec = load_model_spec(ref, uri)
        assert (spec.architecture, spec.num_classes, spec.resize, spec.crop) == ("resnet18", 3, 40, 32), ref
        assert spec.wnids == tuple(WNIDS) and spec.names[0] == imagenet_classes().names[0]
        assert all(torch.equal(spec.state[k], v) for k, v in _model().state_dict().items())
    with pytest.raises(UserError, match="models:/fish/9"):
        load_model_spec("models:/fish/9", uri)


def test_training_checkpoint_gives_architecture_preset_and_the_inputs_class_names(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt", blurpool=True)
    classes = ClassList(tuple(WNIDS), tuple(NAMES))
    spec = load_model_spec(str(ckpt), classes=classes)
    assert (spec.architecture, spec.num_classes, spec.blurpool, spec.resize, spec.crop) == ("resnet18", 3, True, 48, 40)
    assert spec.wnids == tuple(WNIDS) and spec.names == tuple(NAMES)
    # without a class list of its size: placeholders
    other = load_model_spec(str(ckpt), classes=ClassList(("n01440764",), ("tench",)))
    assert other.wnids == other.names == ("class_0", "class_1", "class_2")
    with pytest.raises(UserError, match="not found"):
        load_model_spec(str(tmp_path / "missing"))


def test_class_names_for_a_1000_class_checkpoint_are_ilsvrc2012s():
    wnids, names, where = class_names_for(1000, None)
    assert wnids == imagenet_classes().wnids and names[0] == imagenet_classes().names[0] and "ILSVRC2012" in where


# --- inputs and output -------------------------------------------------------------------------------------------


def _folder(root, jpeg_bytes):
    for rel, data in {
        "a.jpg": jpeg_bytes(),
        "sub/b.PNG": b"not really a png",
        "sub/c.JPEG": jpeg_bytes(80, 80),
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "notes.txt").write_text("skipped")
    (root / ".hidden.jpg").write_bytes(b"skipped")
    return root


def test_a_plain_folder_lists_image_files_by_name_and_reads_them_without_ray(tmp_path, jpeg_bytes):
    inputs = open_inputs(str(_folder(tmp_path / "images", jpeg_bytes)))
    assert (inputs.kind, inputs.count, inputs.skipped, inputs.split) == ("folder", 3, 2, None)
    keys = [k for b in inputs.local_batches(2) for k in b["key"]]
    assert keys == ["a.jpg", "sub/b.PNG", "sub/c.JPEG"]
    spec = load_model_spec(str(_model_dir(tmp_path / "model")))
    table = predict_local(inputs, spec, batch_size=2)
    assert table.num_rows == 3 and table.column("error").to_pylist()[1] is not None
    with pytest.raises(UserError, match="plain folder of images, it has no splits"):
        open_inputs(str(tmp_path / "images"), split="val")
    with pytest.raises(UserError, match="no image files there"):
        open_inputs(str(tmp_path / "images" / "notes.txt"))
    single = open_inputs(str(tmp_path / "images" / "sub" / "c.JPEG"))  # one file: a folder of one
    assert (single.kind, single.count, [k for b in single.local_batches(4) for k in b["key"]]) == (
        "folder",
        1,
        ["c.JPEG"],
    )


def test_a_prepared_dataset_predicts_its_val_split(tmp_path, jpeg_bytes):
    root = tmp_path / "prepared"
    rows = [
        {"image": jpeg_bytes(), "label": i, "wnid": WNIDS[i], "key": f"val/{i}.JPEG", "height": 90, "width": 120}
        for i in range(3)
    ]
    shard = shard_name("val", 0, 1)
    (root / "val").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, SHARD_SCHEMA), root / shard)
    manifest = {"format": MANIFEST_FORMAT, "classes": WNIDS, "class_names": NAMES}
    manifest["splits"] = {"val": {"num_images": 3, "shards": [{"path": shard}]}}
    write_manifest(resolve(str(root)), manifest)
    inputs = open_inputs(str(root))
    assert (inputs.kind, inputs.split, inputs.count) == ("prepared", "val", 3)
    assert inputs.classes == ClassList(tuple(WNIDS), tuple(NAMES))
    assert [k for b in inputs.local_batches(2) for k in b["key"]] == ["val/0.JPEG", "val/1.JPEG", "val/2.JPEG"]
    with pytest.raises(UserError, match="has no train split"):
        open_inputs(str(root), split="train")


def test_a_raw_layout_is_detected_and_a_broken_one_says_how_to_read_it_as_a_folder(tmp_path):
    raw = tmp_path / "raw"
    write_synthetic_imagenet(str(raw), num_classes=2, train_per_class=1, val_per_class=2, seed=0)
    inputs = open_inputs(str(raw))
    assert (inputs.kind, inputs.split, inputs.count) == ("raw", "val", 4)
    assert len(inputs.classes) == 2
    assert open_inputs(str(raw), split="train").count == 2
    assert open_inputs(str(raw), source="folder").count == 6  # every image file, train and val
    (raw / "LOC_val_solution.csv").unlink()  # still looks like Kaggle's layout, but is not a whole one
    with pytest.raises(UserError, match="pass --source folder"):
        open_inputs(str(raw))


def test_out_is_claimed_only_when_new_empty_or_left_by_an_unfinished_run(tmp_path):
    out = tmp_path / "out"
    claim_out(resolve(str(out)))  # new
    (out / "_tmp-abc").mkdir(parents=True)
    (out / "_tmp-abc" / "predictions_x_000000.parquet").write_bytes(b"partial")
    (out / "predictions_y_000001.parquet").write_bytes(b"moved before a crash")
    claim_out(resolve(str(out)))
    assert [p for p in out.rglob("*") if p.is_file()] == []  # leftovers of an unfinished run removed
    (out / MARKER_NAME).write_text("{}")
    with pytest.raises(UserError, match="already holds finished predictions"):
        claim_out(resolve(str(out)))
    (out / MARKER_NAME).unlink()
    (out / "mine.csv").write_text("a user's file")
    with pytest.raises(UserError, match="1 files that predict did not write"):
        claim_out(resolve(str(out)))
    assert (out / "mine.csv").exists()


# --- the CLI ------------------------------------------------------------------------------------------------------


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("imagenet-ray: error: ") and "\n" not in err, err
    return err


def test_cli_missing_images_is_one_line_exit_2(tmp_path, capsys):
    assert main(["predict", "--model", "x", "--out", str(tmp_path / "out")]) == 2
    assert "--images" in _one_line_error(capsys)


def test_cli_bad_model_refs_are_one_line_exit_1(tmp_path, capsys, monkeypatch, jpeg_bytes):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    images = str(_folder(tmp_path / "images", jpeg_bytes))
    out = str(tmp_path / "out")
    for ref, message in [
        (str(tmp_path / "no-such-checkpoint"), "not found"),
        ("models:/resnet@champion", "needs --mlflow-uri"),
        ("runs:/0123abcd", "needs --mlflow-uri"),
    ]:
        assert main(["predict", "--model", ref, "--images", images, "--out", out]) == 1, ref
        assert message in _one_line_error(capsys), ref
    assert not (tmp_path / "out").exists(), "nothing is written before the model loads"


def test_cli_missing_images_folder_is_one_line_exit_1(tmp_path, capsys):
    model = str(_model_dir(tmp_path / "model"))
    assert main(["predict", "--model", model, "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "nope" in _one_line_error(capsys)


def test_predict_help_says_val_is_the_default_split(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert "default: val" in capsys.readouterr().out
