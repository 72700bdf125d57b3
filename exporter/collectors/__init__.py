"""Scrape-time collectors: GPU (NVML), host and processes (psutil), the engine's own signals,
saturation and cost. Nothing runs between scrapes; each collector survives its own failures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from exporter.collectors.cost import COST_PER_MILLION_OUTPUT_TOKENS

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.registry import Collector

    from exporter.collectors.base import OnError
    from exporter.collectors.nvml import Nvml
    from exporter.settings import Settings
    from exporter.state import ProxyState

__all__ = ["COST_PER_MILLION_OUTPUT_TOKENS", "register_collectors"]


def register_collectors(registry: CollectorRegistry, settings: Settings, state: ProxyState, *,
                        nvml: Nvml | None = None,
                        clock: Callable[[], float] = time.monotonic,
                        on_error: OnError | None = None,
                        upstream: Callable[[], str] | None = None) -> list[Collector]:
    """Register every collector into ``registry`` once, at start-up; returns them in order.

    ``nvml``: an :class:`~exporter.collectors.nvml.Nvml` (tests pass ``FakeNvml``; default
    the real one). ``on_error(where)``: called for each failed collection; count it as an
    ``instrumentation`` error. ``upstream``: the upstream base URL, read at each scrape (for an
    embedded engine whose port is known only after start-up); default ``settings.upstream``.
    Order matters: GPU before cost (GPU count), engine before saturation (shared cache).
    """
    # Imported here: `python -m exporter.collectors.gpu` must not find gpu already imported.
    from exporter.collectors.cost import CostCollector
    from exporter.collectors.engine_metrics import EngineCollector, EngineScraper
    from exporter.collectors.gpu import GpuCollector
    from exporter.collectors.process import EngineLocator, ProcessCollector
    from exporter.collectors.saturation import SaturationCollector

    base = upstream or (lambda: settings.upstream)

    def metrics_url() -> str:
        url = settings.engine_metrics_url or base()
        return url if settings.engine_metrics_url or not url else url.rstrip("/") + "/metrics"

    def stats_url() -> str:
        url = base()
        return url.rstrip("/") + "/engine/stats" if url else ""

    locator = EngineLocator(settings, state, upstream=base, clock=clock)
    scraper = EngineScraper(metrics_url, stats_url, clock=clock)
    gpu = GpuCollector(nvml, enabled=settings.gpu, engine_pids=locator.pids,
                       on_error=on_error, clock=clock)
    collectors: list[Collector] = [
        gpu,
        ProcessCollector(locator, on_error=on_error, clock=clock),
        EngineCollector(scraper, state, reexport=settings.reexport_engine_metrics,
                        on_error=on_error),
        SaturationCollector(scraper, state, queue_threshold=settings.saturation_queue_threshold,
                            kv_threshold=settings.saturation_kv_threshold,
                            sidecar_queue=settings.max_concurrency > 0, on_error=on_error),
        CostCollector(gpu_hourly_cost=settings.gpu_hourly_cost,
                      replica_hourly_cost=settings.replica_hourly_cost,
                      gpu_count=gpu.gpu_count, clock=clock, on_error=on_error),
    ]
    for col in collectors:
        registry.register(col)
    return collectors
