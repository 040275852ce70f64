"""What the MLflow UI shows first: copies of the headline metrics in an `0 overview` section on top.

MLflow 3.17 lays out a run's (and an experiment's) charts from metric names alone; `chart_sections`
predicts that layout, `with_overview` adds the copies to what a run logs.
"""

# Evidence, MLflow 3.17.2's UI bundle (mlflow/server/js/build/static/js/main.*.js,
# `getBaseChartAndSectionConfigs`, `updateChartAndSectionConfigs`, `extractChartSectionName`):
# - a chart's section is its metric name up to the last `/`; no `/` -> "Model metrics", `system/` ->
#   the "System metrics" tab;
# - sections are sorted by name (`sort()`, code units) with "Model metrics" last, and the charts in a
#   section by metric name; when metrics appear later (a running run, a bar chart becoming a line)
#   the stored layout is re-sorted with `localeCompare`, so names must sort the same both ways;
# - nothing a client stores on the server feeds it: the layout lives in the browser's localStorage
#   (per run on the run page), and the tag `mlflow.experiment.primaryMetric.name` is sorted away.
# So `data/decode_errors` comes first and `val/top1` near the end; a leading digit sorts before every
# letter both ways, and one digit per rank keeps the headline charts in their order.

from __future__ import annotations

from collections.abc import Iterable, Mapping
from urllib.parse import quote

__all__ = [
    "HEADLINE_METRICS",
    "MODEL_METRICS_SECTION",
    "OVERVIEW_KEYS",
    "OVERVIEW_SECTION",
    "chart_sections",
    "run_page_url",
    "with_overview",
]

# The charts a user looks at first, in the order they are shown.
HEADLINE_METRICS: tuple[str, ...] = (
    "val/top1",
    "val/top5",
    "train/loss",
    "perf/images_per_s",
    "perf/data_wait_frac",
)
OVERVIEW_SECTION = "0 overview"
# At most 9 headline metrics: "10" would sort before "2".
OVERVIEW_KEYS: dict[str, str] = {
    name: f"{OVERVIEW_SECTION}/{rank} {name.replace('/', ' ')}" for rank, name in enumerate(HEADLINE_METRICS, 1)
}

# MLflow 3.17.2's names (constants in the UI bundle): the section of names without a `/`, and the
# prefix of the metrics on the "System metrics" tab.
MODEL_METRICS_SECTION = "Model metrics"
_SYSTEM_PREFIX = "system/"
_TABS = ("overview", "model-metrics", "system-metrics", "artifacts")


def with_overview(metrics: Mapping[str, float]) -> dict[str, float]:
    """`metrics` plus a copy of each headline metric it holds under its `0 overview/...` name (log this
    instead of `metrics`: the copies share the step and timestamp of the originals)."""
    out = dict(metrics)
    for name, key in OVERVIEW_KEYS.items():
        if name in metrics:
            out[key] = metrics[name]
    return out


def _section(key: str) -> str:
    prefix = key.rsplit("/", 1)[0] if "/" in key else ""
    return prefix or MODEL_METRICS_SECTION


def chart_sections(metric_keys: Iterable[str]) -> list[tuple[str, list[str]]]:
    """The "Model metrics" tab of a run with these metrics as MLflow 3.17.2 first lays it out:
    (section, metric keys of its charts) from top to bottom. "Model metrics" is always there, even
    empty, as in the UI. Python's `sorted` orders ASCII names as JavaScript's `sort()` does."""
    by_section: dict[str, list[str]] = {MODEL_METRICS_SECTION: []}
    for key in sorted(set(metric_keys)):
        if not key.startswith(_SYSTEM_PREFIX):
            by_section.setdefault(_section(key), []).append(key)
    names = sorted(s for s in by_section if s != MODEL_METRICS_SECTION)
    return [(name, by_section[name]) for name in (*names, MODEL_METRICS_SECTION)]


def run_page_url(ui_url: str, experiment_id: str, run_id: str, tab: str = "model-metrics") -> str:
    """The MLflow 3.17 UI's page of a run (`tab`: overview, model-metrics, system-metrics, artifacts),
    with the sidebar in its "Model training" mode (it otherwise opens in its GenAI mode)."""
    if tab not in _TABS:
        raise ValueError(f"tab {tab!r}: one of {', '.join(_TABS)}")
    route = f"/experiments/{quote(experiment_id)}/runs/{quote(run_id)}/{tab}"
    return f"{ui_url.rstrip('/')}/#{route}?workflowType=machine_learning"
