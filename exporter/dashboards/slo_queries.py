"""SLO panels. Attainment comes straight from the sidecar's good/bad counters (so it follows
every variable); error budget and burn rate come from the recording rules of
``llm-exporter rules``, the only place that knows each objective's target. Those rules are
aggregated by model and SLO over the SLO file's selector, so only the model variable narrows
them."""

from __future__ import annotations

from typing import Any

from exporter import catalogue as c
from exporter import rules
from exporter.dashboards import promql as pq
from exporter.dashboards.panels import Q, stat, timeseries
from exporter.slo import DEFAULT_BURN_RATES

GOOD = f'{c.RESULT}="good"'
MODEL_ONLY = f'{{{c.MODEL}=~"${c.MODEL}"}}'
# The fastest page alert's windows: what the on-call person compares the burn with.
PAGE = DEFAULT_BURN_RATES[0]
THRESHOLD = "SLO threshold"


def good_ratio(window: str) -> str:
    """Share of requests that met each latency SLO over ``window``."""
    return (f"{pq.increase(c.SLO_REQUESTS, GOOD, by=(c.SLO,), window=window)} / "
            f"{pq.increase(c.SLO_REQUESTS, by=(c.SLO,), window=window)}")


def availability(window: str) -> str:
    """Share of requests answered with anything but a 5xx (or nothing) over ``window``."""
    bad = f'{c.STATUS_CLASS}=~"{"|".join(rules.BAD_STATUS_CLASSES)}"'
    total = pq.increase(c.REQUESTS, window=window)
    return f"1 - ({pq.increase(c.REQUESTS, bad, window=window)} or 0 * {total}) / {total}"


def bad_ratio(window: str = pq.RATE) -> str:
    """Share of requests that missed each SLO; 0 (not absent) while none did."""
    return (f"1 - {pq.rate(c.SLO_REQUESTS, GOOD, by=(c.SLO,), window=window)} / "
            f"{pq.rate(c.SLO_REQUESTS, by=(c.SLO,), window=window)}")


def threshold(slo: str) -> Q:
    """The SLO's threshold as a flat line on a latency panel."""
    return Q(pq.gauge(c.SLO_THRESHOLD, f'{c.SLO}="{slo}"', agg="max"), THRESHOLD, dashed=True)


def objective(slo: str) -> Q:
    """The SLO file's target for ``slo`` as a flat line (recording rule of the objectives)."""
    return Q(f'max({rules.SLO_OBJECTIVE}{{{c.SLO}="{slo}"}})', "objective", dashed=True)


def burn_rate(window: str) -> str:
    """Error ratio over ``window`` divided by the error budget (1 = spending exactly the
    budget over the SLO window). A model's own objective wins over the one for all models."""
    ratio = f"{rules.slo_error_ratio(window)}{MODEL_ONLY}"
    budget = f"(1 - {rules.SLO_OBJECTIVE}"
    return (f"max by ({c.SLO}) (({ratio} / on ({c.SLO}, {c.MODEL}) group_left () "
            f'{budget}{{{c.MODEL}!=""}})) or '
            f"({ratio} / on ({c.SLO}) group_left () {budget}{{{c.MODEL}=\"\"}})))")


def panels() -> list[Any]:
    slo = f"{{{{{c.SLO}}}}}"
    return [
        stat("SLO attainment", "Share of requests within each latency SLO's threshold, and "
             "answered without a 5xx, over the dashboard's time range.", "percentunit",
             Q(good_ratio(pq.RANGE), slo, instant=True),
             Q(availability(pq.RANGE), "availability", instant=True), w=6, h=8, decimals=2,
             steps=((None, "red"), (0.95, "orange"), (0.99, "green"))),
        stat("Error budget remaining", "Share of each SLO's error budget left over its window "
             "(the worst model; recording rules of `llm-exporter rules`).", "percentunit",
             Q(f"min by ({c.SLO}) ({rules.SLO_BUDGET_REMAINING}{MODEL_ONLY})", slo,
               instant=True),
             w=6, h=8, decimals=0, steps=((None, "red"), (0.25, "orange"), (0.5, "green"))),
        timeseries("Error budget burn rate", f"Bad-request ratio over the error budget (worst "
                   f"model); the page alert fires above {PAGE.factor:g} over both {PAGE.long} "
                   f"and {PAGE.short}.", "x",
                   Q(burn_rate(PAGE.long), f"{slo} {PAGE.long}"),
                   Q(burn_rate(PAGE.short), f"{slo} {PAGE.short}"),
                   Q(f"vector({PAGE.factor:g})", "page threshold", dashed=True), w=6),
        timeseries("Requests missing the SLO", "Share of requests judged bad against each "
                   "SLO's threshold, from the sidecar's counters.", "percentunit",
                   Q(bad_ratio(), f"{{{{{c.SLO}}}}}"), w=6),
    ]
