"""The SLO file: what it means, and the errors a mistyped one gets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from exporter import slo
from exporter.rules import DEFAULT_SLO

ROOT = Path(__file__).resolve().parent.parent


def test_default_file_is_the_documented_one() -> None:
    cfg = slo.load(ROOT / DEFAULT_SLO)
    assert cfg.thresholds() == {"ttft": 0.5, "tpot": 0.1, "e2e": 60.0}
    assert {(o.name, o.target) for o in cfg.objectives} == {
        ("ttft", 0.99), ("tpot", 0.99), ("e2e", 0.99), ("availability", 0.999),
        ("goodput", 0.95)}
    assert all(o.window == "30d" and o.model is None for o in cfg.objectives)
    assert cfg.burn_rates == slo.DEFAULT_BURN_RATES
    assert [(b.severity, b.factor, b.long, b.short) for b in cfg.burn_rates] == [
        ("page", 14.4, "1h", "5m"), ("page", 6.0, "6h", "30m"),
        ("ticket", 3.0, "1d", "2h"), ("ticket", 1.0, "3d", "6h")]
    assert cfg.severities() == ("page", "ticket")
    assert cfg.selector == 'job="llm-exporter"'


def test_minimal_file_gets_defaults() -> None:
    cfg = slo.parse({"objectives": [{"slo": "ttft", "threshold_seconds": 1, "target": 0.95}]})
    assert cfg.objectives == (slo.Objective("ttft", 0.95, 1.0, "30d", None),)
    assert cfg.burn_rates == slo.DEFAULT_BURN_RATES
    assert cfg.alerts == slo.Alerts()
    assert slo.parse(None).objectives == ()


def test_per_model_objectives_and_thresholds() -> None:
    cfg = slo.parse({"window": "7d", "objectives": [
        {"slo": "ttft", "threshold_seconds": 0.5, "target": 0.99},
        {"slo": "ttft", "model": "big", "threshold_seconds": 2, "target": 0.95, "window": "28d"},
        {"slo": "tpot", "model": "big", "threshold_seconds": 0.2, "target": 0.95},
        {"slo": "availability", "target": 0.999},
    ]})
    assert cfg.thresholds() == {"ttft": 0.5}  # per-model ones are not for every model
    assert cfg.threshold_for("ttft", "big") == 2.0
    assert cfg.threshold_for("ttft", "small") == 0.5
    assert cfg.threshold_for("tpot", "small") is None
    assert cfg.threshold_for("tpot", "big") == 0.2
    assert cfg.bucket_boundaries("ttft") == (0.5, 2.0)
    assert cfg.models_with_own("ttft") == ("big",)
    assert [o.window for o in cfg.objectives] == ["7d", "28d", "7d", "7d"]
    assert cfg.windows() == ("5m", "30m", "1h", "2h", "6h", "1d", "3d", "7d", "28d")
    assert cfg.objectives[-1].error_budget == pytest.approx(0.001)


def test_shortened_windows_for_tests() -> None:
    cfg = slo.parse({"objectives": [{"slo": "ttft", "threshold_seconds": 0.2, "target": 0.9}],
                     "burn_rates": [{"severity": "page", "factor": 5, "long": "20s",
                                     "short": "5s", "for": "2s"}],
                     "alerts": {"saturation_threshold": 0.5, "saturation_for": "10s"}})
    assert cfg.burn_rates == (slo.BurnRate("page", 5.0, "20s", "5s", "2s"),)
    assert cfg.alerts.saturation_threshold == 0.5 and cfg.alerts.saturation_for == "10s"


@pytest.mark.parametrize("text, seconds", [
    ("5m", 300), ("1h30m", 5400), ("3d", 259200), ("1w", 604800), ("500ms", 0.5), ("90s", 90)])
def test_durations(text: str, seconds: float) -> None:
    assert slo.duration_seconds(text) == seconds


OK = {"slo": "ttft", "threshold_seconds": 0.5, "target": 0.99}


@pytest.mark.parametrize("doc, message", [
    ([1, 2], "expected a mapping"),
    ({"objective": []}, "unknown key(s) 'objective'; allowed: selector"),
    ({"objectives": {"slo": "ttft"}}, "objectives: expected a list"),
    ({"objectives": [{**OK, "treshold": 1}]}, "objectives[0]: unknown key(s) 'treshold'"),
    ({"objectives": [{**OK, "slo": "latency"}]},
     "objectives[0]: slo: expected one of ttft, tpot, e2e, availability, goodput, got "
     "'latency'"),
    ({"objectives": [{**OK, "target": 99}]},
     "objectives[0]: target: must be between 0 and 1 (exclusive), got 99"),
    ({"objectives": [{**OK, "target": 1.0}]}, "target: must be between 0 and 1"),
    ({"objectives": [{**OK, "target": "99%"}]}, "target: expected a number, got '99%'"),
    ({"objectives": [{"slo": "ttft", "threshold_seconds": 1}]}, "target: required"),
    ({"objectives": [{"slo": "tpot", "target": 0.9}]},
     "threshold_seconds: required for a tpot objective"),
    ({"objectives": [{**OK, "threshold_seconds": 0}]}, "threshold_seconds: must be positive"),
    ({"objectives": [{"slo": "availability", "target": 0.99, "threshold_seconds": 1}]},
     "availability has no threshold"),
    ({"objectives": [OK, OK]}, "objectives[1]: a second ttft objective for all models"),
    ({"objectives": [{**OK, "model": "a"}, {**OK, "model": "a"}]},
     "a second ttft objective for model 'a'"),
    ({"objectives": [{**OK, "model": 'a"b'}]}, "model: expected a name"),
    ({"objectives": [{**OK, "window": "30 days"}]},
     "objectives[0]: window: not a Prometheus duration"),
    ({"window": "1mo"}, "window: not a Prometheus duration"),
    ({"selector": "job=llm-exporter"}, "selector: expected label matchers"),
    ({"runbook_url": "docs/runbook.md#x"}, "runbook_url: expected the runbook's URL without"),
    ({"burn_rates": []}, "burn_rates: expected a non-empty list"),
    ({"burn_rates": [{"severity": "page", "factor": 2, "long": "1h"}]},
     "burn_rates[0]: short: required"),
    ({"burn_rates": [{"severity": "page", "factor": 2, "long": "5m", "short": "1h"}]},
     "short window 1h must be shorter than long window 5m"),
    ({"burn_rates": [{"severity": "page", "factor": -1, "long": "1h", "short": "5m"}]},
     "factor: must be positive"),
    ({"burn_rates": [{"severity": "page page", "factor": 2, "long": "1h", "short": "5m"}]},
     "severity: expected a name"),
    ({"objectives": [{**OK, "target": 0.9}]},
     "burn_rates[0]: factor 14.4 x error budget 0.1 of the ttft objective (target 0.9) is "
     "1.44 >= 1: this alert could never fire"),
    ({"alerts": {"saturation_treshold": 1}}, "alerts: unknown key(s) 'saturation_treshold'"),
    ({"alerts": {"saturation_threshold": 0}}, "alerts: saturation_threshold: must be positive"),
    ({"alerts": {"loop_lag_threshold": 1}}, "alerts: loop_lag_threshold: must be below 1 s (the "
     "lag histogram's top bucket), got 1"),
    ({"alerts": {"exporter_down_for": "five minutes"}},
     "alerts: exporter_down_for: not a Prometheus duration"),
])
def test_errors_name_the_key(doc: Any, message: str) -> None:
    with pytest.raises(slo.SloError) as e:
        slo.parse(doc, source="slo.yaml")
    assert message in str(e.value)
    assert str(e.value).startswith("slo.yaml")


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(slo.SloError, match="cannot read SLO file"):
        slo.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("objectives: [\n")
    with pytest.raises(slo.SloError, match="not valid YAML"):
        slo.load(bad)
