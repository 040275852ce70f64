"""URL passwords masked wherever a URL is logged, printed, sent to MLflow or put in an error."""

from __future__ import annotations

import logging
import pickle
import sys
from pathlib import Path

import pytest
import yaml

from imagenet_ray.config import flatten, load_config, to_yaml
from imagenet_ray.errors import ConfigError, UserError, describe_error
from imagenet_ray.redact import RedactingFilter, redact_text, redact_url, redact_values


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:token@host/path?q=1", "https://user:***@host/path?q=1"),
        ("postgresql://mlflow:pa55@db.example.com:5432/mlflow", "postgresql://mlflow:***@db.example.com:5432/mlflow"),
        ("postgresql+psycopg2://u:p@h/db", "postgresql+psycopg2://u:***@h/db"),
        ("s3://AKIAEXAMPLE:wJalrXUtnFEMI%2Fk@bucket/prefix/", "s3://AKIAEXAMPLE:***@bucket/prefix/"),
        ("https://:token@host", "https://:***@host"),  # a password without a user name
        ("https://user:p@ss@host/x", "https://user:***@host/x"),  # a raw '@' in the password: masked whole
        ("https://user:@host", "https://user:***@host"),
        ("https://user:***@host", "https://user:***@host"),  # idempotent
    ],
)
def test_redact_url_masks_the_password_and_keeps_the_user(url, expected):
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "https://mlflow.example.com:5000/api",  # no credentials (a port is no password)
        "postgresql://postgres@127.0.0.1:5432/mlflow",  # a user name alone
        "ssh://git@github.com/org/repo.git",
        "s3://bucket/prefix/key@v2.parquet",  # an '@' in the path, not the authority
        "https://registry.example.com/@scope/pkg",
        "sqlite:////tmp/mlflow.db",
        "/data/imagenet",
        "user:pass@host",  # no scheme: not a URL
        "",
        "http://[::1",  # malformed (urllib raises on it)
        "://:@",
        "a://",
    ],
)
def test_redact_url_leaves_urls_without_a_password_unchanged(url):
    assert redact_url(url) == url


def test_redact_url_never_raises_on_odd_input():
    assert redact_url(None) == "None"  # type: ignore[arg-type]
    assert redact_url(b"https://u:p@h") == "b'https://u:***@h'"  # type: ignore[arg-type]
    assert redact_url("https://u:p@h\n") == "https://u:***@h\n"


def test_redact_text_masks_every_url_in_a_sentence():
    text = (
        "MLflow at https://alice:s3cr3t@mlflow.example.com:5000 failed: could not reach "
        "'postgresql://mlflow:hunter2@db/mlflow' (see https://docs.example.com/x, mail admin@example.com)"
    )
    out = redact_text(text)
    assert "s3cr3t" not in out and "hunter2" not in out
    assert out == (
        "MLflow at https://alice:***@mlflow.example.com:5000 failed: could not reach "
        "'postgresql://mlflow:***@db/mlflow' (see https://docs.example.com/x, mail admin@example.com)"
    )
    assert redact_text("no URL: user:pass@host") == "no URL: user:pass@host"


def test_redact_values_masks_strings_in_nested_data():
    data = {"out": "s3://K:S@b/x", "list": ["https://u:p@h", 3], "tuple": ("http://u:p@h",), "n": None}
    assert redact_values(data) == {
        "out": "s3://K:***@b/x",
        "list": ["https://u:***@h", 3],
        "tuple": ("http://u:***@h",),
        "n": None,
    }


