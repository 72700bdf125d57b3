"""The README's promises: its metric table is the catalogue's, its first lines are the two
commands, and .ci/run runs the test command."""

from __future__ import annotations

from pathlib import Path

from scripts.gen_readme import README, render

ROOT = Path(__file__).resolve().parent.parent


def test_metric_table_is_fresh() -> None:
    text = README.read_text()
    assert render(text) == text, "run `make generate`"


def test_first_lines_are_the_two_commands() -> None:
    head = README.read_text().splitlines()[:6]
    assert any(line.startswith("make demo") for line in head)
    assert any(line.startswith("make test") for line in head)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
