"""The headline charts first: overview copies of the headline metrics and MLflow 3.17's chart layout."""

from __future__ import annotations

import pytest
from mlflow.utils.validation import _validate_metric_name

from imagenet_ray.dashboard import (
    HEADLINE_METRICS,
    MODEL_METRICS_SECTION,
    OVERVIEW_KEYS,
    OVERVIEW_SECTION,
    chart_sections,
    run_page_url,
    with_overview,
)
from imagenet_ray.tracking import RunSink

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # sqlalchemy deprecations inside mlflow

# Per-epoch names of imagenet_ray/train/runner.py and train/progress.py, plus a system metric.
RUNNER_METRICS = (
    "train/loss",
    "train/lr",
    "train/images",
    "train/crop_size",
    "val/top1",
    "val/top5",
    "val/loss",
    "perf/images_per_s",
    "perf/data_wait_frac",
    "perf/epoch_s",
    "perf/first_batch_s",
    "data/decode_errors",
    "epoch",
    "system/cpu_utilization_percentage",
)


def test_with_the_runners_names_alone_decode_errors_comes_first_and_val_last():
    """The issue as MLflow lays it out: sections by name, `data` before `val`."""
    sections = chart_sections(RUNNER_METRICS)
    assert [name for name, _ in sections] == ["data", "perf", "train", "val", MODEL_METRICS_SECTION]
    assert sections[0] == ("data", ["data/decode_errors"])
    assert sections[3] == ("val", ["val/loss", "val/top1", "val/top5"])
    assert sections[-1] == (MODEL_METRICS_SECTION, ["epoch"])  # no `/`: MLflow's own section, always last


def test_with_overview_the_first_section_is_the_headline_charts_in_their_order():
    metrics = {name: float(i) for i, name in enumerate(RUNNER_METRICS)}
    logged = with_overview(metrics)
    sections = chart_sections(logged)
    assert sections[0] == (
        OVERVIEW_SECTION,
        [
            "0 overview/1 val top1",
            "0 overview/2 val top5",
            "0 overview/3 train loss",
            "0 overview/4 perf images_per_s",
            "0 overview/5 perf data_wait_frac",
        ],
    )
    assert sections[1:] == chart_sections(RUNNER_METRICS)  # every other chart stays where it was
    assert all(logged[OVERVIEW_KEYS[name]] == metrics[name] for name in HEADLINE_METRICS)
    assert {k: v for k, v in logged.items() if k in metrics} == metrics


def test_with_overview_copies_only_the_headline_metrics_present():
    assert with_overview({"train/loss": 0.5, "train/lr": 0.1}) == {
        "train/loss": 0.5,
        "train/lr": 0.1,
        "0 overview/3 train loss": 0.5,
    }
    assert with_overview({"perf/epoch_s": 3.0}) == {"perf/epoch_s": 3.0}
    assert chart_sections([])[0] == (MODEL_METRICS_SECTION, [])  # the UI shows it even empty


@pytest.mark.parametrize("group", ["a", "A", "Z", "_x", "data", "1 later"])
def test_the_overview_section_sorts_first_against_any_group_name(group):
    """A digit sorts before letters and `_` in code units (JavaScript's sort) and in a case-insensitive
    order (what `localeCompare` does at its first level, used when the UI re-sorts a stored layout)."""
    keys = [*OVERVIEW_KEYS.values(), f"{group}/m"]
    assert chart_sections(keys)[0][0] == OVERVIEW_SECTION
    assert sorted([OVERVIEW_SECTION, group], key=str.casefold)[0] == OVERVIEW_SECTION
    overview = list(OVERVIEW_KEYS.values())
    assert sorted(overview) == sorted(overview, key=str.casefold) == overview  # one digit per rank


def test_overview_keys_are_valid_mlflow_names_and_round_trip_through_a_run(tmp_path):
    assert len(HEADLINE_METRICS) <= 9  # one-digit ranks
    for key in OVERVIEW_KEYS.values():
        _validate_metric_name(key)  # raises on characters or paths MLflow refuses
    sink = RunSink.create(f"sqlite:///{tmp_path}/mlflow.db", "dash", "r")
    sink.log_metrics(with_overview({"val/top1": 0.25, "train/loss": 2.0}), step=3)
    _, latest, _ = sink.read()
    assert latest == {
        "val/top1": 0.25,
        "train/loss": 2.0,
        "0 overview/1 val top1": 0.25,
        "0 overview/3 train loss": 2.0,
    }
    assert sink.logged_steps("0 overview/1 val top1") == {3}


def test_run_page_url_is_the_model_metrics_tab_in_model_training_mode():
    assert run_page_url("http://127.0.0.1:5000/", "7", "abc") == (
        "http://127.0.0.1:5000/#/experiments/7/runs/abc/model-metrics?workflowType=machine_learning"
    )
    assert "/runs/abc/system-metrics?" in run_page_url("http://h", "7", "abc", tab="system-metrics")
    with pytest.raises(ValueError, match="tab 'charts'"):
        run_page_url("http://h", "7", "abc", tab="charts")
