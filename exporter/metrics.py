"""Prometheus instruments for the sidecar, created once from the catalogue into a registry
passed in (no global registry), and the one place a finished request becomes observations."""

from __future__ import annotations

import bisect
import logging
import math
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar

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
    api: str
    stream: bool
    status_class: str
    finish_reason: str
    intervals: Intervals
    input_tokens: int | None
    output_tokens: int | None
    input_source: str
    output_source: str
    trace_id: str | None
    inputs: int | None = None  # batch size of a pooling request
    status: int | None = None  # the HTTP status (never a label: status_class is)


class SloLoad:
    """The SLO-normalised load (``llm_exporter_slo_load_ratio``)::

        load = max(p90(TTFT / TTFT objective), p90(TPOT / TPOT objective))

    over the requests that ended in the last ``window`` seconds, each divided by its own
    model's objective (so models with different objectives share one figure). 1.0 means recent
    requests sit at their objectives: the figure an autoscaler can target directly, next to
    the queue/KV saturation ratio. Fed from the event loop, read at scrape time from the
    metrics thread (deque appends and pops are atomic); at most ``MAX_SAMPLES`` per SLO."""

    QUANTILE = 0.9
    MAX_SAMPLES = 50_000

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic,
                 arrivals: bool = True) -> None:
        self.window = window
        self._clock = clock
        self._count_arrivals = arrivals  # only read with a capacity configured
        self._ratios: dict[str, deque[tuple[float, float]]] = {
            slo: deque(maxlen=self.MAX_SAMPLES) for slo in ("ttft", "tpot")}
        self._arrivals: deque[float] = deque(maxlen=self.MAX_SAMPLES * 4)

    def arrived(self) -> None:
        """A measured request arrived (for the capacity load: arrivals, not completions,
        so a replica pushed past capacity reads above 1 instead of at its ceiling)."""
        if self._count_arrivals:
            self._arrivals.append(self._clock())

    def arrival_rate(self) -> float:
        since = self._clock() - self.window
        while self._arrivals and self._arrivals[0] < since:
            self._arrivals.popleft()
        return sum(1 for t in list(self._arrivals) if t >= since) / self.window

    def observe(self, slo: str, ratio: float) -> None:
        samples = self._ratios.get(slo)
        if samples is not None:
            samples.append((self._clock(), ratio))

    def value(self) -> float:
        since = self._clock() - self.window
        worst = 0.0
        for samples in self._ratios.values():
            while samples and samples[0][0] < since:
                samples.popleft()
            values = sorted(r for t, r in list(samples) if t >= since)
            if values:  # nearest rank
                worst = max(worst, values[max(0, math.ceil(self.QUANTILE * len(values)) - 1)])
        return worst


