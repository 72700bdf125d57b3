"""The code stays as the style guide asks: ruff-clean everywhere, mypy --strict on the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_ruff() -> None:
    res = run("ruff", "check", "exporter", "tests", "bench", "scripts")
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_strict() -> None:
    res = run("mypy", "exporter")
    assert res.returncode == 0, res.stdout + res.stderr
