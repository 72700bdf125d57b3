"""One saturation signal per replica, for autoscalers and load balancers.

``llm_exporter_saturation_ratio`` (a gauge, computed at scrape time)::

    saturation = max(queued / queue_threshold, kv_usage / kv_threshold)

    queued   = requests waiting in the sidecar for a concurrency slot (--max-concurrency)
             + requests waiting in the engine's own queue (its /metrics, or the embedded
               engine's /engine/stats)
    kv_usage = the engine's KV-cache usage, 0 to 1 (vLLM kv_cache_usage_perc, SGLang
               token_usage, ...; see exporter.collectors.engine_metrics)

``queue_threshold`` is ``--saturation-queue-threshold`` (default 5) and ``kv_threshold``
``--saturation-kv-threshold`` (default 0.8): llm-d's per-pod score max(queue/5, kv/0.8).
1.0 means "at capacity": scale out above it, and a router should prefer replicas below it.
Requests that are running do not count: a full batch with nothing waiting is busy, not
saturated. A term is left out when its input is unknown (no engine metrics: the queue term
is the sidecar's queue alone) or its threshold is 0 (disabled). When neither input is known —
the engine's metrics unreachable or unrecognised, and no ``--max-concurrency`` for the sidecar
to queue in — the gauge is *absent*, not 0: an autoscaler then holds instead of scaling in on
a load it cannot see (``llm_exporter_engine_metrics_up`` says why; the SLO load gauge, measured
by the sidecar itself, stays).

Sizing the queue threshold: a waiting request waits about (requests ahead of it) / (requests
the replica completes per second), so ``queue_threshold ≈ TTFT objective × requests completed
per second at full batch`` (e.g. 5 for 20 requests/s and a 250 ms objective; 1 for a small
model on CPU completing ~1 request/s with a 1 s objective). ``bench/saturation_ramp.py``
measures both sides of that on a given engine.

Why queue depth first: a request waits only when the engine has no room for it, so waiting
requests are the earliest sign that time to first token is about to grow (each waiting
request adds a prefill ahead of the next one), while GPU utilisation is already pegged long
before that. KV usage catches the other limit: a batch that cannot grow because the cache is
full. Engines without /metrics (llama-cpp-python, plain transformers) show no queue unless
the sidecar queues: set ``--max-concurrency`` to the engine's batch size so waiting happens
in the sidecar, where it is counted.
"""

from __future__ import annotations

from prometheus_client.core import Metric

from exporter import catalogue as c
from exporter.collectors.base import FailsafeCollector, OnError, family
from exporter.collectors.engine_metrics import EngineScraper
from exporter.state import ProxyState


def saturation_ratio(sidecar_queued: float, engine_waiting: float | None,
                     kv_usage: float | None, *, queue_threshold: float,
                     kv_threshold: float) -> float:
    """The definition above, as one pure function (dashboards and tests share it)."""
    terms = [0.0]
    if queue_threshold > 0:
        terms.append((sidecar_queued + (engine_waiting or 0.0)) / queue_threshold)
    if kv_threshold > 0 and kv_usage is not None:
        terms.append(kv_usage / kv_threshold)
    return max(terms)


class SaturationCollector(FailsafeCollector):
    NAME = "saturation"
    SPECS = (c.SATURATION,)

    def __init__(self, scraper: EngineScraper, state: ProxyState, *, queue_threshold: float,
                 kv_threshold: float, sidecar_queue: bool = True,
                 on_error: OnError | None = None) -> None:
        super().__init__(on_error)
        self._sidecar_queue = sidecar_queue  # --max-concurrency set: the sidecar queues
        self._scraper = scraper
        self._state = state
        self._queue_threshold = queue_threshold
        self._kv_threshold = kv_threshold

    def _collect(self, out: list[Metric]) -> None:
        sig = self._scraper.signals()  # cached: the engine collector fetched it this scrape
        if not self._sidecar_queue and sig.waiting is None and sig.kv_usage is None:
            return  # nothing known: absent, not a reassuring 0
        f = family(c.SATURATION)
        f.add_metric([], saturation_ratio(
            self._state.queued, sig.waiting, sig.kv_usage,
            queue_threshold=self._queue_threshold, kv_threshold=self._kv_threshold))
        out.append(f)
