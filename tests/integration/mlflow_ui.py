"""Headless Chromium on the MLflow UI: render a page to a screenshot and/or its DOM, and read the charts
of a run's "Model metrics" tab from that DOM.

A docs screenshot of a real run (the alias keeps the UI's assistant panel shut: it opens by itself on a
page served from localhost; the server must allow the alias, as `imagenet-ray services up`'s does):
    python tests/integration/mlflow_ui.py screenshot \
        'http://mlflow:5000/#/experiments/1/runs/<run_id>/model-metrics?workflowType=machine_learning' \
        docs/mlflow-run-page.png --resolve mlflow=127.0.0.1
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

INSTALL_HINT = "Chromium is not installed: run `make browser` (as root: apt-get install -y chromium)"
_BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# data-testid values of MLflow 3.17.2's chart sections and cards (RunsCompareSectionHeader, ChartCard).
_SECTION_HEADER = "experiment-view-compare-runs-section-header"
_CARD = "experiment-view-compare-runs-card"
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable on PATH, or None."""
    for name in _BINARIES:
        if path := shutil.which(name):
            return path
    return None


def render(
    url: str,
    *,
    screenshot: Path | None = None,
    profile_dir: Path | None = None,
    resolve: dict[str, str] | None = None,
    window: tuple[int, int] = (1400, 1600),
    budget_ms: int = 60_000,
    timeout_s: float = 240,
) -> str:
    """The DOM of `url` after the page settled (and its screenshot at `screenshot`). `profile_dir` keeps
    localStorage between calls (where the UI keeps a chart layout); `resolve` maps host names to
    addresses (`{"mlflow": "127.0.0.1"}`)."""
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError(INSTALL_HINT)
    with tempfile.TemporaryDirectory(prefix="mlflow-ui-") as scratch:
        cmd = [
            chromium,
            "--headless=new",
            "--no-sandbox",  # as root (CI containers) Chromium refuses to start with its sandbox
            "--disable-gpu",
            "--disable-dev-shm-usage",  # docker's 64 MB /dev/shm crashes the renderer
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={profile_dir or scratch}",
            f"--window-size={window[0]},{window[1]}",
            # Virtual time runs until the page is idle (fetches done) or the budget is spent; without
            # the compositor flag no frame is drawn, so the IntersectionObserver that mounts each
            # chart card never fires and every card stays a spinner.
            f"--virtual-time-budget={budget_ms}",
            "--run-all-compositor-stages-before-draw",
            "--dump-dom",
        ]
        if resolve:
            cmd.append("--host-resolver-rules=" + ", ".join(f"MAP {host} {ip}" for host, ip in resolve.items()))
        if screenshot is not None:
            cmd.append(f"--screenshot={screenshot}")
        proc = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        tail = "\n".join(proc.stderr.splitlines()[-20:])
        raise RuntimeError(f"chromium exited {proc.returncode} on {url} with no DOM:\n{tail}")
    return proc.stdout


@dataclass
class ChartCard:
    key: str  # the metric key (the title's tooltip; the card shows the part after the last `/`)
    text: str  # everything the card says: its title and its legend, "<run name> (<key>)"
    has_plot: bool  # a Plotly chart was drawn (off-screen cards stay spinners without a title)
    traces: list[str] = field(default_factory=list)  # Plotly's trace kinds: "bars" (one step), "scatter" (lines)


@dataclass
class ModelMetricsTab:
    sections: list[tuple[str, int]]  # (name, chart count) from top to bottom; all of them, drawn or not
    cards: list[ChartCard]  # the chart cards that were drawn, from top to bottom


class _ChartsParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.header_depth: int | None = None
        self.header_text: list[str] = []
        self.sections: list[tuple[str, int]] = []
        self.card_depth: int | None = None
        self.card: ChartCard | None = None
        self.cards: list[ChartCard] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        testid, classes = a.get("data-testid"), (a.get("class") or "").split()
        if testid == _SECTION_HEADER:
            self.header_depth, self.header_text = self.depth, []
        elif testid == _CARD:
            self.card_depth, self.card = self.depth, ChartCard(key="", text="", has_plot=False)
        elif self.card is not None:
            if tag == "h4" and not self.card.key:
                self.card.key = a.get("title") or ""
            if "js-plotly-plot" in classes:
                self.card.has_plot = True
            if classes[:1] == ["trace"] and len(classes) > 1:
                self.card.traces.append(classes[1])
        if tag not in _VOID:
            self.depth += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in _VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID:
            return
        self.depth -= 1
        if self.header_depth is not None and self.depth == self.header_depth:
            # The header says "<name>" then "(<count>)", then its buttons' labels.
            if len(self.header_text) < 2:
                raise ValueError(f"a chart section header without a name and count: {self.header_text}")
            self.sections.append((self.header_text[0], int(self.header_text[1].strip("()"))))
            self.header_depth = None
        if self.card is not None and self.depth == self.card_depth:
            self.card.text = " ".join(self.card.text.split())
            self.cards.append(self.card)
            self.card, self.card_depth = None, None

    def handle_data(self, data: str) -> None:
        if self.header_depth is not None and data.strip():
            self.header_text.append(data.strip())
        if self.card is not None:
            self.card.text += " " + data


def model_metrics_tab(dom: str) -> ModelMetricsTab:
    """The sections and drawn chart cards of a run page's "Model metrics" tab (MLflow 3.17.2's DOM)."""
    parser = _ChartsParser()
    parser.feed(dom)
    parser.close()
    return ModelMetricsTab(sections=parser.sections, cards=parser.cards)


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    shot = sub.add_parser("screenshot", help="render URL headless and save a PNG")
    shot.add_argument("url")
    shot.add_argument("out", type=Path)
    shot.add_argument("--resolve", action="append", default=[], metavar="HOST=IP", help="map a host name")
    shot.add_argument("--window", default="1400x1600", metavar="WxH")
    dom = sub.add_parser("dump-dom", help="print the rendered DOM of URL")
    dom.add_argument("url")
    dom.add_argument("--resolve", action="append", default=[], metavar="HOST=IP")
    args = ap.parse_args(argv)
    resolve = dict(item.split("=", 1) for item in args.resolve)
    try:
        if args.command == "screenshot":
            width, height = (int(v) for v in args.window.split("x"))
            render(args.url, screenshot=args.out.resolve(), resolve=resolve, window=(width, height))
            print(args.out)
        else:
            print(render(args.url, resolve=resolve))
    except (FileNotFoundError, RuntimeError) as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
