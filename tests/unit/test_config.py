"""The strict config tree: YAML + dotted overrides, rejected with one line naming the key."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from imagenet_ray.config import (
    DataSection,
    ExperimentConfig,
    apply_overrides,
    flatten,
    load_config,
    load_tree,
    parse_override,
    to_yaml,
)
from imagenet_ray.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[2]
CONFIG_FILES = sorted((REPO / "configs").rglob("*.yaml"))  # recipes and the bases they extend


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _config_error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    msg = str(info.value)
    assert "\n" not in msg, f"config errors must be one line: {msg!r}"
    assert info.value.exit_code == 2
    return msg


# --- loading ---------------------------------------------------------------------------------------------------


def test_embedded_defaults_load():
    cfg = load_config(None)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.name == "local"
    assert cfg.model.name == "resnet18"
    assert cfg.optim.lr == pytest.approx(0.1)
    assert cfg.optim.schedule == "cosine"
    assert cfg.train.use_gpu == "auto"
    assert cfg.eval.crop <= cfg.eval.resize
    assert cfg == ExperimentConfig()


def test_config_dir_is_not_empty():
    assert CONFIG_FILES, f"no configs/*.yaml found under {REPO}"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_every_shipped_yaml_loads(path: Path):
    cfg = load_config(path)
    written = _leaves(load_tree(path))  # the file with its bases merged under it
    flat = flatten(cfg)
    assert written, f"{path.name} is empty"
    for key, value in written.items():
        assert key in flat, f"{path.name}: {key} not in the loaded config"
        loaded = yaml.safe_load(flat[key]) if isinstance(value, list) else flat[key]  # flatten writes lists as YAML
        assert loaded == value, f"{path.name}: {key} loaded as {flat[key]!r}, file says {value!r}"
    # What the tool logs as config.yaml loads back to the same config.
    assert ExperimentConfig.model_validate(yaml.safe_load(to_yaml(cfg))) == cfg


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(_write(tmp_path, "")) == load_config(None)


def test_to_yaml_round_trips_through_a_file(tmp_path):
    cfg = load_config(None, ["optim.lr=0.05", "train.use_gpu=false", "name=run-7"])
    again = load_config(_write(tmp_path, to_yaml(cfg)))
    assert again == cfg


# --- overrides -------------------------------------------------------------------------------------------------


def test_overrides_use_yaml_typing():
    cfg = load_config(None, ["optim.lr=0.05", "train.use_gpu=false", "train.epochs=7", "optim.schedule=constant"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == pytest.approx(0.05)
    assert cfg.train.use_gpu is False
    assert cfg.train.epochs == 7 and isinstance(cfg.train.epochs, int)
    assert cfg.optim.schedule == "constant"


@pytest.mark.parametrize("raw, expected", [("auto", "auto"), ("true", True), ("false", False)])
def test_use_gpu_values(raw, expected):
    assert load_config(None, [f"train.use_gpu={raw}"]).train.use_gpu == expected


def test_overrides_apply_on_top_of_a_file(tmp_path):
    path = _write(tmp_path, "name: filecfg\noptim:\n  lr: 0.4\n  momentum: 0.8\ntrain:\n  epochs: 5\n")
    cfg = load_config(path, ["optim.lr=0.05", "data.batch_size=8"])
    assert cfg.name == "filecfg"
    assert cfg.optim.lr == pytest.approx(0.05)
    assert cfg.optim.momentum == pytest.approx(0.8)  # untouched sibling from the file
    assert cfg.train.epochs == 5
    assert cfg.data.batch_size == 8


@pytest.mark.parametrize(
    "override, attr", [("name=2024", ("name",)), ("mlflow.experiment=42", ("mlflow", "experiment"))]
)
def test_numeric_looking_string_override(override, attr):
    cfg = load_config(None, [override])
    value = cfg
    for part in attr:
        value = getattr(value, part)
    assert value == override.split("=", 1)[1]


def test_quoted_numeric_string_override_works():
    assert load_config(None, ["name='2024'"]).name == "2024"


def test_later_override_wins():
    assert load_config(None, ["train.epochs=2", "train.epochs=4"]).train.epochs == 4


def test_apply_overrides_does_not_mutate_input():
    tree = {"optim": {"lr": 0.4}}
    out = apply_overrides(tree, ["optim.lr=0.2", "train.epochs=1"])
    assert tree == {"optim": {"lr": 0.4}}
    assert out == {"optim": {"lr": 0.2}, "train": {"epochs": 1}}


def test_parse_override_splits_on_first_equals():
    assert parse_override("mlflow.tracking_uri=http://h:5000/?a=b") == (
        ["mlflow", "tracking_uri"],
        "http://h:5000/?a=b",
    )
    assert parse_override(" optim.lr = 0.5") == (["optim", "lr"], 0.5)


# --- rejections ------------------------------------------------------------------------------------------------


def test_unknown_nested_key_in_yaml(tmp_path):
    msg = _config_error(_write(tmp_path, "optim:\n  lrr: 0.1\n"))
    assert "optim.lrr" in msg and "unknown config key" in msg


def test_unknown_top_level_key_in_yaml(tmp_path):
    msg = _config_error(_write(tmp_path, "epochs: 3\n"))
    assert "'epochs'" in msg and "unknown config key" in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epoch=3", "train.epoch"),
        ("foo=1", "foo"),
        ("optim.lr.x=1", "optim.lr.x"),
        ("data.url.scheme=s3", "data.url.scheme"),
    ],
)
def test_unknown_key_in_override(override, key):
    msg = _config_error(None, [override])
    assert f"'{key}'" in msg and "unknown config key" in msg


@pytest.mark.parametrize("override", ["optim.lr", "=3", "  =x"])
def test_override_without_key_or_equals(override):
    msg = _config_error(None, [override])
    assert "expected dotted.key=value" in msg
    assert repr(override) in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epochs=abc", "train.epochs"),
        ("train.epochs=2.5", "train.epochs"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.lr=0", "optim.lr"),
        ("data.batch_size=0", "data.batch_size"),
        ("optim.momentum=1.0", "optim.momentum"),
        ("optim.schedule=exponential", "optim.schedule"),
        ("name=has space", "name"),
        ("model.name=resnet9000", "model.name"),
    ],
)
def test_bad_values_name_the_key(override, key):
    msg = _config_error(None, [override])
    assert f"{key}:" in msg, msg


@pytest.mark.parametrize(
    "override, key, says",
    [
        ("data.rrc_scale=[0.5, 0.2]", "data.rrc_scale", "0 < min ≤ max ≤ 1"),
        ("data.rrc_scale=[0, 1]", "data.rrc_scale", "0 < min ≤ max ≤ 1"),
        ("data.rrc_scale=[0.5, 1.5]", "data.rrc_scale", "0 < min ≤ max ≤ 1"),
        ("data.rrc_scale=[-0.1, 0.5]", "data.rrc_scale", "0 < min ≤ max ≤ 1"),
        ("data.rrc_scale=[true, true]", "data.rrc_scale", "not true/false"),
        ("data.rrc_scale=0.3", "data.rrc_scale", "tuple"),
        ("data.rrc_scale=[0.1, 0.5, 1.0]", "data.rrc_scale", "at most 2"),
        ("data.rrc_ratio=[2.0, 1.0]", "data.rrc_ratio", "0 < min ≤ max"),
        ("data.rrc_ratio=[0, 1]", "data.rrc_ratio", "0 < min ≤ max"),
        ("data.rrc_ratio=[0.5, .inf]", "data.rrc_ratio.1", "finite"),
    ],
)
def test_rrc_bounds_are_validated_in_one_line_naming_the_key(override, key, says):
    msg = _config_error(None, [override])
    assert msg.startswith(f"<defaults>: {key}: ") and says in msg, msg


def test_rrc_defaults_are_torchvisions_and_ranges_are_accepted():
    from imagenet_ray.data.transforms import RRC_RATIO, RRC_SCALE

    d = load_config(None).data
    assert d.rrc_scale == RRC_SCALE == (0.08, 1.0)
    assert d.rrc_ratio == RRC_RATIO == (3 / 4, 4 / 3)
    cfg = load_config(None, ["data.rrc_scale=[0.35, 1]", "data.rrc_ratio=[1, 1]"])
    assert cfg.data.rrc_scale == (0.35, 1.0) and cfg.data.rrc_ratio == (1.0, 1.0)
    assert load_config(None, ["data.rrc_ratio=[0.2, 5]"]).data.rrc_ratio == (0.2, 5.0)  # no upper bound
    assert flatten(cfg)["data.rrc_scale"] == "[0.35, 1.0]"  # an MLflow param, as YAML
    assert ExperimentConfig.model_validate(yaml.safe_load(to_yaml(cfg))) == cfg


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.name=adam", "optim.name"),
        ("optim.clip_grad_norm=0", "optim.clip_grad_norm"),
        ("optim.clip_grad_norm=true", "optim.clip_grad_norm"),
        ("optim.lars_trust_coeff=0", "optim.lars_trust_coeff"),
        ("optim.lars_eps=-1e-8", "optim.lars_eps"),
        ("optim.poly_power=0", "optim.poly_power"),
        ("optim.poly_end_lr=-0.1", "optim.poly_end_lr"),
    ],
)
def test_bad_large_batch_optim_values_name_the_key(override, key):
    assert f"{key}:" in _config_error(None, [override])


def test_large_batch_optim_keys_default_to_the_plain_sgd_recipe():
    o = load_config(None).optim
    assert (o.name, o.clip_grad_norm, o.schedule) == ("sgd", None, "cosine")
    assert (o.lars_trust_coeff, o.lars_eps, o.poly_power, o.poly_end_lr) == (0.001, 1e-8, 2.0, 0.0)
    o = load_config(None, ["optim.name=lars", "optim.schedule=poly", "optim.clip_grad_norm=2.5"]).optim
    assert (o.name, o.schedule, o.clip_grad_norm) == ("lars", "poly", 2.5)
    assert load_config(None, ["optim.clip_grad_norm=2.5", "optim.clip_grad_norm=null"]).optim.clip_grad_norm is None


def test_bad_use_gpu_is_rejected():
    msg = _config_error(None, ["train.use_gpu=maybe"])
    assert "train.use_gpu" in msg and "'maybe'" in msg


def test_bad_use_gpu_names_the_real_key():
    msg = _config_error(None, ["train.use_gpu=maybe"])
    assert "train.use_gpu:" in msg
    assert "train.use_gpu.bool" not in msg
    assert "auto" in msg


def test_unknown_model_message_names_the_model():
    msg = _config_error(None, ["model.name=resnet9000"])
    assert "resnet9000" in msg and "model.name" in msg


def test_known_torchvision_models_accepted():
    for name in ("resnet50", "mobilenet_v3_small", "vit_b_16"):
        assert load_config(None, [f"model.name={name}"]).model.name == name


def test_eval_crop_larger_than_eval_resize_rejected():
    msg = _config_error(None, ["eval.resize=64", "eval.crop=80"])
    assert msg.startswith("<defaults>: eval: ") and "crop (80)" in msg and "resize (64)" in msg
    # equal is fine
    assert load_config(None, ["eval.resize=64", "eval.crop=64"]).eval.crop == 64


@pytest.mark.parametrize(
    "old", ["data.val_resize=64", "data.val_crop=64", "data.eval_hflip=true", "data.val_batch_size=8"]
)
def test_eval_settings_live_in_the_eval_section(old):
    assert "unknown config key" in _config_error(None, [old])


# --- extends: recipes as deltas ----------------------------------------------------------------------------


def test_extends_merges_mappings_and_replaces_values(tmp_path):
    _write(
        tmp_path,
        "optim:\n  lr: 0.3\n  momentum: 0.8\ndata:\n  progressive: {start_size: 96, end_size: 128}\n",
        name="base.yaml",
    )
    child = _write(
        tmp_path,
        "extends: base.yaml\noptim:\n  lr: 0.2\ndata:\n  train_crop: 128\n"
        "  progressive: {start_epoch: 2, end_epoch: 4}\n",
        name="child.yaml",
    )
    cfg = load_config(child, ["optim.momentum=0.7"])
    assert (cfg.optim.lr, cfg.optim.momentum) == (0.2, 0.7)
    p = cfg.data.progressive
    assert (p.start_size, p.end_size, p.start_epoch, p.end_epoch) == (96, 128, 2, 4)


def test_extends_chains_and_lists_apply_in_order(tmp_path):
    _write(tmp_path, "seed: 1\noptim: {lr: 0.3}\n", name="a.yaml")
    sub = tmp_path / "sub"
    sub.mkdir()
    _write(sub, "extends: ../a.yaml\nseed: 2\n", name="b.yaml")
    _write(tmp_path, "train: {epochs: 9}\nseed: 3\n", name="c.yaml")
    cfg = load_config(_write(tmp_path, "extends: [sub/b.yaml, c.yaml]\n", name="top.yaml"))
    assert (cfg.seed, cfg.optim.lr, cfg.train.epochs) == (3, 0.3, 9)


def test_extends_errors_are_one_line(tmp_path):
    missing = _write(tmp_path, "extends: nope.yaml\n", name="m.yaml")
    assert _config_error(missing) == f"{missing}: extends {tmp_path / 'nope.yaml'}, which is not found"
    _write(tmp_path, "extends: y.yaml\n", name="x.yaml")
    _write(tmp_path, "extends: x.yaml\n", name="y.yaml")
    assert "extends cycle" in _config_error(tmp_path / "x.yaml")
    assert "extends must be" in _config_error(_write(tmp_path, "extends: {a: 1}\n", name="bad.yaml"))
    _write(tmp_path, "seed: 1\n", name="c.yaml")
    typo = _write(tmp_path, "extends: c.yaml\noptim: {lrr: 1}\n", name="typo.yaml")
    assert _config_error(typo) == f"{typo}: unknown config key 'optim.lrr'"


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    msg = _config_error(missing)
    assert str(missing) in msg and "not found" in msg


def test_invalid_yaml(tmp_path):
    path = _write(tmp_path, "optim: [unclosed\n  lr: 0.1\n")
    msg = _config_error(path)
    assert "invalid YAML" in msg and str(path) in msg


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_top_level(tmp_path, text):
    msg = _config_error(_write(tmp_path, text))
    assert "top level must be a mapping" in msg


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, UserError) and ConfigError.exit_code == 2 and UserError.exit_code == 1


# --- frozen + flatten ------------------------------------------------------------------------------------------


def test_configs_are_frozen():
    cfg = load_config(None)
    with pytest.raises(ValidationError):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cfg.name = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cfg.data = DataSection()  # type: ignore[misc]
    assert cfg.optim.lr == pytest.approx(0.1) and cfg.name == "local"


def test_flatten_gives_dotted_leaf_keys():
    cfg = load_config(None, ["optim.lr=0.05"])
    flat = flatten(cfg)
    assert flat["optim.lr"] == pytest.approx(0.05)
    assert flat["data.batch_size"] == cfg.data.batch_size
    assert flat["train.use_gpu"] == "auto"
    assert flat["name"] == "local" and flat["seed"] == 0
    assert not any(isinstance(v, dict) for v in flat.values())
    expected = {"name", "seed"} | {
        f"{section}.{field}"
        for section in ("data", "model", "optim", "train", "eval", "mlflow")
        for field in type(getattr(cfg, section)).model_fields
    }
    assert set(flat) == expected


# --- the CLI ---------------------------------------------------------------------------------------------------


def test_cli_bad_override_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    import imagenet_ray.train.trainer as trainer
    from imagenet_ray.cli import main

    def _must_not_run(cfg):  # pragma: no cover - reached only on failure
        raise AssertionError("run_training must not start for an invalid config")

    monkeypatch.setattr(trainer, "run_training", _must_not_run)
    config = CONFIG_FILES[0] if CONFIG_FILES else _write(tmp_path, "name: x\n")
    import sys

    # An earlier test module's Ray may still be up (package-scoped fixtures): compare, don't assume.
    ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    start = time.perf_counter()
    rc = main(["train", "--config", str(config), "optim.lr=-1"])
    elapsed = time.perf_counter() - start
    out, err = capsys.readouterr()
    assert rc == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("imagenet-ray: error: ")
    assert "optim.lr" in lines[0]
    assert out == ""
    assert elapsed < 30
    if "ray" in sys.modules:  # the bad config never started (or attached to) Ray
        assert sys.modules["ray"].is_initialized() == ray_was_up


def test_cli_unknown_override_key_exits_2(capsys):
    from imagenet_ray.cli import main

    rc = main(["train", "train.epoch=3"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "train.epoch" in err


def test_cli_bad_arguments_exit_2_one_line(capsys):
    from imagenet_ray.cli import main

    assert main(["train", "--no-such-flag"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("imagenet-ray: error: ") and "--no-such-flag" in err
    assert main([]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_elastic_worker_range():
    cfg = load_config(None, ["train.num_workers=[1,4]"])
    assert cfg.train.num_workers == (1, 4) and cfg.train.max_workers == 4
    assert load_config(None, ["train.num_workers=3"]).train.max_workers == 3
    for bad in ("[3,1]", "[0,2]", "0"):
        with pytest.raises(ConfigError, match=r"train\.num_workers"):
            load_config(None, [f"train.num_workers={bad}"])


def test_node_labels_reach_ray_data_execution_options():
    from imagenet_ray.data.pipeline import exact_val_data_config

    cfg = load_config(None, ["data.node_labels={imagenet-ray/node-group: decode}"])
    assert cfg.data.node_labels == {"imagenet-ray/node-group": "decode"}
    dc = exact_val_data_config(node_labels=cfg.data.node_labels)
    assert dc._resolve_execution_options("train").label_selector == {"imagenet-ray/node-group": "decode"}
    assert exact_val_data_config()._resolve_execution_options("train").label_selector in (None, {})


def test_ingest_options_raise_no_deprecation_warning():
    """Ray's DataConfig.default_ingest_options() passes the deprecated exclude_resources: not used."""
    import warnings

    from imagenet_ray.data.pipeline import exact_val_data_config

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dc = exact_val_data_config(preserve_order=True, node_labels={"imagenet-ray/node-group": "decode"})
        options = dc._resolve_execution_options("val")
    assert options.preserve_order and options.label_selector == {"imagenet-ray/node-group": "decode"}
    assert [str(w.message) for w in caught if "exclude_resources" in str(w.message)] == []


def test_node_labels_pin_dataset_construction_tasks_too():
    from ray.data import DataContext

    from imagenet_ray.data.pipeline import pin_reads_to

    options = DataContext.get_current().execution_options
    before = options.label_selector
    try:
        pin_reads_to({})
        assert options.label_selector == before  # no labels: nothing pinned
        pin_reads_to({"imagenet-ray/node-group": "decode"})
        assert DataContext.get_current().execution_options.label_selector == {"imagenet-ray/node-group": "decode"}
    finally:
        DataContext.get_current().execution_options.label_selector = before


def test_train_node_labels_and_worker_resources():
    cfg = load_config(
        None, ["train.node_labels={imagenet-ray/node-group: train}", "train.worker_resources={stand_in_gpu: 1}"]
    )
    assert cfg.train.node_labels == {"imagenet-ray/node-group": "train"}
    assert cfg.train.worker_resources == {"stand_in_gpu": 1.0}
    with pytest.raises(ConfigError):
        load_config(None, ["train.worker_resources={stand_in_gpu: lots}"])
