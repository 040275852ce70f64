"""The trained model's life in MLflow (imagenet_ray.lifecycle) against a local sqlite store: the logged pyfunc
predicts like the eval path in a process that never imports imagenet_ray, the contract files, registration,
the `champion` alias and model references."""

from __future__ import annotations

import ast
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from imagenet_ray.data.classes import imagenet_classes
from imagenet_ray.data.transforms import eval_image
from imagenet_ray.errors import UserError
from imagenet_ray.lifecycle import (
    CHAMPION_ALIAS,
    checkpoint_url_for,
    classifier_meta,
    download_model,
    log_classifier,
    meta_path,
    package,
    promote_if_better,
    read_meta,
    register,
    registry,
    resolve_model_reference,
    serving_model,
    weights_path,
)
from imagenet_ray.tracking import RunSink
from imagenet_ray.train.device import to_model_input
from imagenet_ray.train.models import build_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # sqlalchemy deprecations inside mlflow

RESIZE, CROP, NUM_CLASSES, EPOCH, STEP = 36, 32, 10, 2, 40
WNIDS = list(imagenet_classes().wnids[:NUM_CLASSES])
CHECKPOINT = "s3://bucket/runs/r1/checkpoint_000002"


def _pixels(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth colours plus a little noise: something for JPEG to compress, and classes to differ on."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(seed)
    base = np.stack([128 + 100 * np.sin(xs / (5 + seed)), 128 + 90 * np.cos(ys / 7), xs / width * 200], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _encode(arr: np.ndarray, fmt: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _state(model: torch.nn.Module, blurpool: bool = False) -> dict:
    config = {"model": {"name": "resnet18", "blurpool": blurpool}, "eval": {"resize": RESIZE, "crop": CROP}}
    return {"model": model.state_dict(), "epoch": EPOCH, "step": STEP, "config_yaml": yaml.safe_dump(config)}


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """One training run with one logged model ("best"), shared by the tests below (logging is the slow part)."""
    root = tmp_path_factory.mktemp("lifecycle")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # anything MLflow would write relative to the cwd lands here, not in the repository
        uri = f"sqlite:///{root}/mlflow.db"
        sink = RunSink.create(uri, "imagenet-ray", "train resnet18", params={"model.name": "resnet18"})
        sink.log_metrics({"val/top1": 0.31, "val/top5": 0.72, "epoch": EPOCH}, step=STEP)  # the global step
        torch.manual_seed(0)
        model = build_model("resnet18", NUM_CLASSES).eval()
        with torch.no_grad():  # BatchNorm running stats away from identity: a real eval-mode network
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
        state = _state(model)
        model_uri = log_classifier(
            sink,
            state,
            name="best",
            wnids=WNIDS,
            val_metrics={"val/top1": 0.31, "val/top5": 0.72},
            dataset_digest="val-a",
            dataset_name="prepared/val",
            checkpoint_url=CHECKPOINT,
        )
        yield {"uri": uri, "sink": sink, "model": model, "state": state, "model_uri": model_uri, "root": root}


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _project_logits(model: torch.nn.Module, images: list[bytes]) -> torch.Tensor:
    """The project's own eval path: the eval preset's kernel, training's normalisation, fp32 on the CPU."""
    batch = torch.from_numpy(np.stack([eval_image(data, RESIZE, CROP) for data in images]))
    with torch.inference_mode():
        return model.eval()(to_model_input(batch)).float()


# -- the served model ------------------------------------------------------------------------------


def test_serving_file_is_self_contained_and_shares_the_contract_names():
    tree = ast.parse(Path(serving_model.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] == "imagenet_ray"}
    assert {m.split(".")[0] for m in imported} <= {"__future__", "base64", "binascii", "io", "json", "pathlib"} | {
        "typing",
        "mlflow",
        "numpy",
        "pandas",
        "torch",
        "torchvision",
        "PIL",
    }
    for name in ("WEIGHTS_ARTIFACT", "META_ARTIFACT", "WEIGHTS_FILE", "META_FILE", "IMAGE_COLUMN"):
        assert getattr(serving_model, name) == getattr(package, name), name
    assert serving_model.INCLUDE_LOGITS_PARAM == package.INCLUDE_LOGITS_PARAM


@pytest.mark.parametrize(
    "width, height, fmt, mode",
    [
        (48, 40, "JPEG", "RGB"),  # whole decode
        (100, 80, "JPEG", "RGB"),  # shorter side ≥ 2 x resize: decoded at 1/2 in the DCT
        (333, 160, "JPEG", "RGB"),  # 1/4
        (90, 120, "JPEG", "L"),  # grayscale, portrait
        (80, 96, "JPEG", "CMYK"),  # Pillow's path in both (no DCT downscale)
        (70, 50, "PNG", "RGBA"),
    ],
)
def test_served_preprocessing_is_the_eval_preset_pixel_for_pixel(width, height, fmt, mode):
    data = _encode(_pixels(width, height, seed=width), fmt, mode)
    served = serving_model.eval_input(data, RESIZE, CROP).numpy()
    assert served.shape == (CROP, CROP, 3)
    np.testing.assert_array_equal(served, eval_image(data, RESIZE, CROP))


def test_served_pixels_input_is_resized_like_the_same_image_encoded():
    arr = _pixels(50, 40, seed=3)
    expected = eval_image(_encode(arr, "PNG"), RESIZE, CROP)  # PNG: the decode gives back `arr` exactly
    np.testing.assert_array_equal(serving_model.eval_input(arr, RESIZE, CROP).numpy(), expected)
    np.testing.assert_array_equal(serving_model.eval_input(arr.tolist(), RESIZE, CROP).numpy(), expected)
    gray = arr[:, :, 0]
    np.testing.assert_array_equal(
        serving_model.eval_input(gray, RESIZE, CROP).numpy(), eval_image(_encode(gray, "PNG"), RESIZE, CROP)
    )
    with pytest.raises(ValueError, match="uint8"):
        serving_model.eval_input(arr.astype(np.float32) / 255, RESIZE, CROP)
    with pytest.raises(ValueError, match="cannot decode"):
        serving_model.eval_input(b"not an image", RESIZE, CROP)


def test_blurpool_replica_gives_the_training_models_logits():
    torch.manual_seed(1)
    model = build_model("resnet18", NUM_CLASSES, blurpool=True).eval()
    meta = classifier_meta(
        _state(model, blurpool=True), WNIDS, val_metrics={}, dataset_digest=None, checkpoint_url=None
    )
    served = serving_model.build_classifier(meta, model.state_dict())
    assert meta["blurpool"] and sum(isinstance(m, serving_model.BlurPool) for m in served.modules()) > 0
    x = torch.randn(2, 3, CROP, CROP)
    with torch.inference_mode():
        torch.testing.assert_close(served(x), model(x), rtol=0, atol=0)


def test_logged_model_predicts_like_the_eval_path_in_a_process_without_imagenet_ray(logged, tmp_path):
    images = [
        _encode(_pixels(48, 40, 1), "JPEG"),
        _encode(_pixels(100, 80, 2), "JPEG"),
        _encode(_pixels(90, 120, 4), "JPEG", "L"),
        _encode(_pixels(64, 64, 5), "PNG"),
    ]
    pixels = _pixels(50, 40, seed=6)
    for i, data in enumerate(images):
        (tmp_path / f"{i}.img").write_bytes(data)
    np.save(tmp_path / "pixels.npy", pixels)
    script = tmp_path / "load_and_predict.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, sys
            from pathlib import Path
            import mlflow, numpy as np, pandas as pd

            here = Path(sys.argv[1])
            model = mlflow.pyfunc.load_model(sys.argv[2])
            images = [(here / f"{i}.img").read_bytes() for i in range(int(sys.argv[3]))]
            out = model.predict(pd.DataFrame({"image": images}), params={"include_logits": True})
            as_dict = model.predict({"image": images[:1]})
            as_pixels = model.predict(pd.DataFrame({"image": [np.load(here / "pixels.npy")]}))
            print(json.dumps({
                "imagenet_ray_modules": sorted(m for m in sys.modules if m.split(".")[0] == "imagenet_ray"),
                "columns": list(out.columns),
                "top1": out["top1_index"].tolist(),
                "top1_wnid": out["top1_wnid"].tolist(),
                "top5": out["top5_index"].tolist(),
                "prob_sums": [float(sum(p)) for p in out["top5_prob"]],
                "logits": out["logits"].tolist(),
                "dict_top1": as_dict["top1_index"].tolist(),
                "pixels_top1": as_pixels["top1_index"].tolist(),
                "inputs": model.metadata.get_input_schema().to_dict(),
            }))
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MLFLOW_TRACKING_URI=logged["uri"], MLFLOW_DISABLE_TELEMETRY="true")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), logged["model_uri"], str(len(images))],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["imagenet_ray_modules"] == []
    assert result["inputs"] == [{"type": "binary", "name": "image", "required": True}]

    expected = _project_logits(logged["model"], images)
    assert result["top1"] == expected.argmax(1).tolist()
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, rtol=1e-4, atol=1e-4)
    assert result["top5"] == expected.topk(5, dim=1).indices.tolist()
    assert result["top1_wnid"] == [WNIDS[i] for i in result["top1"]]
    assert all(0 < s <= 1 + 1e-6 for s in result["prob_sums"])
    assert result["dict_top1"] == result["top1"][:1]
    expected_pixels = _project_logits(logged["model"], [_encode(pixels, "PNG")])
    assert result["pixels_top1"] == expected_pixels.argmax(1).tolist()
    assert {"top1_index", "top1_name", "top1_prob", "top5_wnid", "top5_name"} <= set(result["columns"])


