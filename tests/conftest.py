"""The fault suite's report: a test records what it measured with the `fault_figures` fixture, and the
session writes every record to build/reliability/faults.json and a Markdown table (faults.md) beside it,
the figures docs/reliability.md quotes. Runs of a subset merge into the report (by scenario)."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path
from typing import Any

import pytest

REPORT_DIR = Path(__file__).resolve().parents[1] / "build" / "reliability"
_RECORDS: dict[str, dict[str, Any]] = {}


class FaultFigures:
    """`record(scenario, test=..., **figures)`: numbers a fault test measured (seconds, images, counts)."""

    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid

    def record(self, scenario: str, **figures: Any) -> None:
        _RECORDS[scenario] = {
            "test": self.nodeid,
            "date": dt.date.today().isoformat(),
            "machine": f"{os.cpu_count()} cores, {platform.machine()}",
            **figures,
        }
        print(f"\nFAULT-FIGURES {scenario}: {json.dumps(figures)}")


@pytest.fixture
def fault_figures(request: pytest.FixtureRequest) -> FaultFigures:
    return FaultFigures(request.node.nodeid)


def _markdown(records: dict[str, dict[str, Any]]) -> str:
    lines = ["| Scenario | Measured | Test | Date, machine |", "|---|---|---|---|"]
    for scenario, r in sorted(records.items()):
        figures = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("test", "date", "machine"))
        lines.append(f"| {scenario} | {figures} | `{r['test']}` | {r['date']}, {r['machine']} |")
    return "\n".join(lines) + "\n"


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not _RECORDS:
        return
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    path = REPORT_DIR / "faults.json"
    try:
        records = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        records = {}
    records.update(_RECORDS)
    path.write_text(json.dumps(records, indent=2, sort_keys=True) + "\n")
    (REPORT_DIR / "faults.md").write_text(_markdown(records))
