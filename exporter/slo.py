"""The SLO file: objectives, burn-rate windows and alert knobs, shared by the sidecar (which
counts each request good or bad against the thresholds) and ``llm-exporter rules`` (which turns
the same objectives into recording rules and alerts), so the two can never disagree.

A file looks like ``deploy/prometheus/slo.yaml``::

    selector: 'job="llm-exporter"'
    window: 30d
    objectives:
      - {slo: ttft, threshold_seconds: 0.5, target: 0.99}
      - {slo: ttft, model: big-model, threshold_seconds: 2, target: 0.95}
      - {slo: availability, target: 0.999}
      - {slo: goodput, target: 0.95}
    burn_rates:
      - {severity: page, factor: 14.4, long: 1h, short: 5m}
      ...
    alerts: {saturation_threshold: 0.9, ...}

Nothing here exits: problems raise :class:`SloError` with the offending key's path.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from exporter.catalogue import LOOP_LAG_BUCKETS

LATENCY_SLOS = ("ttft", "tpot", "e2e")
# goodput: the share of requests that succeeded and met every latency objective of their model
# at once (llm_exporter_goodput_requests_total); like availability, no threshold of its own.
SLOS = (*LATENCY_SLOS, "availability", "goodput")
NO_THRESHOLD = ("availability", "goodput")

_DURATION = re.compile(
    r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$")
_DURATION_UNITS = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)
# One or more PromQL label matchers: name="value", name=~"re", ... (comma-separated).
_MATCHER = r'\s*[A-Za-z_][A-Za-z0-9_]*\s*(?:=|!=|=~|!~)\s*"(?:[^"\\]|\\.)*"\s*'
_SELECTOR = re.compile(rf"^(?:{_MATCHER}(?:,{_MATCHER})*,?\s*)?$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+\-]*$")


class SloError(ValueError):
    """The SLO file is missing, unreadable or holds a value the rules cannot use."""


def duration_seconds(text: str) -> float:
    """Seconds in a Prometheus duration (``90s``, ``1h30m``, ``3d``); SloError otherwise."""
    m = _DURATION.match(text) if isinstance(text, str) else None
    if not text or m is None or not any(m.groups()):
        raise SloError(f"not a Prometheus duration (like 5m, 1h, 30d): {text!r}")
    return sum(int(g) * u for g, u in zip(m.groups(), _DURATION_UNITS, strict=True) if g)


@dataclass(frozen=True)
class Objective:
    """``target`` of requests meet the SLO over ``window``; for one model or all the others."""

    name: str  # ttft | tpot | e2e | availability
    target: float  # e.g. 0.99
    threshold_seconds: float | None = None  # latency SLOs only
    window: str = "30d"
    model: str | None = None  # None: every model without an objective of its own

    @property
    def error_budget(self) -> float:
        """The fraction of requests allowed to be bad."""
        return 1.0 - self.target


@dataclass(frozen=True)
class BurnRate:
    """Alert at ``severity`` when the error ratio exceeds ``factor`` x the error budget over
    both the ``long`` and the ``short`` window (the short one makes the alert reset quickly)."""

    severity: str
    factor: float
    long: str
    short: str
    for_: str = ""  # optional `for:` on the alert; the short window usually suffices


DEFAULT_BURN_RATES = (
    BurnRate("page", 14.4, "1h", "5m"),
    BurnRate("page", 6.0, "6h", "30m"),
    BurnRate("ticket", 3.0, "1d", "2h"),
    BurnRate("ticket", 1.0, "3d", "6h"),
)


@dataclass(frozen=True)
class Alerts:
    """Knobs of the alerts that are not SLO burn rates."""

    exporter_down_for: str = "5m"
    gpu_collector_down_for: str = "10m"
    upstream_unreachable_for: str = "5m"
    # Rate window of the upstream connect-error rate.
    upstream_rate_window: str = "5m"
    saturation_threshold: float = 0.9
    saturation_for: str = "15m"
    # p99 of the sidecar's event-loop lag (seconds): above it the sidecar is short of CPU and
    # its latencies read low by up to that much. Below the lag histogram's top bucket (1 s).
    loop_lag_threshold: float = 0.025
    loop_lag_for: str = "15m"
    severity: str = "warning"  # severity label of these alerts (exporter down: page)
    exporter_down_severity: str = "page"


@dataclass(frozen=True)
class SloConfig:
    objectives: tuple[Objective, ...]
    burn_rates: tuple[BurnRate, ...] = DEFAULT_BURN_RATES
    alerts: Alerts = field(default_factory=Alerts)
    # Label matchers selecting the sidecar's series (and its `up`), e.g. 'job="llm-exporter"'.
    selector: str = 'job="llm-exporter"'
    # Where the runbook lives; each alert links to BASE#<alert name, lower-cased>.
    runbook_url: str = "docs/runbook.md"

    def thresholds(self) -> dict[str, float]:
        """{slo: seconds} of the latency objectives that apply to every model."""
        return {o.name: o.threshold_seconds for o in self.objectives
                if o.model is None and o.threshold_seconds is not None}

    def threshold_for(self, slo: str, model: str) -> float | None:
        """The threshold a request for ``model`` is judged against (None: not an SLO)."""
        best = None
        for o in self.objectives:
            if o.name == slo and o.threshold_seconds is not None:
                if o.model == model:
                    return o.threshold_seconds
                if o.model is None:
                    best = o.threshold_seconds
        return best

    def bucket_boundaries(self, slo: str) -> tuple[float, ...]:
        """Every threshold of one latency SLO (all models): each must be a bucket boundary."""
        return tuple(sorted({o.threshold_seconds for o in self.objectives
                             if o.name == slo and o.threshold_seconds is not None}))

    def models_with_own(self, slo: str) -> tuple[str, ...]:
        """Models that have an objective of their own for ``slo``."""
        return tuple(sorted(o.model for o in self.objectives
                            if o.name == slo and o.model is not None))

    def windows(self) -> tuple[str, ...]:
        """Every window an error ratio is recorded over, shortest first."""
        ws = {w for b in self.burn_rates for w in (b.long, b.short)}
        ws |= {o.window for o in self.objectives}
        return tuple(sorted(ws, key=duration_seconds))

    def severities(self) -> tuple[str, ...]:
        """Burn-rate severities, most urgent (highest factor) first."""
        order: list[str] = []
        for b in sorted(self.burn_rates, key=lambda b: -b.factor):
            if b.severity not in order:
                order.append(b.severity)
        return tuple(order)


# --- parsing -------------------------------------------------------------------------------------

def load(path: str | Path) -> SloConfig:
    """Read and validate an SLO file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SloError(f"cannot read SLO file {str(p)!r}: {e.strerror or e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SloError(f"{p}: not valid YAML: {e}") from e
    return parse(data, source=str(p))


def parse(data: Any, source: str = "slo") -> SloConfig:
    """Validate a parsed SLO document (a mapping) into an :class:`SloConfig`."""
    if data is None:
        data = {}
    top = _mapping(data, source)
    _only(top, source, ("selector", "window", "objectives", "burn_rates", "alerts",
                        "runbook_url"))
    window = _duration(top.get("window", "30d"), f"{source}: window")
    selector = top.get("selector", SloConfig.selector)
    if not isinstance(selector, str) or not _SELECTOR.match(selector):
        raise SloError(f'{source}: selector: expected label matchers like job="llm-exporter", '
                       f"got {selector!r}")
    runbook = top.get("runbook_url", SloConfig.runbook_url)
    if not isinstance(runbook, str) or not runbook or "#" in runbook:
        raise SloError(f"{source}: runbook_url: expected the runbook's URL without an anchor, "
                       f"got {runbook!r}")

    raw_objectives = top.get("objectives", [])
    if not isinstance(raw_objectives, list):
        raise SloError(f"{source}: objectives: expected a list")
    objectives = tuple(_objective(o, f"{source}: objectives[{i}]", window)
                       for i, o in enumerate(raw_objectives))
    seen: set[tuple[str, str | None]] = set()
    for i, o in enumerate(objectives):
        if (o.name, o.model) in seen:
            who = f"model {o.model!r}" if o.model else "all models"
            raise SloError(f"{source}: objectives[{i}]: a second {o.name} objective for {who}")
        seen.add((o.name, o.model))

    if "burn_rates" in top:
        raw_rates = top["burn_rates"]
        if not isinstance(raw_rates, list) or not raw_rates:
            raise SloError(f"{source}: burn_rates: expected a non-empty list")
        burn_rates = tuple(_burn_rate(b, f"{source}: burn_rates[{i}]")
                           for i, b in enumerate(raw_rates))
    else:
        burn_rates = DEFAULT_BURN_RATES
    for i, b in enumerate(burn_rates):
        for o in objectives:
            if b.factor * o.error_budget >= 1.0:
                raise SloError(
                    f"{source}: burn_rates[{i}]: factor {b.factor} x error budget "
                    f"{o.error_budget:g} of the {o.name} objective (target {o.target}) is "
                    f"{b.factor * o.error_budget:g} >= 1: this alert could never fire")
    alerts = _alerts(top.get("alerts", {}), f"{source}: alerts")
    return SloConfig(objectives=objectives, burn_rates=burn_rates, alerts=alerts,
                     selector=selector.strip(), runbook_url=runbook)


def _mapping(v: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise SloError(f"{where}: expected a mapping, got {type(v).__name__}")
    return v


def _only(m: Mapping[str, Any], where: str, allowed: tuple[str, ...]) -> None:
    unknown = [k for k in m if k not in allowed]
    if unknown:
        raise SloError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                       f"allowed: {', '.join(allowed)}")


def _duration(v: Any, where: str) -> str:
    try:
        duration_seconds(v)
    except SloError as e:
        raise SloError(f"{where}: {e}") from None
    return str(v)


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise SloError(f"{where}: expected a number, got {v!r}")
    return float(v)


def _label_value(v: Any, where: str) -> str:
    if not isinstance(v, str) or not _LABEL_VALUE.match(v):
        raise SloError(f"{where}: expected a name of letters, digits and ._:/@+-, got {v!r}")
    return v


def _objective(raw: Any, where: str, default_window: str) -> Objective:
    m = _mapping(raw, where)
    _only(m, where, ("slo", "target", "threshold_seconds", "window", "model"))
    name = m.get("slo")
    if name not in SLOS:
        raise SloError(f"{where}: slo: expected one of {', '.join(SLOS)}, got {name!r}")
    if "target" not in m:
        raise SloError(f"{where}: target: required (e.g. 0.99)")
    target = _number(m["target"], f"{where}: target")
    if not 0.0 < target < 1.0:
        raise SloError(f"{where}: target: must be between 0 and 1 (exclusive), got {target:g}")
    threshold: float | None = None
    if name in NO_THRESHOLD:
        if "threshold_seconds" in m:
            raise SloError(f"{where}: threshold_seconds: {name} has no threshold of its own "
                           + ("(good = any response that is not 5xx)" if name == "availability"
                              else "(good = met every latency objective at once)"))
    else:
        if "threshold_seconds" not in m:
            raise SloError(f"{where}: threshold_seconds: required for a {name} objective")
        threshold = _number(m["threshold_seconds"], f"{where}: threshold_seconds")
        if threshold <= 0:
            raise SloError(f"{where}: threshold_seconds: must be positive, got {threshold:g}")
    window = _duration(m.get("window", default_window), f"{where}: window")
    model = m.get("model")
    if model is not None:
        model = _label_value(model, f"{where}: model")
    return Objective(name=name, target=target, threshold_seconds=threshold, window=window,
                     model=model)


def _burn_rate(raw: Any, where: str) -> BurnRate:
    m = _mapping(raw, where)
    _only(m, where, ("severity", "factor", "long", "short", "for"))
    for key in ("severity", "factor", "long", "short"):
        if key not in m:
            raise SloError(f"{where}: {key}: required")
    severity = _label_value(m["severity"], f"{where}: severity")
    factor = _number(m["factor"], f"{where}: factor")
    if factor <= 0:
        raise SloError(f"{where}: factor: must be positive, got {factor:g}")
    long = _duration(m["long"], f"{where}: long")
    short = _duration(m["short"], f"{where}: short")
    if duration_seconds(short) >= duration_seconds(long):
        raise SloError(f"{where}: short window {short} must be shorter than long window {long}")
    for_ = _duration(m["for"], f"{where}: for") if m.get("for") else ""
    return BurnRate(severity=severity, factor=factor, long=long, short=short, for_=for_)


def _alerts(raw: Any, where: str) -> Alerts:
    m = _mapping(raw if raw is not None else {}, where)
    defaults = Alerts()
    allowed = tuple(Alerts.__dataclass_fields__)
    _only(m, where, allowed)
    values: dict[str, Any] = {}
    for key in allowed:
        if key not in m:
            continue
        default = getattr(defaults, key)
        if key.endswith("_for") or key.endswith("_window"):
            values[key] = _duration(m[key], f"{where}: {key}")
        elif isinstance(default, float):
            values[key] = _number(m[key], f"{where}: {key}")
            if values[key] <= 0:
                raise SloError(f"{where}: {key}: must be positive, got {values[key]:g}")
            if key == "loop_lag_threshold" and values[key] >= LOOP_LAG_BUCKETS[-1]:
                raise SloError(f"{where}: {key}: must be below {LOOP_LAG_BUCKETS[-1]:g} s (the "
                               f"lag histogram's top bucket), got {values[key]:g}")
        else:
            values[key] = _label_value(m[key], f"{where}: {key}")
    return Alerts(**values)
