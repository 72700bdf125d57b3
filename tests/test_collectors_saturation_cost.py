"""Saturation, cost, and the promise that a failing collector never breaks a scrape."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from exporter import catalogue as c
from exporter.collectors.cost import (
    COST_PER_MILLION_OUTPUT_TOKENS,
    CostCollector,
    cost_per_million_output_tokens,
)
from exporter.collectors.engine_metrics import EngineScraper, EngineSignals
from exporter.collectors.gpu import GpuCollector
from exporter.collectors.nvml_fake import FakeGpu, FakeNvml
from exporter.collectors.saturation import SaturationCollector, saturation_ratio
from exporter.state import ProxyState


def test_saturation_definition() -> None:
    def sat(q: float, w: float | None, kv: float | None, qt: float = 5, kt: float = 0.8
            ) -> float:
        return saturation_ratio(q, w, kv, queue_threshold=qt, kv_threshold=kt)

    assert sat(0, 0, 0.0) == 0
    assert sat(2, 3, 0.1) == pytest.approx(1.0)  # queue: (2 + 3) / 5
    assert sat(0, 1, 0.96) == pytest.approx(1.2)  # KV: 0.96 / 0.8
    assert sat(4, None, None) == pytest.approx(0.8)  # no engine metrics: sidecar queue alone
    assert sat(10, 0, 0.4, qt=0) == pytest.approx(0.5)  # queue term disabled
    assert sat(0, 0, 0.99, kt=0) == 0  # KV term disabled


class StaticScraper(EngineScraper):
    def __init__(self, sig: EngineSignals) -> None:
        self.sig = sig

    def signals(self) -> EngineSignals:
        return self.sig


def test_saturation_collector_reads_live_state() -> None:
    state = ProxyState(queued=2)
    sc = StaticScraper(EngineSignals("vllm", True, waiting=1, kv_usage=0.2))
    reg = CollectorRegistry()
    reg.register(SaturationCollector(sc, state, queue_threshold=5, kv_threshold=0.8))
    assert reg.get_sample_value(c.SATURATION.name) == pytest.approx(0.6)
    state.queued = 9
    assert reg.get_sample_value(c.SATURATION.name) == pytest.approx(2.0)


def test_saturation_is_absent_when_no_input_is_known() -> None:
    """Engine metrics unreachable and no sidecar queue: no figure rather than a false 0."""
    sc = StaticScraper(EngineSignals("unknown", False))
    for sidecar_queue, expected in ((False, None), (True, 0.0)):
        reg = CollectorRegistry()
        reg.register(SaturationCollector(sc, ProxyState(), queue_threshold=5, kv_threshold=0.8,
                                         sidecar_queue=sidecar_queue))
        assert reg.get_sample_value(c.SATURATION.name) == expected
    sc.sig = EngineSignals("vllm", True, waiting=0, kv_usage=0.1)
    reg = CollectorRegistry()
    reg.register(SaturationCollector(sc, ProxyState(), queue_threshold=5, kv_threshold=0.8,
                                     sidecar_queue=False))
    assert reg.get_sample_value(c.SATURATION.name) == pytest.approx(0.125)


class Clock:
    def __init__(self) -> None:
        self.t = 500.0

    def __call__(self) -> float:
        return self.t


def test_cost_accumulates_hours_times_hourly_cost() -> None:
    clock = Clock()
    nvml = FakeNvml([FakeGpu(uuid="GPU-a"), FakeGpu(uuid="GPU-b")])
    reg = CollectorRegistry()
    gpu = GpuCollector(nvml, clock=clock)
    reg.register(gpu)
    reg.register(CostCollector(gpu_hourly_cost=2.5, replica_hourly_cost=0.4,
                               gpu_count=gpu.gpu_count, clock=clock))
    assert reg.get_sample_value(c.HOURLY_COST.name) == pytest.approx(5.4)  # 2 x 2.5 + 0.4
    assert reg.get_sample_value(c.COST.exposed) == 0
    clock.t += 1800  # half an hour
    assert reg.get_sample_value(c.COST.exposed) == pytest.approx(2.7)
    nvml.gpus.pop()  # a GPU goes away: each scrape charges the interval at the rate it sees
    clock.t += 3600
    assert reg.get_sample_value(c.HOURLY_COST.name) == pytest.approx(2.9)
    assert reg.get_sample_value(c.COST.exposed) == pytest.approx(2.7 + 2.9)


def test_cost_per_million_output_tokens_query() -> None:
    assert COST_PER_MILLION_OUTPUT_TOKENS == (
        "sum(rate(llm_exporter_cost_dollars_total[5m])) / "
        "sum(rate(llm_exporter_output_tokens_total[5m])) * 1e6")
    q = cost_per_million_output_tokens("1h", by="namespace, pod")
    assert q.startswith("sum by (namespace, pod)(rate(llm_exporter_cost_dollars_total[1h]))")
    promql_parser = pytest.importorskip("promql_parser")
    promql_parser.parse(COST_PER_MILLION_OUTPUT_TOKENS)
    promql_parser.parse(q)


class Boom(Exception):
    pass


class ExplodingScraper(EngineScraper):
    def __init__(self) -> None:
        pass

    def signals(self) -> EngineSignals:
        raise Boom("engine scraper exploded")


def test_a_failing_collector_never_breaks_the_scrape(caplog: pytest.LogCaptureFixture
                                                     ) -> None:
    errors: list[str] = []
    reg = CollectorRegistry()
    reg.register(SaturationCollector(ExplodingScraper(), ProxyState(), queue_threshold=5,
                                     kv_threshold=0.8, on_error=errors.append))
    reg.register(CostCollector(gpu_hourly_cost=1, replica_hourly_cost=1,
                               on_error=errors.append))
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            body = generate_latest(reg).decode()
            assert "llm_exporter_hourly_cost_dollars 1.0" in body
            assert c.SATURATION.name + " " not in body
    assert errors == ["collector:saturation"] * 3  # counted every time
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(logged) == 1 and logged[0].exc_info  # logged once, with the traceback


def test_a_raising_on_error_hook_is_contained() -> None:
    def hook(where: str) -> None:
        raise RuntimeError("hook broken")

    reg = CollectorRegistry()
    reg.register(SaturationCollector(ExplodingScraper(), ProxyState(), queue_threshold=5,
                                     kv_threshold=0.8, on_error=hook))
    generate_latest(reg)


def test_describe_does_not_collect() -> None:
    """Registration must not touch NVML, psutil or the network."""
    nvml = FakeNvml([FakeGpu()])
    reg = CollectorRegistry()
    reg.register(GpuCollector(nvml))
    assert nvml.init_calls == 0
    with pytest.raises(ValueError, match="Duplicated"):
        reg.register(GpuCollector(nvml))
