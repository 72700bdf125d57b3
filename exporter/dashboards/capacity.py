"""Capacity: saturation (what autoscalers act on), the engine's queue and KV cache, replicas."""

from __future__ import annotations

from typing import Any

from exporter import catalogue as c
from exporter.dashboards import promql as pq
from exporter.dashboards.panels import Board, Q, stat, timeseries

UID = "llm-exporter-capacity"
POD = "{{pod}}"

# kube-state-metrics: the chart names the Deployment after the Service, so $job selects it.
KSM_SPEC_REPLICAS = "kube_deployment_spec_replicas"
KSM_AVAILABLE_REPLICAS = "kube_deployment_status_replicas_available"
KSM_SELECTOR = '{namespace=~"$namespace", deployment=~"$job"}'
EXTERNAL_METRICS = ("up", KSM_SPEC_REPLICAS, KSM_AVAILABLE_REPLICAS)


def build() -> dict[str, Any]:
    by_pod = ("pod",)
    b = Board(UID, "LLM exporter / Capacity",
              "Saturation, the engine's queue and KV cache, and replicas: the signals to scale "
              "on (queue first, KV cache second; GPU utilisation lags).")
    b.row("Saturation and replicas").add(
        stat("Saturation (max)", "Highest per-replica saturation: max(queued / queue "
             "threshold, KV usage / KV threshold); 1 = at capacity.", "percentunit",
             Q(pq.gauge(c.SATURATION, agg="max"), "saturation"),
             steps=((None, "green"), (0.8, "orange"), (1.0, "red")), h=8),
        stat("Replicas", "Sidecars reporting metrics.", "short",
             Q(f"count({c.IN_FLIGHT.exposed}{pq.matchers(None)})", "replicas"), h=8),
        timeseries("Saturation per replica", "1 means at capacity; scale out before it.",
                   "percentunit", Q(pq.gauge(c.SATURATION, agg="max", by=by_pod), POD)),
        timeseries("SLO load per replica", "p90 of TTFT and of TPOT over their objectives "
                   "(each request against its model's), the larger, over the sidecar's "
                   "--slo-load-window: 1 = recent requests sit at their objectives.", "x",
                   Q(pq.gauge(c.SLO_LOAD, agg="max", by=by_pod), POD),
                   Q("vector(1)", "objective", dashed=True)),
        timeseries("Replicas the load needs (advisory)", "Sum over replicas of arrivals over "
                   "the calibrated capacity (llm_exporter_capacity_load_ratio; the recording "
                   "rule llm_exporter:capacity_desired_replicas rounds it up), next to the "
                   "replicas reporting: what an autoscaler on autoscaling.metric=capacity would "
                   "ask for at target 1 (the chart's target adds headroom).", "short",
                   Q(f"sum({c.CAPACITY_LOAD.exposed}{pq.matchers(None)})", "needed"),
                   Q(f"count({c.IN_FLIGHT.exposed}{pq.matchers(None)})", "reporting")),
        stat("Calibrated capacity", "Requests/s one replica carries within its objectives "
             "(llm-exporter calibrate; the sidecars' --capacity-rps).", "reqps",
             Q(pq.gauge(c.CAPACITY, agg="max"), "capacity"), h=8),
        timeseries("Replicas", "Sidecars reporting, scrape targets up, and the Deployment's "
                   "desired and available replicas (kube-state-metrics).", "short",
                   Q(f"count({c.IN_FLIGHT.exposed}{pq.matchers(None)})", "reporting"),
                   Q(f"sum(up{pq.matchers(None)})", "targets up"),
                   Q(f"sum({KSM_SPEC_REPLICAS}{KSM_SELECTOR})", "desired"),
                   Q(f"sum({KSM_AVAILABLE_REPLICAS}{KSM_SELECTOR})", "available")),
    )
    b.row("Engine").add(
        timeseries("Engine queue", "Requests waiting in the engine's queue, per replica.",
                   "short", Q(pq.gauge(c.ENGINE_WAITING, by=by_pod), POD)),
        timeseries("Engine batch", "Requests running in the engine's batch, per replica.",
                   "short", Q(pq.gauge(c.ENGINE_RUNNING, by=by_pod), POD)),
        timeseries("KV cache usage", "Share of the KV cache in use, per replica.",
                   "percentunit", Q(pq.gauge(c.ENGINE_KV_USAGE, agg="max", by=by_pod), POD),
                   max_val=1),
        timeseries("Prefix cache hit ratio", "Prefix-cache hits over queries.", "percentunit",
                   Q(pq.gauge(c.ENGINE_PREFIX_HIT, agg="avg", by=by_pod), POD), max_val=1),
        timeseries("Preemptions/s", "Requests the engine preempted (KV cache pressure).",
                   "short", Q(pq.rate(c.ENGINE_PREEMPTIONS, by=by_pod), POD)),
        timeseries("Engine metrics scraped", "1 when the sidecar read and recognised the "
                   "engine's /metrics.", "short",
                   Q(pq.gauge(c.ENGINE_UP, agg="max", by=("pod", c.ENGINE)),
                     f"{POD} {{{{{c.ENGINE}}}}}"), max_val=1),
    )
    b.row("Sidecar").add(
        timeseries("In flight per replica", "Requests being relayed.", "short",
                   Q(pq.gauge(c.IN_FLIGHT, by=by_pod), POD), w=6),
        timeseries("Queued per replica", "Requests waiting for a concurrency slot "
                   "(--max-concurrency).", "short", Q(pq.gauge(c.QUEUED, by=by_pod), POD),
                   w=6),
        timeseries("Sidecar errors/s", "Errors by type: upstream_connect, upstream_timeout, "
                   "upstream_protocol, client_disconnect, queue_full, instrumentation.", "short",
                   Q(pq.rate(c.ERRORS, by=(c.ERROR_TYPE,)), f"{{{{{c.ERROR_TYPE}}}}}"),
                   stack=True, w=6),
        timeseries("Sidecar event-loop lag p99", "How late the sidecar's loop runs (p99 per "
                   "replica): requests and chunks may wait this long in the kernel before the "
                   "sidecar reads them, and its latencies read low by up to this much. Over "
                   "a few ms: give the sidecar more CPU.", "s",
                   Q(pq.quantile(0.99, c.EVENT_LOOP_LAG, by=by_pod), POD), w=6),
    )
    return b.to_dict()
