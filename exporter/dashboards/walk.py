"""Read generated dashboards back: every panel query and variable, with Grafana's variables
substituted the way "All" would. Tests, the integration check and the screenshot script share
it, so they all look at exactly what Grafana would run."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# Grafana's built-in interval variables, with values that suit a short test run.
INTERVALS = {"__rate_interval": "1m", "__range": "10m", "__interval": "15s"}
_VAR = re.compile(r"\$\{?(\w+)\}?")


@dataclass(frozen=True)
class PanelQuery:
    board: str  # dashboard uid
    panel_id: int
    panel: str  # title
    panel_type: str
    ref: str
    expr: str
    legend: str
    exemplar: bool
    instant: bool
    unit: str


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every non-row panel, including those inside collapsed rows."""
    for p in board.get("panels", []):
        if p.get("type") == "row":
            yield from p.get("panels", [])
        else:
            yield p


def unit(panel: dict[str, Any]) -> str:
    if panel.get("type") == "heatmap":
        return str(panel.get("options", {}).get("yAxis", {}).get("unit", ""))
    return str(panel.get("fieldConfig", {}).get("defaults", {}).get("unit", ""))


def panel_queries(board: dict[str, Any]) -> list[PanelQuery]:
    return [PanelQuery(board["uid"], p["id"], p["title"], p["type"], t["refId"], t["expr"],
                       t.get("legendFormat", ""), bool(t.get("exemplar")),
                       bool(t.get("instant")), unit(p))
            for p in panels(board) for t in p.get("targets", [])]


def variable_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, query) of every query variable."""
    return [(v["name"], v["query"]) for v in board["templating"]["list"]
            if v.get("type") == "query"]


def substitute(expr: str, values: Mapping[str, str] | None = None,
               intervals: Mapping[str, str] = INTERVALS, default: str = ".*") -> str:
    """``expr`` with every ``$var`` replaced: intervals, then ``values``, else ``default``
    (Grafana's "All" value on these dashboards)."""
    values = values or {}

    def one(m: re.Match[str]) -> str:
        name = m.group(1)
        return intervals.get(name) or values.get(name, default)

    return _VAR.sub(one, expr)


def label_values(query: str) -> tuple[str, str]:
    """``label_values(selector, label)`` -> (selector, label)."""
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query.strip())
    if not m:
        raise ValueError(f"not a label_values() query: {query!r}")
    return m.group(1), m.group(2)
