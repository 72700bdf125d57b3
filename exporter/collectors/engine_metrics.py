"""The engine's own signals, normalised across engines.

On each scrape of the sidecar, the upstream's ``/metrics`` is fetched (urllib, in the scrape
thread, 1 s timeout, the answer cached 1.5 s so a burst of scrapes costs one fetch), parsed
with prometheus_client's parser, the engine recognised by its metric prefix and mapped to one
engine-neutral set (``MAPPINGS`` below is the whole mapping):

============  ===================  ==========================  ==========================
engine        requests waiting     requests running            KV-cache usage (0-1)
============  ===================  ==========================  ==========================
vllm          vllm:num_requests_   vllm:num_requests_running   vllm:kv_cache_usage_perc
              waiting                                          (v0: gpu_cache_usage_perc)
sglang        sglang:num_queue_    sglang:num_running_reqs     sglang:token_usage
              reqs
tgi           tgi_queue_size       tgi_batch_current_size      —
trtllm        trtllm_num_requests  trtllm_num_requests_running trtllm_kv_cache_utilization
(serve)       _waiting
trtllm        nv_trt_llm_request_  nv_trt_llm_request_metrics  nv_trt_llm_kv_cache_block_
(Triton)      metrics{waiting}     {scheduled}                 metrics{fraction}
llamacpp      llamacpp:requests_   llamacpp:requests_          llamacpp:kv_cache_usage_
              deferred             processing                  ratio
============  ===================  ==========================  ==========================

Prefix-cache hit ratio: vLLM ``prefix_cache_hits_total / prefix_cache_queries_total`` (tokens,
since the engine started), SGLang ``cache_hit_rate``, trtllm-serve ``kv_cache_hit_rate``.
Preemptions: vLLM ``num_preemptions_total``, SGLang ``num_retracted_requests_total``.
Busy seconds (the engine's compute time): TGI ``tgi_batch_forward_duration`` sum.

Several series of one signal (one per ``model_name``, data-parallel ``engine``, TP rank…):
waiting, running and preemptions are summed, ratios averaged; a vLLM prefix hit ratio is
summed hits over summed queries. A signal the engine does not export is not exported.

The embedded engine has no Prometheus endpoint of its own; it answers ``GET /engine/stats``
(JSON ``busy_seconds``, ``waiting``, ``running``), read when ``/metrics`` is absent or
unrecognised. ``ProxyState.engine_busy_seconds`` wins over both when the embedding fills it.

``--reexport-engine-metrics`` adds the upstream's families unchanged (except ``process_*``,
``python_*`` and our own names, which would clash with the sidecar's).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from exporter import catalogue as c
from exporter.collectors.base import FailsafeCollector, OnError, family
from exporter.settings import shown_url
from exporter.state import ProxyState

log = logging.getLogger(__name__)

Agg = Literal["sum", "avg"]


@dataclass(frozen=True)
class Source:
    """One sample name (and optional label filter) and how several series combine."""

    sample: str
    agg: Agg = "sum"
    where: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Mapping:
    waiting: tuple[Source, ...] = ()
    running: tuple[Source, ...] = ()
    kv_usage: tuple[Source, ...] = ()
    prefix_hit: tuple[Source, ...] = ()
    # (hits, queries) counters whose ratio is the prefix hit ratio, tried before prefix_hit.
    prefix_counters: tuple[str, str] | None = None
    preemptions: tuple[Source, ...] = ()
    busy_seconds: tuple[Source, ...] = ()


def _s(*names: str, agg: Agg = "sum") -> tuple[Source, ...]:
    return tuple(Source(n, agg) for n in names)


def _nv(label: str, value: str, agg: Agg = "sum", metric: str = "nv_trt_llm_request_metrics"
        ) -> tuple[Source, ...]:
    return (Source(metric, agg, ((label, value),)),)


MAPPINGS: dict[str, Mapping] = {
    "vllm": Mapping(
        waiting=_s("vllm:num_requests_waiting"),
        running=_s("vllm:num_requests_running"),
        kv_usage=_s("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", agg="avg"),
        prefix_counters=("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"),
        prefix_hit=_s("vllm:gpu_prefix_cache_hit_rate", agg="avg"),
        preemptions=_s("vllm:num_preemptions_total"),
    ),
    "sglang": Mapping(
        waiting=_s("sglang:num_queue_reqs"),
        running=_s("sglang:num_running_reqs"),
        kv_usage=_s("sglang:token_usage", agg="avg"),
        prefix_hit=_s("sglang:cache_hit_rate", agg="avg"),
        preemptions=_s("sglang:num_retracted_requests_total"),
    ),
    "tgi": Mapping(
        waiting=_s("tgi_queue_size"),
        running=_s("tgi_batch_current_size"),
        busy_seconds=_s("tgi_batch_forward_duration_sum"),
    ),
    "trtllm": Mapping(
        waiting=(*_s("trtllm_num_requests_waiting"), *_nv("request_type", "waiting"),
                 *_s("nv_inference_pending_request_count")),
        running=(*_s("trtllm_num_requests_running"), *_nv("request_type", "scheduled")),
        kv_usage=(*_s("trtllm_kv_cache_utilization", agg="avg"),
                  *_nv("kv_cache_block_type", "fraction", "avg",
                       "nv_trt_llm_kv_cache_block_metrics")),
        prefix_hit=_s("trtllm_kv_cache_hit_rate", agg="avg"),
    ),
    "llamacpp": Mapping(
        waiting=_s("llamacpp:requests_deferred"),
        running=_s("llamacpp:requests_processing"),
        kv_usage=_s("llamacpp:kv_cache_usage_ratio", agg="avg"),
    ),
}

# Sample-name prefix -> engine. Triton's TRT-LLM backend counts as trtllm.
PREFIXES: tuple[tuple[str, str], ...] = (
    ("vllm:", "vllm"), ("sglang:", "sglang"), ("tgi_", "tgi"), ("trtllm_", "trtllm"),
    ("trtllm:", "trtllm"), ("nv_trt_llm_", "trtllm"), ("llamacpp:", "llamacpp"),
)
_NOT_REEXPORTED = ("process_", "python_", c.PREFIX, "gen_ai_")

Samples = dict[str, list[tuple[dict[str, str], float]]]


@dataclass(frozen=True)
class EngineSignals:
    engine: str = "unknown"
    up: bool = False
    waiting: float | None = None
    running: float | None = None
    kv_usage: float | None = None
    prefix_hit: float | None = None
    preemptions: float | None = None
    busy_seconds: float | None = None
    raw: tuple[Metric, ...] = field(default=(), repr=False)


def detect_engine(samples: Iterable[str]) -> str:
    """The engine whose prefix most sample names carry; ``unknown`` when none does."""
    counts: dict[str, int] = {}
    for name in samples:
        for prefix, engine in PREFIXES:
            if name.startswith(prefix):
                counts[engine] = counts.get(engine, 0) + 1
                break
    return max(counts, key=lambda e: counts[e]) if counts else "unknown"


def _pick(samples: Samples, sources: tuple[Source, ...]) -> float | None:
    """The first source present, its series combined; None when none is present."""
    for src in sources:
        values = [v for labels, v in samples.get(src.sample, ())
                  if all(labels.get(k) == want for k, want in src.where)]
        if values:
            return sum(values) / len(values) if src.agg == "avg" else sum(values)
    return None


def parse_signals(text: str) -> EngineSignals:
    """Map one exposition (Prometheus text format) to the engine-neutral signals."""
    families = list(text_string_to_metric_families(text))
    samples: Samples = {}
    for fam in families:
        for s in fam.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    engine = detect_engine(samples)
    m = MAPPINGS.get(engine)
    if m is None:
        return EngineSignals(engine=engine, raw=tuple(families))
    prefix_hit = None
    if m.prefix_counters:
        hits, queries = (_pick(samples, _s(n)) for n in m.prefix_counters)
        if hits is not None and queries:
            prefix_hit = hits / queries
    if prefix_hit is None:
        prefix_hit = _pick(samples, m.prefix_hit)
    return EngineSignals(
        engine=engine, up=True,
        waiting=_pick(samples, m.waiting), running=_pick(samples, m.running),
        kv_usage=_pick(samples, m.kv_usage), prefix_hit=prefix_hit,
        preemptions=_pick(samples, m.preemptions),
        busy_seconds=_pick(samples, m.busy_seconds), raw=tuple(families))


def signals_from_stats(data: dict[str, object]) -> EngineSignals:
    """The embedded engine's ``/engine/stats`` JSON."""

    def num(key: str) -> float | None:
        v = data.get(key)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    return EngineSignals(engine="embedded", up=True, waiting=num("waiting"),
                         running=num("running"), kv_usage=num("kv_usage"),
                         busy_seconds=num("busy_seconds"))