def test_model_files_signature_and_links_to_the_run(logged, tmp_path):
    import mlflow

    model_dir = download_model(logged["model_uri"], logged["uri"], tmp_path / "dl")
    assert model_dir == tmp_path / "dl" and (model_dir / "MLmodel").is_file()
    default_dir = download_model(f"runs:/{logged['sink'].run_id}/best", logged["uri"])
    assert (default_dir / "MLmodel").is_file() and logged["root"] not in default_dir.parents  # a copy
    shutil.rmtree(default_dir)
    meta = read_meta(model_dir)
    assert meta == {
        "architecture": "resnet18",
        "num_classes": NUM_CLASSES,
        "blurpool": False,
        "wnids": WNIDS,
        "names": [imagenet_classes().names[i] for i in range(NUM_CLASSES)],
        "resize": RESIZE,
        "crop": CROP,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "checkpoint_url": CHECKPOINT,
        "val_top1": 0.31,
        "val_top5": 0.72,
        "dataset_digest": "val-a",
    }
    weights = torch.load(weights_path(model_dir), weights_only=True)
    assert weights.keys() == logged["state"]["model"].keys()
    assert torch.equal(weights["fc.weight"], logged["state"]["model"]["fc.weight"])
    assert "imagenet" not in (model_dir / "requirements.txt").read_text().lower()

    signature = mlflow.models.Model.load(str(model_dir)).signature
    assert signature is not None and signature.inputs.input_names() == ["image"]
    assert {"top1_index", "top5_index", "top5_wnid", "top5_name", "top5_prob", "logits"} <= set(
        signature.outputs.input_names()
    )
    assert (model_dir / "serving_input_example.json").is_file()  # the input example: one JPEG, base64

    client = mlflow.MlflowClient(logged["uri"])
    model_id = logged["model_uri"].removeprefix("models:/")
    model = client.get_logged_model(model_id)
    assert (model.name, model.source_run_id, str(model.status)) == ("best", logged["sink"].run_id, "READY")
    assert model.tags[package.CHECKPOINT_URL_TAG] == CHECKPOINT
    assert {(m.key, m.value, m.step, m.dataset_digest) for m in model.metrics} == {
        ("val/top1", 0.31, STEP, "val-a"),
        ("val/top5", 0.72, STEP, "val-a"),
    }
    outputs = client.get_run(logged["sink"].run_id).outputs.model_outputs
    assert [(o.model_id, o.step) for o in outputs] == [(model_id, STEP)]


