"""Engine signals: the mapping for every engine (a real vLLM-CPU capture and faithful samples
for the others), aggregation across series, caching, the embedded engine's /engine/stats,
re-export, and the collector over real HTTP."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from exporter import catalogue as c
from exporter.collectors import register_collectors
from exporter.collectors.engine_metrics import (
    EngineCollector,
    EngineScraper,
    parse_signals,
)
from exporter.collectors.gpu import GpuCollector
from exporter.collectors.nvml import GPM_SM_ACTIVE, GpuProcess
from exporter.collectors.nvml_fake import FakeGpu, FakeNvml
from exporter.settings import Settings
from exporter.state import ProxyState

DATA = Path(__file__).parent / "data" / "engine_metrics"

# file -> (engine, waiting, running, kv usage, prefix hit, preemptions, busy seconds)
EXPECTED = {
    "sglang.txt": ("sglang", 3, 12, 0.635, 0.42, 7, None),
    "tgi.txt": ("tgi", 4, 8, None, None, None, 91.75),
    "trtllm-serve.txt": ("trtllm", 2, 6, 0.62, 0.3, None, None),
    "triton-trtllm.txt": ("trtllm", 3, 4, 0.6, None, None, None),
    "llamacpp.txt": ("llamacpp", 5, 2, 0.74, None, None, None),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_mapping(name: str) -> None:
    sig = parse_signals((DATA / name).read_text())
    engine, waiting, running, kv, hit, preempt, busy = EXPECTED[name]
    assert sig.up and sig.engine == engine
    assert sig.waiting == waiting and sig.running == running
    assert sig.kv_usage == (pytest.approx(kv) if kv is not None else None)
    assert sig.prefix_hit == (pytest.approx(hit) if hit is not None else None)
    assert sig.preemptions == preempt
    assert sig.busy_seconds == (pytest.approx(busy) if busy is not None else None)


def _vllm_samples() -> dict[str, list[float]]:
    """The capture read independently of the mapping: name -> values of every series."""
    out: dict[str, list[float]] = {}
    for line in (DATA / "vllm.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            out.setdefault(name, []).append(float(line.rsplit(" ", 1)[1]))
    return out


def test_mapping_real_vllm_capture() -> None:
    """tests/data/engine_metrics/vllm.txt: captured from vLLM-CPU 0.32 mid-load (header)."""
    raw = _vllm_samples()
    sig = parse_signals((DATA / "vllm.txt").read_text())
    assert sig.up and sig.engine == "vllm"
    assert sig.waiting == sum(raw["vllm:num_requests_waiting"])
    assert sig.running == sum(raw["vllm:num_requests_running"])
    assert sig.running and sig.running > 0  # captured while requests were running
    assert sig.kv_usage == pytest.approx(sum(raw["vllm:kv_cache_usage_perc"])
                                         / len(raw["vllm:kv_cache_usage_perc"]))
    assert 0 < sig.kv_usage <= 1
    assert sig.preemptions == sum(raw["vllm:num_preemptions_total"])
    queries = sum(raw["vllm:prefix_cache_queries_total"])
    assert queries > 0
    assert sig.prefix_hit == pytest.approx(sum(raw["vllm:prefix_cache_hits_total"]) / queries)


MULTI = """\
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="a"} 2.0
vllm:num_requests_waiting{engine="1",model_name="a"} 3.0
vllm:num_requests_waiting{engine="0",model_name="b"} 1.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="a"} 4.0
vllm:num_requests_running{engine="1",model_name="a"} 4.0
vllm:num_requests_running{engine="0",model_name="b"} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="a"} 0.9
vllm:kv_cache_usage_perc{engine="1",model_name="a"} 0.5
vllm:kv_cache_usage_perc{engine="0",model_name="b"} 0.1
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="a"} 300.0
vllm:prefix_cache_queries_total{engine="0",model_name="b"} 100.0
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="a"} 150.0
vllm:prefix_cache_hits_total{engine="0",model_name="b"} 50.0
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{engine="0",model_name="a"} 5.0
vllm:num_preemptions_total{engine="1",model_name="a"} 2.0
"""


def test_several_series_sum_counts_and_average_ratios() -> None:
    sig = parse_signals(MULTI)
    assert (sig.waiting, sig.running, sig.preemptions) == (6, 9, 7)
    assert sig.kv_usage == pytest.approx(0.5)
    assert sig.prefix_hit == pytest.approx(0.5)


def test_old_vllm_names_and_unknown_engines() -> None:
    old = ("# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc 0.25\n"
           "# TYPE vllm:gpu_prefix_cache_hit_rate gauge\nvllm:gpu_prefix_cache_hit_rate 0.5\n")
    sig = parse_signals(old)
    assert (sig.kv_usage, sig.prefix_hit, sig.waiting) == (0.25, 0.5, None)
    other = parse_signals("# TYPE http_requests_total counter\nhttp_requests_total 3\n")
    assert not other.up and other.engine == "unknown"


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeUpstream:
    def __init__(self, routes: dict[str, tuple[int, bytes]]) -> None:
        self.routes = routes
        self.calls: list[str] = []

    def __call__(self, url: str, timeout: float) -> tuple[int, bytes]:
        self.calls.append(url.rsplit("/", 1)[-1])
        if url not in self.routes:
            raise OSError("connection refused")
        return self.routes[url]


def scraper(up: FakeUpstream, clock: Clock) -> EngineScraper:
    return EngineScraper(lambda: "http://e/metrics", lambda: "http://e/engine/stats",
                         clock=clock, fetch=up)


def test_cached_briefly() -> None:
    clock = Clock()
    up = FakeUpstream({"http://e/metrics": (200, (DATA / "sglang.txt").read_bytes())})
    s = scraper(up, clock)
    assert s.signals().waiting == 3
    clock.t += 1.0
    s.signals()
    assert up.calls == ["metrics"]
    clock.t += 1.0
    s.signals()
    assert up.calls == ["metrics", "metrics"]


def test_embedded_engine_stats_when_no_metrics() -> None:
    clock = Clock()
    stats = {"busy_seconds": 12.5, "waiting": 4, "running": 8}
    up = FakeUpstream({"http://e/metrics": (404, b""),
                       "http://e/engine/stats": (200, json.dumps(stats).encode())})
    s = scraper(up, clock)
    sig = s.signals()
    assert (sig.engine, sig.up, sig.waiting, sig.running, sig.busy_seconds) == \
        ("embedded", True, 4, 8, 12.5)
    clock.t += 2
    s.signals()
    assert up.calls == ["metrics", "stats", "stats"]  # remembers which endpoint answers


def test_engine_down_exports_up_zero_and_no_stale_figures() -> None:
    reg = CollectorRegistry()
    s = scraper(FakeUpstream({}), Clock())
    reg.register(EngineCollector(s, ProxyState()))
    assert reg.get_sample_value(c.ENGINE_UP.name, {"engine": "unknown"}) == 0
    assert reg.get_sample_value(c.ENGINE_WAITING.name) is None


def test_reexport_keeps_engine_families_and_drops_clashing_ones() -> None:
    text = (DATA / "sglang.txt").read_text() + (
        "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 5.0\n")
    up = FakeUpstream({"http://e/metrics": (200, text.encode())})
    reg = CollectorRegistry()
    reg.register(EngineCollector(scraper(up, Clock()), ProxyState(), reexport=True))
    body = generate_latest(reg).decode()
    assert 'sglang:num_queue_reqs{engine_type="unified"' in body
    assert "process_cpu_seconds_total" not in body
    reg2 = CollectorRegistry()
    reg2.register(EngineCollector(scraper(up, Clock()), ProxyState()))
    assert "sglang:" not in generate_latest(reg2).decode()  # off by default


def test_busy_seconds_from_proxy_state_wins() -> None:
    up = FakeUpstream({"http://e/metrics": (200, (DATA / "tgi.txt").read_bytes())})
    reg = CollectorRegistry()
    state = ProxyState(engine_busy_seconds=3.25)
    reg.register(EngineCollector(scraper(up, Clock()), state))
    assert reg.get_sample_value(c.ENGINE_BUSY.exposed) == 3.25


# --- over real HTTP, through register_collectors -----------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, bytes]]] = {}

    def do_GET(self) -> None:
        status, body = self.routes.get(self.path, (404, b"not found"))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[tuple[str, dict[str, tuple[int, bytes]]]]:
    routes: ClassVar[dict[str, tuple[int, bytes]]] = {}
    handler = type("H", (_Handler,), {"routes": routes})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", routes
    srv.shutdown()
    srv.server_close()


def test_register_collectors_end_to_end(upstream: tuple[str, dict[str, tuple[int, bytes]]]
                                        ) -> None:
    url, routes = upstream
    routes["/metrics"] = (200, (DATA / "sglang.txt").read_bytes())
    reg = CollectorRegistry()
    state = ProxyState(queued=1)
    errors: list[str] = []
    register_collectors(reg, Settings(upstream=url, gpu_hourly_cost=2.0), state,
                        nvml=FakeNvml(), on_error=errors.append)
    v = reg.get_sample_value
    assert v(c.ENGINE_UP.name, {"engine": "sglang"}) == 1
    assert v(c.ENGINE_WAITING.name) == 3
    assert v(c.ENGINE_KV_USAGE.name) == pytest.approx(0.635)
    # saturation = max((1 queued + 3 waiting) / 5, 0.635 / 0.8) = max(0.8, 0.79375)
    assert v(c.SATURATION.name) == pytest.approx(0.8)
    # The engine process is the one listening on the upstream's port: this test process,
    # which the locator skips (it is the sidecar), so the engine is not found.
    assert v(c.PROCESS_UP.name, {"process": "sidecar"}) == 1
    assert v(c.GPU_COLLECTOR_UP.name, {"reason": "no_gpu"}) == 0
    assert v(c.HOURLY_COST.name) == 0  # no GPU seen: nothing to charge per GPU
    assert errors == []


def test_busy_engine_on_an_idle_gpu_reads_high_occupancy_low_utilisation(
        upstream: tuple[str, dict[str, tuple[int, bytes]]],
        caplog: pytest.LogCaptureFixture) -> None:
    """The H200 case (TOOLING.md, 2026-11-30): the embedded engine at full batch reads busy
    all the time while the GPU's SMs are 1-9 % active. Occupancy (rate of engine busy time)
    must read ~1 and the device-based utilisation ~0.05, not the other way round; a second GPU
    that another tenant keeps busy is not the engine's."""
    url, routes = upstream
    clock = Clock()
    engine_gpu = FakeGpu(uuid="GPU-e", name="NVIDIA H200", utilization=(15.0, 3.0),
                         gpm={GPM_SM_ACTIVE: 5.0}, processes=[GpuProcess(os.getpid(), 2**30)])
    other_gpu = FakeGpu(uuid="GPU-o", name="NVIDIA H200", utilization=(100.0, 60.0),
                        gpm={GPM_SM_ACTIVE: 90.0}, processes=[GpuProcess(1, 2**30)])
    reg = CollectorRegistry()
    errors: list[str] = []
    # the engine's processes are known (here: this one), as the locator finds them in a pod
    reg.register(GpuCollector(FakeNvml([engine_gpu, other_gpu]), clock=clock,
                              engine_pids=lambda: {os.getpid()}, on_error=errors.append))
    real_http = EngineScraper(lambda: url + "/metrics", lambda: url + "/engine/stats",
                              clock=clock)
    reg.register(EngineCollector(real_http, ProxyState(), on_error=errors.append))
    busy = 0.0
    samples: list[tuple[float, float]] = []
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            busy += 9.9  # 9.9 s of every 10 s with a batch in flight
            clock.t += 10.0
            routes["/engine/stats"] = (200, json.dumps(
                {"busy_seconds": busy, "waiting": 12, "running": 32}).encode())
            v = reg.get_sample_value
            samples.append((v(c.ENGINE_BUSY.exposed) or 0.0,
                            v(c.HARDWARE_UTILIZATION.name, {"source": "sm_active"}) or -1.0))
    occupancy = (samples[-1][0] - samples[0][0]) / 20.0
    assert occupancy == pytest.approx(0.99)
    assert samples[-1][1] == pytest.approx(0.05)  # the engine's GPU only, from GPM SM activity
    assert reg.get_sample_value(c.ENGINE_UP.name, {"engine": "embedded"}) == 1
    # /metrics answered 404 and /engine/stats answered: the embedded engine, nothing to warn
    assert not [r for r in caplog.records if "engine" in r.name], caplog.text
    assert errors == []


def test_hardware_utilisation_falls_back_to_nvml_and_to_every_gpu() -> None:
    reg = CollectorRegistry()
    gpus = [FakeGpu(uuid="GPU-a", utilization=(40.0, 0.0)),
            FakeGpu(uuid="GPU-b", utilization=(80.0, 0.0), gpm={GPM_SM_ACTIVE: 70.0})]
    reg.register(GpuCollector(FakeNvml(gpus), engine_pids=lambda: None))
    # no engine processes known: every GPU; not all of them have GPM: NVML for all
    assert reg.get_sample_value(c.HARDWARE_UTILIZATION.name, {"source": "nvml"}) == \
        pytest.approx(0.6)
    assert reg.get_sample_value(c.HARDWARE_UTILIZATION.name, {"source": "sm_active"}) is None
    empty = CollectorRegistry()
    empty.register(GpuCollector(FakeNvml([])))
    assert "hardware_utilization" not in generate_latest(empty).decode()


def test_unreachable_engine_metrics_are_still_reported(
        caplog: pytest.LogCaptureFixture) -> None:
    s = scraper(FakeUpstream({"http://e/metrics": (404, b"")}), Clock())
    with caplog.at_level(logging.WARNING):
        s.signals()
    assert "answered 404" in caplog.text