def _record(msg: str, *args: object, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("imagenet_ray.test", logging.INFO, __file__, 1, msg, args or None, exc_info)


def test_filter_formats_the_args_then_masks_and_clears_them():
    record = _record("mlflow run: %s in %s", "abc123", "https://u:secret@mlflow:5000")
    assert RedactingFilter().filter(record) is True
    assert record.getMessage() == "mlflow run: abc123 in https://u:***@mlflow:5000"
    assert not record.args
    plain = _record("nothing to hide: %d images", 5)
    RedactingFilter().filter(plain)
    assert plain.getMessage() == "nothing to hide: 5 images"


def test_filter_masks_a_traceback_and_lets_a_bad_record_through():
    try:
        raise RuntimeError("connect to postgresql://u:hunter2@db/x failed")
    except RuntimeError:
        record = _record("failed", exc_info=sys.exc_info())
    RedactingFilter().filter(record)
    assert "hunter2" not in logging.Formatter().format(record)
    bad = _record("%s and %s", "only one")
    assert RedactingFilter().filter(bad) is True  # logging reports the formatting error itself


def test_filter_on_a_handler_masks_what_is_written(capsys):
    logger = logging.getLogger("imagenet_ray.test_redact")
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(RedactingFilter())
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("store %s away", "https://u:secret@h")
    finally:
        logger.removeHandler(handler)
    assert capsys.readouterr().out == "store https://u:***@h away\n"


def test_flatten_and_to_yaml_of_a_config_with_a_password_show_no_secret():
    cfg = load_config(
        None,
        [
            "mlflow.tracking_uri=https://user:secret@mlflow.example.com",
            "data.url=s3://AKIAEXAMPLE:secretkey@bucket/imagenet",
        ],
    )
    assert cfg.mlflow.tracking_uri == "https://user:secret@mlflow.example.com"  # the config itself keeps it
    flat = flatten(cfg)
    assert flat["mlflow.tracking_uri"] == "https://user:***@mlflow.example.com"
    assert flat["data.url"] == "s3://AKIAEXAMPLE:***@bucket/imagenet"
    assert not [k for k, v in flat.items() if "secret" in str(v)]
    text = to_yaml(cfg)
    assert "secret" not in text and "https://user:***@mlflow.example.com" in text


def test_flatten_and_to_yaml_without_credentials_are_unchanged():
    cfg = load_config(None, ["mlflow.tracking_uri=http://mlflow:5000"])
    assert flatten(cfg)["mlflow.tracking_uri"] == "http://mlflow:5000"
    assert type(cfg).model_validate(yaml.safe_load(to_yaml(cfg))) == cfg


def test_user_error_masks_its_message():
    err = UserError("MLflow at https://u:secret@mlflow:5000: connection refused")
    assert str(err) == "MLflow at https://u:***@mlflow:5000: connection refused"
    assert "secret" not in repr(err) and "secret" not in str(err.args)
    copy = pickle.loads(pickle.dumps(err))  # Ray ships errors between processes
    assert str(copy) == str(err) and type(copy) is UserError
    assert "secret" not in str(ConfigError("data.url: s3://K:secret@b is not prepared"))
    assert str(UserError(ValueError("https://u:secret@h"))) == "https://u:***@h"  # an argument that is no string
    assert str(UserError("no URL here")) == "no URL here"


def test_describe_error_masks_before_it_cuts():
    text = "x" * 280 + " https://user:hunter2@example.com"
    assert "hun" not in describe_error(RuntimeError(text))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_mlflow_gets_no_password(tmp_path):
    """Params, tags, run names, texts and dataset names sent to MLflow are masked, and a run stored with a
    masked storage tag is still found again."""
    from mlflow.tracking import MlflowClient

    from imagenet_ray.tracking import STORAGE_TAG, RunSink, find_prepare_run, resolve_tracking_uri

    uri = resolve_tracking_uri(str(tmp_path / "store"))
    storage_url = "https://u:secret@storage.example.com/runs"
    params = {"data.url": "s3://K:secret@bucket/x", "lr": 0.1}
    sink, resumed = RunSink.find_or_create(
        uri, "exp", "run", storage_url, params, "tracking_uri: https://u:secret@mlflow\n"
    )
    assert not resumed
    sink.set_tags({"note": "from https://u:secret@h"})
    sink.log_dict({"source": "s3://K:secret@bucket/raw"}, "report.json")
    run = MlflowClient(uri).get_run(sink.run_id)
    assert run.data.params["data.url"] == "s3://K:***@bucket/x"
    assert run.data.tags[STORAGE_TAG] == "https://u:***@storage.example.com/runs"
    stored = [
        MlflowClient(uri).download_artifacts(sink.run_id, f, str(tmp_path)) for f in ("config.yaml", "report.json")
    ]
    everything = str(run.data.params) + str(run.data.tags) + "".join(Path(p).read_text() for p in stored)
    assert "secret" not in everything
    again, resumed = RunSink.find_or_create(uri, "exp", "run", storage_url, params, "")
    assert resumed and again.run_id == sink.run_id

    prepare = RunSink.create(
        uri, "imagenet-ray-datasets", "prepare s3://K:secret@b/out", params={"out": "s3://K:secret@b/out"}
    )
    prepare.finish()
    assert MlflowClient(uri).get_run(prepare.run_id).info.run_name == "prepare s3://K:***@b/out"
    assert find_prepare_run(uri, "s3://K:secret@b/out") == prepare.run_id