def test_served_model_handles_empty_input_and_names_the_bad_row(logged, tmp_path):
    import pandas as pd

    model_dir = download_model(logged["model_uri"], logged["uri"], tmp_path / "dl")
    context = SimpleNamespace(
        artifacts={"meta": str(meta_path(model_dir)), "weights": str(weights_path(model_dir))},
        model_config={"device": "cpu", "batch_size": 2},
    )
    served = serving_model.ImageClassifier()
    served.load_context(context)
    empty = served.predict(context, pd.DataFrame({"image": []}))
    assert len(empty) == 0 and "top5_index" in empty.columns
    images = [_encode(_pixels(40, 40, i), "JPEG") for i in range(3)]  # two batches of batch_size 2
    assert served.predict(context, pd.DataFrame({"image": images}))["top1_index"].tolist() == (
        _project_logits(logged["model"], images).argmax(1).tolist()
    )
    with pytest.raises(ValueError, match="image row 2: cannot decode"):
        served.predict(context, pd.DataFrame({"image": [*images[:2], b"garbage"]}))


def test_log_classifier_refuses_a_class_list_that_does_not_fit(logged):
    with pytest.raises(UserError, match="do not fit resnet18 with 9 classes"):
        log_classifier(
            logged["sink"], logged["state"], name="final", wnids=WNIDS[:9], val_metrics={}, dataset_digest=None
        )


