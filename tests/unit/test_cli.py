"""The CLI's own behaviour: messages through logging on stdout/stderr, one-line errors, dispatch."""

from __future__ import annotations

import logging

import pytest

from imagenet_ray.cli import _find_user_error, configure_logging, main
from imagenet_ray.errors import ConfigError, UserError


def test_package_messages_reach_stdout_and_warnings_stderr(capsys):
    configure_logging()
    configure_logging()  # idempotent: one line per message, not two
    log = logging.getLogger("imagenet_ray.some.module")
    log.info("plain %s", "info")
    log.warning("a warning")
    logging.getLogger("botocore.credentials").info("Found credentials in environment variables.")
    out, err = capsys.readouterr()
    assert out == "plain info\n"  # no level or logger prefix; libraries' INFO stays quiet
    assert err == "a warning\n"


def test_synth_reports_on_stdout(tmp_path, capsys):
    rc = main(
        ["synth", "--out", str(tmp_path / "raw"), "--classes", "2", "--train-per-class", "2", "--val-per-class", "1"]
    )
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    assert out.startswith("wrote 4 train + 2 val images of 2 classes to ") and "Kaggle CLS-LOC layout" in out


def test_services_without_state(tmp_path, capsys):
    assert main(["services", "status", "--dir", str(tmp_path)]) == 1
    assert "no services" in capsys.readouterr().out
    assert main(["services", "down", "--dir", str(tmp_path)]) == 0
    assert "no services running" in capsys.readouterr().out


def test_a_user_error_is_one_line_on_stderr_with_its_exit_code(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("imagenet-ray: error: ")
    assert main(["prepare", "--source", "x", "--out", "y", "--shard-mb", "0"]) == 2
    assert capsys.readouterr().err == "imagenet-ray: error: prepare: --shard-mb must be > 0\n"


def test_user_errors_are_found_inside_wrapping_exceptions():
    inner = ConfigError("bad value")
    try:
        try:
            raise inner
        except ConfigError as exc:
            raise RuntimeError("worker failed") from exc
    except RuntimeError as outer:
        assert _find_user_error(outer) is inner
    assert _find_user_error(RuntimeError("no cause")) is None
    assert isinstance(inner, UserError) and inner.exit_code == 2


@pytest.mark.parametrize("argv", [["nonsense"], ["train", "--no-such-flag"]])
def test_bad_arguments_exit_2(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.count("\n") == 1
