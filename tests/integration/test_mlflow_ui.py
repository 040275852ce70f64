"""The MLflow UI in headless Chromium: a run page draws the headline charts first (issue 12).

A run logged through RunSink with the runner's metric names (values from a formula: this checks the
rendering, not training) is opened on the real MLflow server of `local_stack`, twice with one browser
profile: at epoch 0 (bar charts) and after three more epochs, when the UI converts them to line charts
and re-sorts its stored layout with `localeCompare` (the path a page open on a running run takes).
"""

from __future__ import annotations

import math
from urllib.parse import urlparse

import pytest

import mlflow_ui
from imagenet_ray import dashboard
from imagenet_ray.tracking import RunSink, ensure_experiment

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Per-epoch names of imagenet_ray/train/runner.py and train/progress.py, `epoch` without a section.
METRICS = (
    "train/loss",
    "train/lr",
    "train/images",
    "train/crop_size",
    "val/top1",
    "val/top5",
    "val/loss",
    "val/images",
    "perf/images_per_s",
    "perf/data_wait_frac",
    "perf/epoch_s",
    "perf/first_batch_s",
    "data/decode_errors",
    "epoch",
)


def _epoch_metrics(epoch: int) -> dict[str, float]:
    return {name: (i + 1) * (1 - math.exp(-(epoch + 1))) for i, name in enumerate(METRICS)}


def test_the_run_page_draws_val_top1_and_the_other_headline_charts_first(local_stack, tmp_path):
    assert mlflow_ui.find_chromium(), mlflow_ui.INSTALL_HINT
    uri = local_stack.mlflow_uri
    experiment_id = ensure_experiment(uri, "mlflow-ui-check")
    sink = RunSink.create(uri, "mlflow-ui-check", "ui-check")
    sink.log_metrics(dashboard.with_overview(_epoch_metrics(0)), step=0)
    sink.log_metrics({"system/cpu_utilization_percentage": 12.0}, step=0)  # its own tab, not this one

    # Through the alias `mlflow` (one of the stack server's allowed hosts), not 127.0.0.1: on a page
    # served from localhost the UI opens its assistant panel over a third of the charts.
    server = urlparse(uri)
    url = dashboard.run_page_url(f"http://mlflow:{server.port}", experiment_id, sink.run_id)
    profile = tmp_path / "profile"  # localStorage, where the UI keeps the layout between the two visits
    overview = [dashboard.OVERVIEW_KEYS[name] for name in dashboard.HEADLINE_METRICS]

    def visit(screenshot_name: str) -> mlflow_ui.ModelMetricsTab:
        shot = tmp_path / screenshot_name
        tab = mlflow_ui.model_metrics_tab(
            mlflow_ui.render(url, screenshot=shot, profile_dir=profile, resolve={"mlflow": server.hostname or ""})
        )
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000, f"blank {shot}"
        print(f"\n{screenshot_name}: {shot}")
        expected = dashboard.chart_sections(sink.read()[1])
        assert tab.sections == [(name, len(keys)) for name, keys in expected], "the UI laid the charts out otherwise"
        names = [name for name, _ in tab.sections]
        assert names[0] == dashboard.OVERVIEW_SECTION and names.index("val") > names.index("data")
        drawn = [card.key for card in tab.cards]
        assert drawn[:5] == overview, f"the first charts drawn are {drawn[:5]}"
        assert tab.cards[0].key == "0 overview/1 val top1" and tab.cards[0].has_plot
        return tab

    first = visit("epoch0.png")
    assert all(card.traces == ["bars"] for card in first.cards[:5]), [c.traces for c in first.cards[:5]]

    for epoch in (1, 2, 3):
        sink.log_metrics(dashboard.with_overview(_epoch_metrics(epoch)), step=epoch)
    sink.finish()
    later = visit("epoch3.png")
    for card in later.cards[:5]:
        assert "scatter" in card.traces and f"({card.key})" in card.text, f"no line of {card.key}: {card.text!r}"
