"""The exposition: exemplars in OpenMetrics, promtool-clean text format, health endpoints,
and a contract that pins every exported metric name to the catalogue."""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.request

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from exporter import catalogue as c
from exporter.metrics import SidecarMetrics
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
    "llm_exporter_requests_total",
    "llm_exporter_input_tokens_total",
    "llm_exporter_output_tokens_total",
    "llm_exporter_token_count_source_total",
    "llm_exporter_phase_source_total",
    "llm_exporter_errors_total",
    "llm_exporter_slo_requests_total",
    "llm_exporter_requests_in_flight",
    "llm_exporter_requests_queued",
    "llm_exporter_slo_threshold_seconds",
    "llm_exporter_build_info",
}


def test_catalogue_sidecar_names_are_the_contract() -> None:
    assert {m.exposed for m in c.SIDECAR} == SIDECAR_NAMES
    for m in c.ALL:
        assert m.name.startswith(("gen_ai_", c.PREFIX)), m.name
        assert ":" not in m.name
        if m.kind is c.Kind.HISTOGRAM and not m.name.endswith("_tokens"):
            assert m.name.endswith("_seconds"), m.name
        assert m.help.strip() and len(set(m.labels)) == len(m.labels)


def test_registry_exports_exactly_the_catalogue() -> None:
    registry = CollectorRegistry()
    SidecarMetrics(registry, Settings(upstream="http://x"), ProxyState(), {"ttft": 0.5})
    assert {m.name for m in registry.collect()} == {m.name for m in c.SIDECAR}
    for fam in registry.collect():
        spec = c.by_name(fam.name)
        for sample in fam.samples:
            assert set(sample.labels) - {"le"} <= set(spec.labels) | {"version", "engine"}


def test_slo_thresholds_and_custom_buckets_are_boundaries() -> None:
    registry = CollectorRegistry()
    SidecarMetrics(registry, Settings(upstream="http://x", buckets_ttft="0.2,1,3"),
                   ProxyState(), {"ttft": 0.35, "tpot": 0.042})
    text = "\n".join(str(x) for x in registry.collect())
    assert "0.35" in text and "0.042" in text


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
