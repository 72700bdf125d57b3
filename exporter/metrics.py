"""Prometheus instruments for the sidecar, created once from the catalogue into a registry
passed in (no global registry), and the one place a finished request becomes observations."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from exporter import __version__
from exporter import catalogue as c
from exporter.settings import Settings
from exporter.state import ProxyState
from exporter.timeline import Intervals

log = logging.getLogger(__name__)


LATENCY_SLOS = ("ttft", "tpot", "e2e")


class SloPolicy(Protocol):
    """Which threshold a request is judged against (``exporter.slo.SloConfig`` is one)."""

    def threshold_for(self, slo: str, model: str) -> float | None: ...

    def bucket_boundaries(self, slo: str) -> tuple[float, ...]: ...


@dataclass(frozen=True)
class FlagSlos:
    """The ``--slo-ttft/--slo-tpot/--slo-e2e`` thresholds, for every model (0: none)."""

    ttft: float = 0.0
    tpot: float = 0.0
    e2e: float = 0.0

    def threshold_for(self, slo: str, model: str) -> float | None:
        return float(getattr(self, slo, 0.0)) or None

    def bucket_boundaries(self, slo: str) -> tuple[float, ...]:
        value = float(getattr(self, slo, 0.0))
        return (value,) if value else ()


def histogram_buckets(settings: Settings, slo: SloPolicy) -> dict[str, tuple[float, ...]]:
    """Buckets per histogram: configured or default, always including every SLO threshold
    (each model's too), so the SLI read from a histogram is exact."""

    def merge(base: tuple[float, ...], extra: tuple[float, ...] = ()) -> tuple[float, ...]:
        return tuple(sorted(set(base) | set(extra)))

    return {
        c.TTFT.name: merge(settings.buckets("ttft", c.TTFT_BUCKETS), slo.bucket_boundaries("ttft")),
        c.TPOT.name: merge(settings.buckets("tpot", c.TPOT_BUCKETS), slo.bucket_boundaries("tpot")),
        c.REQUEST_DURATION.name: merge(settings.buckets("duration", c.DURATION_BUCKETS),
                                       slo.bucket_boundaries("e2e")),
        c.ITL.name: merge(settings.buckets("itl", c.ITL_BUCKETS)),
    }


@dataclass(frozen=True, slots=True)
class Outcome:
    """Everything about one finished LLM request that becomes a metric (all labels bounded)."""

    model: str
    operation: str
    stream: bool
    status_class: str
    finish_reason: str
    intervals: Intervals
    input_tokens: int | None
    output_tokens: int | None
    input_source: str
    output_source: str
    trace_id: str | None


class _StateCollector(Collector):
    """In-flight and queued, read from the proxy's live state at scrape time."""

    def __init__(self, state: ProxyState) -> None:
        self._state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(c.IN_FLIGHT.name, c.IN_FLIGHT.help, value=self._state.in_flight)
        yield GaugeMetricFamily(c.QUEUED.name, c.QUEUED.help, value=self._state.queued)


class SidecarMetrics:
    def __init__(self, registry: CollectorRegistry, settings: Settings, state: ProxyState,
                 slo: SloPolicy) -> None:
        self.slo = slo
        buckets = histogram_buckets(settings, slo)

        phase = settings.buckets("phase", c.PHASE_BUCKETS)

        def hist(spec: c.MetricSpec) -> Histogram:
            default = phase if spec.buckets is c.PHASE_BUCKETS else spec.buckets
            return Histogram(spec.name, spec.help, spec.labels, registry=registry,
                             buckets=buckets.get(spec.name, default))

        self.ttft = hist(c.TTFT)
        self.tpot = hist(c.TPOT)
        self.duration = hist(c.REQUEST_DURATION)
        self.queue, self.prefill, self.decode, self.engine_queue = (
            hist(c.QUEUE), hist(c.PREFILL), hist(c.DECODE), hist(c.ENGINE_QUEUE))
        self.itl = hist(c.ITL)
        self.input_per_request = hist(c.INPUT_TOKENS_PER_REQUEST)
        self.output_per_request = hist(c.OUTPUT_TOKENS_PER_REQUEST)
        self.requests = Counter(c.REQUESTS.name, c.REQUESTS.help, c.REQUESTS.labels,
                                registry=registry)
        self.input_tokens = Counter(c.INPUT_TOKENS.name, c.INPUT_TOKENS.help,
                                    c.INPUT_TOKENS.labels, registry=registry)
        self.output_tokens = Counter(c.OUTPUT_TOKENS.name, c.OUTPUT_TOKENS.help,
                                     c.OUTPUT_TOKENS.labels, registry=registry)
        self.token_source = Counter(c.TOKEN_SOURCE.name, c.TOKEN_SOURCE.help,
                                    c.TOKEN_SOURCE.labels, registry=registry)
        self.phase_source = Counter(c.PHASE_SOURCE.name, c.PHASE_SOURCE.help,
                                    c.PHASE_SOURCE.labels, registry=registry)
        self.errors = Counter(c.ERRORS.name, c.ERRORS.help, c.ERRORS.labels, registry=registry)
        self.slo_requests = Counter(c.SLO_REQUESTS.name, c.SLO_REQUESTS.help,
                                    c.SLO_REQUESTS.labels, registry=registry)
        threshold = Gauge(c.SLO_THRESHOLD.name, c.SLO_THRESHOLD.help, c.SLO_THRESHOLD.labels,
                          registry=registry)
        for name in LATENCY_SLOS:
            value = slo.threshold_for(name, "")  # the objective for every model
            if value:
                threshold.labels(name).set(value)
        self.build = Info(c.BUILD_INFO.name, c.BUILD_INFO.help, registry=registry)
        self.build.info({"version": __version__, c.ENGINE: state.engine})
        registry.register(_StateCollector(state))
        for t in ("upstream_connect", "upstream_timeout", "upstream_protocol",
                  "client_disconnect", "queue_full", "instrumentation"):
            self.errors.labels(t)  # exported at 0 from the start, so rate() works at once
        self._logged: set[str] = set()

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def instrumentation_error(self, where: str, exc: BaseException | None = None) -> None:
        """Count it; log the first occurrence per place with its traceback, then stay quiet."""
        self.errors.labels("instrumentation").inc()
        if where not in self._logged:
            self._logged.add(where)
            log.error("instrumentation error in %s (counted in %s; logged once)", where,
                      c.ERRORS.exposed, exc_info=exc)

    def record(self, o: Outcome) -> None:
        iv = o.intervals
        lat = (o.model, o.operation)
        ex: dict[str, str] | None = {"trace_id": o.trace_id} if o.trace_id else None
        self.requests.labels(o.model, o.operation, "true" if o.stream else "false",
                             o.status_class, o.finish_reason).inc()
        if iv.e2e is not None:
            self.duration.labels(*lat, "true" if o.stream else "false").observe(iv.e2e, ex)
        if iv.queue is not None:
            self.queue.labels(*lat).observe(iv.queue, ex)
        ok = o.status_class == "2xx" and o.finish_reason not in ("cancelled", "error")
        if not ok:
            return
        _observe(self.ttft, lat, iv.ttft, ex)
        _observe(self.tpot, lat, iv.tpot, ex)
        _observe(self.prefill, lat, iv.prefill, ex)
        _observe(self.decode, lat, iv.decode, ex)
        _observe(self.engine_queue, lat, iv.engine_queue, ex)
        if iv.itl:
            # One observation per token (as SGLang does); the exemplar rides on the last.
            child = self.itl.labels(*lat)
            for value, count in iv.itl[:-1]:
                for _ in range(count):
                    child.observe(value)
            value, count = iv.itl[-1]
            for _ in range(count - 1):
                child.observe(value)
            child.observe(value, ex)
        for phase, value in (("prefill", iv.prefill), ("decode", iv.decode),
                             ("engine_queue", iv.engine_queue)):
            if value is not None:
                self.phase_source.labels(phase, iv.phase_source).inc()
        if o.input_tokens is not None:
            self.input_tokens.labels(o.model).inc(o.input_tokens)
            self.input_per_request.labels(*lat).observe(o.input_tokens)
        if o.output_tokens is not None:
            self.output_tokens.labels(o.model).inc(o.output_tokens)
            self.output_per_request.labels(*lat).observe(o.output_tokens)
        self.token_source.labels("input", o.input_source).inc()
        self.token_source.labels("output", o.output_source).inc()
        for slo, value in (("ttft", iv.ttft), ("tpot", iv.tpot), ("e2e", iv.e2e)):
            limit = self.slo.threshold_for(slo, o.model) if value is not None else None
            if limit and value is not None:
                self.slo_requests.labels(o.model, slo, "good" if value <= limit else "bad").inc()


def _observe(h: Histogram, labels: tuple[str, ...], value: float | None,
             exemplar: dict[str, Any] | None) -> None:
    if value is not None:
        h.labels(*labels).observe(value, exemplar)
