"""The guard rails of `make test`: ruff (lint + format), mypy and import-linter's layering contracts."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the tools are installed with the test extra, beside this Python


def _run(tool: str, *args: str) -> str:
    exe = BIN / tool
    assert exe.exists(), f"{tool} is not installed beside {sys.executable} (pip install -e '.[test]')"
    proc = subprocess.run([str(exe), *args], cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"{tool} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_ruff_lint_is_clean():
    assert "All checks passed" in _run("ruff", "check", ".")


def test_ruff_format_is_applied():
    assert "already formatted" in _run("ruff", "format", "--check", ".")


def test_mypy_is_clean():
    assert _run("mypy").startswith("Success: no issues found")


def test_imports_flow_one_way_without_cycles():
    out = _run("lint-imports")
    assert "0 broken" in out and " kept" in out


def test_module_docstrings_are_short():
    """Design essays live in docs/architecture.md; a module says what it is in at most five lines."""
    long = {}
    for path in sorted((REPO / "imagenet_ray").rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
        if doc and len(doc.strip().splitlines()) > 5:
            long[str(path.relative_to(REPO))] = len(doc.strip().splitlines())
    assert not long, f"module docstrings over 5 lines: {long}"