class EngineScraper:
    """Fetches and caches the upstream's signals; shared by the engine and saturation
    collectors so one sidecar scrape costs at most one upstream fetch."""

    def __init__(self, metrics_url: Callable[[], str], stats_url: Callable[[], str], *,
                 timeout: float = 1.0, ttl: float = 1.5,
                 clock: Callable[[], float] = time.monotonic,
                 fetch: Callable[[str, float], tuple[int, bytes]] | None = None) -> None:
        self._metrics_url = metrics_url
        self._stats_url = stats_url
        self._timeout = timeout
        self._ttl = ttl
        self._clock = clock
        self._fetch = fetch or _http_get
        self._cached: tuple[float, EngineSignals] | None = None
        self._prefer_stats = False
        self._complained: set[str] = set()
        self._pending: list[tuple[str, str, tuple[object, ...]]] = []

    def signals(self) -> EngineSignals:
        now = self._clock()
        if self._cached is not None and now - self._cached[0] < self._ttl:
            return self._cached[1]
        sig = self._scrape(now)
        self._cached = (self._clock(), sig)
        return sig

    def _scrape(self, started: float) -> EngineSignals:
        order = (self._stats, self._metrics) if self._prefer_stats else (self._metrics,
                                                                          self._stats)
        found = EngineSignals()
        self._pending.clear()
        for attempt in order:
            left = self._timeout - (self._clock() - started)
            if left <= 0.05:
                break
            sig = attempt(left)
            if sig is not None:
                if sig.up:
                    # The embedded engine has /engine/stats and no /metrics: its 404 is no news.
                    self._prefer_stats = sig.engine == "embedded"
                    return sig
                if sig.engine != "unknown":
                    found = sig
        for key, msg, args in self._pending:  # nothing answered: say why, once each
            self._once(key, msg, *args)
        return found

    def _metrics(self, timeout: float) -> EngineSignals | None:
        url = self._metrics_url()
        if not url:
            return None
        body = self._get(url, timeout)
        if body is None:
            return None
        try:
            sig = parse_signals(body.decode("utf-8", "replace"))
        except ValueError as e:
            self._later(url + "#parse", "the engine's /metrics at %s did not parse: %s", url, e)
            return None
        if not sig.up:
            self._later(url + "#unknown", "no known engine metrics at %s (prefixes: %s)", url,
                        ", ".join(p for p, _ in PREFIXES))
        return sig

    def _stats(self, timeout: float) -> EngineSignals | None:
        url = self._stats_url()
        if not url:
            return None
        body = self._get(url, timeout, quiet=True)
        if body is None:
            return None
        try:
            data = json.loads(body)
        except ValueError:
            return None
        return signals_from_stats(data) if isinstance(data, dict) else None

    def _get(self, url: str, timeout: float, quiet: bool = False) -> bytes | None:
        try:
            status, body = self._fetch(url, timeout)
        except (OSError, urllib.error.URLError, ValueError) as e:
            if not quiet:
                self._later(url, "cannot scrape the engine's metrics at %s: %s (logged once)",
                            url, e)
            return None
        if status != 200:
            if not quiet:
                self._later(url + f"#{status}", "the engine's metrics at %s answered %d", url,
                            status)
            return None
        self._complained.discard(url)
        return body

    def _later(self, key: str, msg: str, *args: object) -> None:
        """A complaint logged (once) only if no endpoint answers on this scrape; URLs in it
        without their credentials."""
        shown = tuple(a if isinstance(a, int | float) else shown_url(str(a)) for a in args)
        self._pending.append((key, msg, shown))

    def _once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._complained:
            self._complained.add(key)
            log.warning(msg, *args)


