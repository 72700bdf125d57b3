"""Phases: where a request's time goes (sidecar queue, engine queue, prefill, decode) and
the inter-token latency, as percentiles and as heatmaps with exemplars."""

from __future__ import annotations

from typing import Any

from exporter import catalogue as c
from exporter.dashboards import promql as pq
from exporter.dashboards.panels import Board, Q, heatmap, timeseries

UID = "llm-exporter-phases"

# (spec, short name, what it measures)
PHASES = (
    (c.QUEUE, "Sidecar queue", "Waiting in the sidecar for a concurrency slot."),
    (c.ENGINE_QUEUE, "Engine queue", "Waiting in the engine's own queue (engines that report "
     "it: response timings or the engine's span)."),
    (c.PREFILL, "Prefill", "Dispatch upstream to the first content token."),
    (c.DECODE, "Decode", "First content token to the last."),
    (c.ITL, "Inter-token latency", "Gap between consecutive content chunks, per token."),
    (c.TTFT, "Time to first token", "Arrival at the sidecar to the first content token."),
)


def _percentiles(spec: c.MetricSpec) -> tuple[Q, ...]:
    return tuple(Q(pq.quantile(q, spec, by=()), f"p{q * 100:g}", exemplar=q == 0.99)
                 for q in pq.QUANTILES)


def build() -> dict[str, Any]:
    b = Board(UID, "LLM exporter / Phases",
              "Queue, prefill and decode of every request, seen from the sidecar (and from the "
              "engine where it reports its own figures).")
    b.row("Where the time goes").add(
        timeseries("Mean time per request by phase", "Mean of each phase, stacked: sidecar "
                   "queue + engine queue + prefill + decode ≈ end-to-end.", "s",
                   *(Q(pq.mean(spec), name) for spec, name, _ in PHASES[:4]),
                   w=12, stack=True),
        timeseries("Phase figures by source", "Requests per second by where each phase's "
                   "figure came from: sidecar (outside view), engine_timings, engine_span.",
                   "reqps", Q(pq.rate(c.PHASE_SOURCE, by=(c.PHASE, c.SOURCE)),
                              f"{{{{{c.PHASE}}}}} {{{{{c.SOURCE}}}}}"), w=12),
    )
    b.row("Percentiles").add(*(
        timeseries(name, f"{desc} p50 / p90 / p99 over the selected models; exemplars link "
                   "to traces.", "s", *_percentiles(spec))
        for spec, name, desc in PHASES))
    b.row("Heatmaps").add(*(
        heatmap(f"{name} distribution", f"{desc} Requests per bucket per interval; the pink "
                "dots are exemplars (trace ids).", "s", pq.heatmap(spec))
        for spec, name, desc in PHASES))
    return b.to_dict()
