"""Run the real sidecar in-process on 127.0.0.1 with fresh registry, tracer provider and an
in-memory span exporter, so tests read exactly what one sidecar recorded."""

from __future__ import annotations

import contextlib
import time
import urllib.request
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from exporter.app import Sidecar
from exporter.protocols.base import Dialect, StreamScanner
from exporter.settings import Settings


def scan(dialect: Dialect, data: bytes, cuts: list[int], strip: bool = False
         ) -> tuple[StreamScanner, int, bytes]:
    """Feed ``data`` to a scanner cut at ``cuts``; the scanner, content events, bytes out."""
    sc = StreamScanner(dialect, strip_usage=strip)
    events, out, prev = 0, b"", 0
    for cut in [*cuts, len(data)]:
        n, fwd = sc.feed(data[prev:cut])
        events += n
        out += fwd
        prev = cut
    n, tail = sc.flush()
    return sc, events + n, out + tail


def spy(obj: Any, name: str) -> list[Any]:
    """Every argument ``obj.name(arg)`` is called with; the real method still runs."""
    seen: list[Any] = []
    real = getattr(obj, name)

    def wrapper(arg: Any) -> Any:
        seen.append(arg)
        return real(arg)

    setattr(obj, name, wrapper)
    return seen


@dataclass
class Running:
    sidecar: Sidecar
    registry: CollectorRegistry
    spans: InMemorySpanExporter

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.metrics_port}/metrics"

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        self.recorded()
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v

    def recorded(self) -> None:
        """Record the requests that ended: what the sidecar does ``RECORD_DELAY`` later."""
        self.sidecar.instrumentation.flush()

    def collect(self) -> Iterable[Metric]:
        self.recorded()
        return self.registry.collect()

    def finished_spans(self) -> list[ReadableSpan]:
        self.recorded()
        return list(self.spans.get_finished_spans())

    def scrape(self, openmetrics: bool = False) -> str:
        self.recorded()
        req = urllib.request.Request(self.metrics_url)
        if openmetrics:
            req.add_header("Accept", "application/openmetrics-text; version=1.0.0")
        with urllib.request.urlopen(req, timeout=5) as r:
            return str(r.read().decode())

    async def settle(self) -> None:
        """Wait for deferred finishes (tokenizer counts, engine spans) to be recorded."""
        await self.sidecar.instrumentation.close()


@contextlib.asynccontextmanager
async def running_sidecar(upstream: str, **settings: Any) -> AsyncIterator[Running]:
    s = Settings(upstream=upstream, host="127.0.0.1", port=0, metrics_host="127.0.0.1",
                 metrics_port=0).replace(**settings).validate()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = CollectorRegistry()
    sidecar = Sidecar(s, registry, provider, clock=time.monotonic, collectors=False)
    await sidecar.start()
    try:
        yield Running(sidecar, registry, exporter)
    finally:
        await sidecar.stop()
        provider.shutdown()