MAX_BODY = 16 * 1024 * 1024


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """The engine's metrics come from the engine: a redirect is answered as its status (and
    logged), never followed to wherever it points."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects())


def _http_get(url: str, timeout: float) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Accept": "text/plain;version=0.0.4"})
    try:
        with _OPENER.open(req, timeout=timeout) as r:
            return int(r.status), r.read(MAX_BODY)
    except urllib.error.HTTPError as e:
        return int(e.code), b""


class EngineCollector(FailsafeCollector):
    NAME = "engine"
    SPECS = (c.ENGINE_UP, c.ENGINE_WAITING, c.ENGINE_RUNNING, c.ENGINE_KV_USAGE,
             c.ENGINE_PREFIX_HIT, c.ENGINE_PREEMPTIONS, c.ENGINE_BUSY)

    def __init__(self, scraper: EngineScraper, state: ProxyState, *, reexport: bool = False,
                 on_error: OnError | None = None) -> None:
        super().__init__(on_error)
        self._scraper = scraper
        self._state = state
        self._reexport = reexport

    def _collect(self, out: list[Metric]) -> None:
        sig = self._scraper.signals()
        up = family(c.ENGINE_UP)
        up.add_metric([sig.engine], 1 if sig.up else 0)
        out.append(up)
        for spec, value in ((c.ENGINE_WAITING, sig.waiting), (c.ENGINE_RUNNING, sig.running),
                            (c.ENGINE_KV_USAGE, sig.kv_usage),
                            (c.ENGINE_PREFIX_HIT, sig.prefix_hit),
                            (c.ENGINE_PREEMPTIONS, sig.preemptions)):
            if value is not None:
                f = family(spec)
                f.add_metric([], value)
                out.append(f)
        busy = self._state.engine_busy_seconds or sig.busy_seconds
        if busy:
            f = family(c.ENGINE_BUSY)
            f.add_metric([], busy)
            out.append(f)
        if self._reexport:
            out.extend(m for m in sig.raw if not m.name.startswith(_NOT_REEXPORTED))
