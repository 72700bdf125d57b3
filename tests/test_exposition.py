"""The exposition: exemplars in OpenMetrics, promtool-clean text format, health endpoints,
and a contract that pins every exported metric name to the catalogue."""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from exporter import catalogue as c
from exporter.metrics import FlagSlos, SidecarMetrics
from exporter.settings import Settings
from exporter.state import ProxyState
from tests.harness import running_sidecar
from tests.upstream import Script, SyntheticUpstream

CHAT = "/v1/chat/completions"

# The contract: renaming any of these breaks dashboards, rules and users' queries.
SIDECAR_NAMES = {
    "gen_ai_server_time_to_first_token_seconds",
    "gen_ai_server_time_per_output_token_seconds",
    "gen_ai_server_request_duration_seconds",
    "llm_exporter_queue_duration_seconds",
    "llm_exporter_prefill_duration_seconds",
    "llm_exporter_decode_duration_seconds",
    "llm_exporter_engine_queue_duration_seconds",
    "llm_exporter_inter_token_latency_seconds",
    "llm_exporter_request_input_tokens",
    "llm_exporter_request_output_tokens",
    "llm_exporter_request_inputs",
    "llm_exporter_unmatched_requests_total",
    "llm_exporter_unmatched_request_duration_seconds",
    "llm_exporter_requests_total",
    "llm_exporter_input_tokens_total",
    "llm_exporter_output_tokens_total",
    "llm_exporter_token_count_source_total",
    "llm_exporter_phase_source_total",
    "llm_exporter_errors_total",
    "llm_exporter_slo_requests_total",
    "llm_exporter_goodput_requests_total",
    "llm_exporter_goodput_output_tokens_total",
    "llm_exporter_requests_in_flight",
    "llm_exporter_requests_queued",
    "llm_exporter_slo_load_ratio",
    "llm_exporter_capacity_requests_per_second",
    "llm_exporter_capacity_load_ratio",
    "llm_exporter_slo_threshold_seconds",
    "llm_exporter_event_loop_lag_seconds",
    "llm_exporter_build_info",
}


def test_catalogue_sidecar_names_are_the_contract() -> None:
    assert {m.exposed for m in c.SIDECAR} == SIDECAR_NAMES
    for m in c.ALL:
        assert m.name.startswith(("gen_ai_", c.PREFIX)), m.name
        assert ":" not in m.name
        if m.kind is c.Kind.HISTOGRAM and not m.name.endswith(("_tokens", "_inputs")):
            assert m.name.endswith("_seconds"), m.name
        assert m.help.strip() and len(set(m.labels)) == len(m.labels)


def test_registry_exports_exactly_the_catalogue() -> None:
    registry = CollectorRegistry()
    SidecarMetrics(registry, Settings(upstream="http://x", capacity_rps=2.0), ProxyState(),
                   FlagSlos(ttft=0.5))
    assert {m.name for m in registry.collect()} == {m.name for m in c.SIDECAR}
    bare = CollectorRegistry()  # without a calibrated capacity: no capacity series
    SidecarMetrics(bare, Settings(upstream="http://x"), ProxyState(), FlagSlos(ttft=0.5))
    assert {m.name for m in c.SIDECAR} - {m.name for m in bare.collect()} == {
        c.CAPACITY.name, c.CAPACITY_LOAD.name}
    for fam in registry.collect():
        spec = c.by_name(fam.name)
        for sample in fam.samples:
            assert set(sample.labels) - {"le"} <= set(spec.labels) | {"version", "engine"}