# -- registry, champion, references ----------------------------------------------------------------


def test_champion_moves_only_on_a_better_val_top1_on_the_same_val_set(logged):
    uri, run_id, model_uri = logged["uri"], logged["sink"].run_id, logged["model_uri"]

    def new_version(top1: float, digest: str | None) -> str:
        return register(
            model_uri, "clf", tracking_uri=uri, run_id=run_id, val_top1=top1, val_top5=0.9, dataset_digest=digest
        )

    v1 = new_version(0.50, "val-a")
    first = promote_if_better("clf", v1, tracking_uri=uri)
    assert (first.moved, first.previous_version, first.alias) == (True, None, CHAMPION_ALIAS)
    assert "no champion" in first.line()

    v2 = new_version(0.40, "val-a")
    worse = promote_if_better("clf", v2, tracking_uri=uri)
    assert (worse.moved, worse.previous_version) == (False, v1)
    assert "does not beat" in worse.reason and "\n" not in worse.line()

    v3 = new_version(0.60, "val-a")
    better = promote_if_better("clf", v3, tracking_uri=uri)
    assert (better.moved, better.previous_version, better.version) == (True, v1, v3)

    v4 = new_version(0.99, "val-b")
    other_set = promote_if_better("clf", v4, tracking_uri=uri)
    assert (other_set.moved, other_set.previous_version) == (False, v3)
    assert "val-b" in other_set.reason and "val-a" in other_set.reason

    assert not promote_if_better("clf", v3, tracking_uri=uri).moved  # already the champion

    champion = resolve_model_reference("models:/clf@champion", uri)
    assert (champion.registered_name, champion.version, champion.val_top1) == ("clf", v3, 0.60)
    assert champion.model_uri == model_uri and champion.run_id == run_id
    assert champion.checkpoint_url == CHECKPOINT and champion.dataset_digest == "val-a"
    assert champion.tags[registry.TRAINING_RUN_TAG] == run_id
    assert resolve_model_reference(f"models:/clf/{v2}", uri).val_top1 == 0.40


def test_references_resolve_to_the_checkpoint(logged):
    uri, run_id, model_uri = logged["uri"], logged["sink"].run_id, logged["model_uri"]
    version = register(
        model_uri, "refs", tracking_uri=uri, run_id=run_id, val_top1=0.3, val_top5=0.7, dataset_digest="val-a"
    )
    promote_if_better("refs", version, tracking_uri=uri, alias="staging")
    for ref in ("models:/refs@staging", f"models:/refs/{version}", model_uri, f"runs:/{run_id}/best"):
        assert checkpoint_url_for(ref, uri) == CHECKPOINT, ref
    by_run = resolve_model_reference(f"runs:/{run_id}/best", uri)
    assert (by_run.model_uri, by_run.val_top1, by_run.dataset_digest) == (model_uri, 0.31, "val-a")


def test_an_old_style_version_whose_source_is_the_checkpoint_still_resolves(logged):
    import mlflow

    client = mlflow.MlflowClient(logged["uri"], registry_uri=logged["uri"])
    client.create_registered_model("legacy")
    client.create_model_version("legacy", source="s3://bucket/old/checkpoint_000009", run_id=logged["sink"].run_id)
    assert checkpoint_url_for("models:/legacy/1", logged["uri"]) == "s3://bucket/old/checkpoint_000009"
    with pytest.raises(UserError, match="not an MLflow model"):
        download_model("models:/legacy/1", logged["uri"])


@pytest.mark.parametrize(
    "ref, says",
    [
        ("models:/nope@champion", "models:/nope@champion"),
        ("models:/clf@nobody", "models:/clf@nobody"),
        ("models:/clf/99", "models:/clf/99"),
        ("models:/clf/latest", "with a version number"),
        ("models:/m-0123456789abcdef0123456789abcdef", "models:/m-0123456789abcdef"),
        ("models:/clf", "not a model reference"),
        ("runs:/0123456789abcdef", "names a run, not a model"),
        ("s3://bucket/checkpoint", "not a model reference"),
    ],
)
def test_unknown_references_fail_in_one_line_naming_them(logged, ref, says):
    with pytest.raises(UserError) as info:
        resolve_model_reference(ref, logged["uri"])
    message = str(info.value)
    assert says in message and "\n" not in message


def test_a_run_without_that_model_fails_naming_it(logged):
    with pytest.raises(UserError, match="logged no model named 'final'"):
        checkpoint_url_for(f"runs:/{logged['sink'].run_id}/final", logged["uri"])