class _StateCollector(Collector):
    """In-flight and queued, read from the proxy's live state at scrape time."""

    def __init__(self, state: ProxyState, load: SloLoad | None = None,
                 capacity: float = 0.0) -> None:
        self._state = state
        self._load = load
        self._capacity = capacity

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(c.IN_FLIGHT.name, c.IN_FLIGHT.help, value=self._state.in_flight)
        yield GaugeMetricFamily(c.QUEUED.name, c.QUEUED.help, value=self._state.queued)
        if self._load is not None:
            yield GaugeMetricFamily(c.SLO_LOAD.name, c.SLO_LOAD.help, value=self._load.value())
            if self._capacity:
                yield GaugeMetricFamily(c.CAPACITY.name, c.CAPACITY.help, value=self._capacity)
                yield GaugeMetricFamily(c.CAPACITY_LOAD.name, c.CAPACITY_LOAD.help,
                                        value=self._load.arrival_rate() / self._capacity)


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
        self.inputs = hist(c.REQUEST_INPUTS)
        self.loop_lag = hist(c.EVENT_LOOP_LAG)  # observed by exporter.looplag
        self.unmatched = Counter(c.UNMATCHED_REQUESTS.name, c.UNMATCHED_REQUESTS.help,
                                 c.UNMATCHED_REQUESTS.labels, registry=registry)
        self.unmatched_duration = hist(c.UNMATCHED_DURATION)
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
        self.goodput = Counter(c.GOODPUT_REQUESTS.name, c.GOODPUT_REQUESTS.help,
                               c.GOODPUT_REQUESTS.labels, registry=registry)
        self.goodput_tokens = Counter(c.GOODPUT_OUTPUT_TOKENS.name, c.GOODPUT_OUTPUT_TOKENS.help,
                                      c.GOODPUT_OUTPUT_TOKENS.labels, registry=registry)
        threshold = Gauge(c.SLO_THRESHOLD.name, c.SLO_THRESHOLD.help, c.SLO_THRESHOLD.labels,
                          registry=registry)
        for name in LATENCY_SLOS:
            value = slo.threshold_for(name, "")  # the objective for every model
            if value:
                threshold.labels(name).set(value)
        self.build = Info(c.BUILD_INFO.name, c.BUILD_INFO.help, registry=registry)
        self.build.info({"version": __version__, c.ENGINE: state.engine})
        self.slo_load = SloLoad(settings.slo_load_window,
                                arrivals=bool(settings.capacity_rps))
        registry.register(_StateCollector(state, self.slo_load, settings.capacity_rps))
        for t in ("upstream_connect", "upstream_timeout", "upstream_protocol",
                  "client_disconnect", "client_timeout", "queue_full", "instrumentation"):
            self.errors.labels(t)  # exported at 0 from the start, so rate() works at once
        # Without --max-concurrency nothing waits in the sidecar: a histogram of zeros would
        # cost ~16 series per (model, operation) and say nothing.
        self._queues = settings.max_concurrency > 0
        self._logged: set[str] = set()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def unmatched_request(self, method: str, status_class: str, seconds: float) -> None:
        self._child(self.unmatched, method, status_class).inc()
        _observe_one(self._child(self.unmatched_duration, method), seconds, None)

    def instrumentation_error(self, where: str, exc: BaseException | None = None) -> None:
        """Count it; log the first occurrence per place with where it was raised, then stay
        quiet. The exception's message is left out: it may quote request or response text
        (``int('...')``, a codec error's object), which stays out of logs."""
        self.errors.labels("instrumentation").inc()
        if where not in self._logged:
            self._logged.add(where)
            frames = "".join(traceback.format_tb(exc.__traceback__)) if exc else ""
            log.error("instrumentation error in %s: %s (counted in %s; logged once)%s", where,
                      type(exc).__name__ if exc else "", c.ERRORS.exposed,
                      "\n" + frames.rstrip() if frames else "")

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(...)``, cached: label sets are bounded, lookups are per request."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def record(self, o: Outcome) -> None:
        iv = o.intervals
        lat = (o.model, o.operation)
        ex: dict[str, str] | None = {"trace_id": o.trace_id} if o.trace_id else None
        stream = "true" if o.stream else "false"
        child = self._child
        child(self.requests, o.model, o.operation, o.api, stream, o.status_class,
              o.finish_reason).inc()
        if iv.e2e is not None:
            _observe_one(child(self.duration, *lat), iv.e2e, ex)
        if iv.queue is not None and self._queues:
            _observe_one(child(self.queue, *lat), iv.queue, ex)
        ok = o.status_class == "2xx" and o.finish_reason not in ("cancelled", "error")
        if not ok:
            if o.finish_reason == "cancelled":
                child(self.goodput, o.model, "cancelled").inc()
            elif o.status_class != "4xx" or o.status == 429:
                # a 4xx is the client's error, not the service's to judge; a 429 is the
                # service refusing for load: not served, so not goodput
                child(self.goodput, o.model, "bad").inc()
            return
        for metric, value in ((self.ttft, iv.ttft), (self.tpot, iv.tpot),
                              (self.prefill, iv.prefill), (self.decode, iv.decode),
                              (self.engine_queue, iv.engine_queue)):
            if value is not None:
                _observe_one(child(metric, *lat), value, ex)
        if iv.itl:
            # One observation per token (as SGLang does); the exemplar rides on the last.
            _observe_pairs(child(self.itl, *lat), iv.itl, ex)
        for phase, value in (("prefill", iv.prefill), ("decode", iv.decode),
                             ("engine_queue", iv.engine_queue)):
            if value is not None:
                child(self.phase_source, phase, iv.phase_source).inc()
        if o.inputs is not None:
            _observe_one(child(self.inputs, *lat), o.inputs, None)
        if o.input_tokens is not None:
            child(self.input_tokens, o.model).inc(o.input_tokens)
            _observe_one(child(self.input_per_request, *lat), o.input_tokens, None)
        if o.output_tokens is not None:
            child(self.output_tokens, o.model).inc(o.output_tokens)
            _observe_one(child(self.output_per_request, *lat), o.output_tokens, None)
        child(self.token_source, "input", o.input_source).inc()
        child(self.token_source, "output", o.output_source).inc()
        good = True
        for slo, value in (("ttft", iv.ttft), ("tpot", iv.tpot), ("e2e", iv.e2e)):
            limit = self.slo.threshold_for(slo, o.model) if value is not None else None
            if limit and value is not None:
                met = value <= limit
                good = good and met
                self.slo_load.observe(slo, value / limit)
                child(self.slo_requests, o.model, slo, "good" if met else "bad").inc()
        # Goodput: met every objective that applies, at once (DistServe's definition).
        child(self.goodput, o.model, "good" if good else "bad").inc()
        if good and o.output_tokens:
            child(self.goodput_tokens, o.model).inc(o.output_tokens)