def test_slo_thresholds_and_custom_buckets_are_boundaries() -> None:
    registry = CollectorRegistry()
    m = SidecarMetrics(registry, Settings(upstream="http://x", buckets_ttft="0.2,1,3"),
                       ProxyState(), FlagSlos(ttft=0.35, tpot=0.042))
    m.ttft.labels("m", "chat").observe(0.3)
    m.tpot.labels("m", "chat").observe(0.04)
    les = {(s.name, s.labels.get("le")) for f in registry.collect() for s in f.samples}
    ttft = {le for name, le in les if name == "gen_ai_server_time_to_first_token_seconds_bucket"}
    assert ttft == {"0.2", "0.35", "1.0", "3.0", "+Inf"}
    assert ("gen_ai_server_time_per_output_token_seconds_bucket", "0.042") in les
    assert registry.get_sample_value("llm_exporter_slo_threshold_seconds", {"slo": "ttft"}) == 0.35


def test_per_model_objectives_judge_each_model_and_add_boundaries(tmp_path: Path) -> None:
    from exporter import slo
    from exporter.metrics import Outcome
    from exporter.timeline import Timeline, derive

    path = tmp_path / "slo.yaml"
    path.write_text(
        "objectives:\n"
        "  - {slo: ttft, threshold_seconds: 0.5, target: 0.99}\n"
        "  - {slo: ttft, threshold_seconds: 2.0, target: 0.99, model: big}\n")
    registry = CollectorRegistry()
    m = SidecarMetrics(registry, Settings(upstream="http://x"), ProxyState(), slo.load(path))
    tl = Timeline(arrival=0.0, admitted=0.0, dispatched=0.0)
    tl.content(1.0, 1)
    tl.end = 1.0
    for model in ("big", "small"):
        m.record(Outcome(model, "chat", "openai_chat", True, "2xx", "stop", derive(tl, 1), 1,
                         1, "usage", "usage", None))
    get = registry.get_sample_value
    assert get("llm_exporter_slo_requests_total", {"model": "big", "slo": "ttft",
                                                   "result": "good"}) == 1
    assert get("llm_exporter_slo_requests_total", {"model": "small", "slo": "ttft",
                                                   "result": "bad"}) == 1
    for le in ("0.5", "2.0"):
        assert get("gen_ai_server_time_to_first_token_seconds_bucket",
                   {"model": "big", "operation": "chat", "le": le}) is not None


async def test_exemplars_carry_trace_ids_and_promtool_passes() -> None:
    async with SyntheticUpstream(Script(ttft=0.01, itl=0.01, tokens=4)) as up, \
            running_sidecar(up.url) as sc, aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(sc.url + CHAT, json={"model": "m", "stream": True, "messages": [
                    {"role": "user", "content": "hi"}]}) as r:
                await r.read()
        om = sc.scrape(openmetrics=True)
        trace_ids = {x.context.trace_id for x in sc.finished_spans() if x.parent is None}
        found: dict[str, set[str]] = {}
        for fam in text_string_to_metric_families(om):
            for smp in fam.samples:
                if smp.exemplar is not None:
                    found.setdefault(fam.name, set()).add(smp.exemplar.labels["trace_id"])
        for spec in (c.TTFT, c.TPOT, c.REQUEST_DURATION, c.PREFILL, c.DECODE, c.ITL):
            assert spec.name in found, spec.name
            assert {int(t, 16) for t in found[spec.name]} <= trace_ids
        text = sc.scrape()
        assert "# {" not in text  # exemplars only in OpenMetrics
        promtool = shutil.which("promtool")
        if promtool is None:
            pytest.fail("promtool missing: run scripts/setup.sh test (Debian prometheus)")
        res = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                             capture_output=True, timeout=30)
        assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()


async def test_health_and_readiness() -> None:
    async with SyntheticUpstream() as up, running_sidecar(up.url) as sc:
        base = sc.metrics_url.removesuffix("/metrics")
        with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
            assert r.status == 200
        with urllib.request.urlopen(base + "/readyz", timeout=5) as r:
            assert r.status == 200 and b"reachable" in r.read()
    async with running_sidecar("http://127.0.0.1:9") as sc:
        base = sc.metrics_url.removesuffix("/metrics")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/readyz", timeout=5)
        assert e.value.code == 503