def _observe_one(h: Any, value: float, exemplar: dict[str, str] | None) -> None:
    """``h.observe(value, exemplar)`` without re-validating our own exemplar's labels and
    walking every bucket: one bisect, two increments (a fifth of the cost per request)."""
    try:
        bounds, buckets, total = h._upper_bounds, h._buckets, h._sum
    except AttributeError:
        h.observe(value, exemplar)
        return
    i = bisect.bisect_left(bounds, value)
    buckets[i].inc(1)
    total.inc(value)
    if exemplar is not None:
        buckets[i].set_exemplar(Exemplar(exemplar, value, time.time()))


def _observe_many(h: Any, value: float, count: int) -> None:
    """``count`` observations of ``value`` in one step (one bucket increment, one sum add),
    as SGLang does."""
    _observe_pairs(h, ((value, count),), None)


def _observe_pairs(h: Any, pairs: Sequence[tuple[float, int]],
                   exemplar: dict[str, str] | None) -> None:
    """Observe ``value`` ``count`` times for each pair: one increment per bucket touched and
    one sum add for the lot (a request's inter-token gaps fall in a handful of buckets), the
    exemplar on the last value. Falls back to ``observe()`` if prometheus_client's internals
    ever change."""
    pairs = [(v, n) for v, n in pairs if n > 0]
    if not pairs:
        return
    try:
        bounds, buckets, total = h._upper_bounds, h._buckets, h._sum
    except AttributeError:
        *rest, (last, n) = pairs
        for value, count in (*rest, (last, n - 1)):
            for _ in range(count):
                h.observe(value)
        h.observe(last, exemplar)
        return
    per: dict[int, int] = {}
    added = 0.0
    for value, count in pairs:
        i = bisect.bisect_left(bounds, value)
        per[i] = per.get(i, 0) + count
        added += value * count
    for i, count in per.items():
        buckets[i].inc(count)
    total.inc(added)
    if exemplar is not None:
        last = pairs[-1][0]
        buckets[bisect.bisect_left(bounds, last)].set_exemplar(
            Exemplar(exemplar, last, time.time()))
