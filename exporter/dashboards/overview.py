"""Overview: traffic, errors, latency percentiles per model, SLOs, tokens."""

from __future__ import annotations

from typing import Any

from exporter import catalogue as c
from exporter import rules
from exporter.dashboards import promql as pq
from exporter.dashboards import slo_queries
from exporter.dashboards.panels import Board, Q, stat, timeseries

UID = "llm-exporter-overview"
ERROR_STATUS = f'{c.STATUS_CLASS}=~"{"|".join(rules.BAD_STATUS_CLASSES)}"'


def _percentiles(spec: c.MetricSpec, slo: str | None = None) -> tuple[Q, ...]:
    """p50/p90/p99 per model (exemplars on p99) and, when given, the SLO threshold."""
    qs = tuple(Q(pq.quantile(q, spec), f"p{q * 100:g} {{{{{c.MODEL}}}}}", exemplar=q == 0.99)
               for q in pq.QUANTILES)
    return (*qs, slo_queries.threshold(slo)) if slo else qs


def build() -> dict[str, Any]:
    requests = pq.rate(c.REQUESTS)
    errors = pq.rate(c.REQUESTS, ERROR_STATUS)
    b = Board(UID, "LLM exporter / Overview",
              "Requests, errors, latency and SLOs of the LLM servers behind llm-exporter.")
    b.row("Traffic").add(
        stat("Requests/s", "Requests finished per second.", "reqps", Q(requests, "requests/s")),
        stat("Error ratio", "Share of requests answered 5xx or with no response at all.",
             "percentunit", Q(f"({errors} or vector(0)) / {requests}", "errors"),
             steps=((None, "green"), (0.01, "orange"), (0.05, "red"))),
        stat("TTFT p99", "99th percentile time to first token, all models.", "s",
             Q(pq.quantile(0.99, c.TTFT, by=()), "p99"),
             steps=((None, "green"), (0.5, "orange"), (1.0, "red"))),
        stat("Output tokens/s", "Completion tokens generated per second.", "short",
             Q(pq.rate(c.OUTPUT_TOKENS), "tokens/s")),
        stat("In flight", "Requests being relayed now.", "short",
             Q(pq.gauge(c.IN_FLIGHT), "in flight")),
        stat("Queued", "Requests waiting in the sidecars for a concurrency slot.", "short",
             Q(pq.gauge(c.QUEUED), "queued"), steps=((None, "green"), (1, "orange"))),
    ).add(
        timeseries("Requests/s by model and status", "Finished requests per second.", "reqps",
                   Q(pq.rate(c.REQUESTS, by=(c.MODEL, c.STATUS_CLASS)),
                     f"{{{{{c.MODEL}}}}} {{{{{c.STATUS_CLASS}}}}}"), stack=True),
        timeseries("Error ratio by model", "5xx or no response, over all requests of the model.",
                   "percentunit",
                   Q(f"({pq.rate(c.REQUESTS, ERROR_STATUS, by=(c.MODEL,))} or "
                     f"0 * {pq.rate(c.REQUESTS, by=(c.MODEL,))}) / "
                     f"{pq.rate(c.REQUESTS, by=(c.MODEL,))}", f"{{{{{c.MODEL}}}}}")),
        timeseries("Finish reasons", "Finished requests per second by finish reason "
                   "(cancelled: the client went away).", "reqps",
                   Q(pq.rate(c.REQUESTS, by=(c.FINISH_REASON,)),
                     f"{{{{{c.FINISH_REASON}}}}}"), stack=True),
    ).add(
        timeseries("Requests/s by API", "Finished requests per second by the API they spoke "
                   "(openai_chat, openai_responses, anthropic_messages, openai_embeddings, "
                   "ollama_chat, tgi, llamacpp…) and GenAI operation.", "reqps",
                   Q(pq.rate(c.REQUESTS, by=(c.API, c.OPERATION)),
                     f"{{{{{c.API}}}}} ({{{{{c.OPERATION}}}}})"), stack=True),
        timeseries("Unmatched requests/s", "Requests no route matched, relayed unmeasured, by "
                   "method and status class: model lists and health checks, or inference "
                   "paths to map with --route (a prefix, a gateway's paths).", "reqps",
                   Q(pq.rate(c.UNMATCHED_REQUESTS, by=(c.METHOD, c.STATUS_CLASS)),
                     f"{{{{{c.METHOD}}}}} {{{{{c.STATUS_CLASS}}}}}"), stack=True),
        timeseries("Inputs per batch request (median, p99)", "Texts per embeddings, rerank or "
                   "score request.", "short",
                   Q(pq.quantile(0.5, c.REQUEST_INPUTS), f"p50 {{{{{c.MODEL}}}}}"),
                   Q(pq.quantile(0.99, c.REQUEST_INPUTS), f"p99 {{{{{c.MODEL}}}}}")),
    )
    b.row("Latency").add(
        timeseries("Time to first token", "Arrival at the sidecar to the first content token, "
                   "streaming requests. Exemplars link to traces.", "s",
                   *_percentiles(c.TTFT, "ttft")),
        timeseries("Time per output token", "(e2e - TTFT) / (output tokens - 1).", "s",
                   *_percentiles(c.TPOT, "tpot")),
        timeseries("End-to-end duration", "Arrival to the last response byte.", "s",
                   *_percentiles(c.REQUEST_DURATION)),
    )
    b.row("SLOs").add(*slo_queries.panels())
    good = f'{c.RESULT}="good"'
    judged = f'{c.RESULT}=~"good|bad"'
    b.row("Goodput").add(
        timeseries("Goodput and throughput", "Requests/s that succeeded and met every latency "
                   "objective of their model at once (good), next to all finished requests.",
                   "reqps",
                   Q(pq.rate(c.GOODPUT_REQUESTS, good, by=(c.MODEL,)), f"good {{{{{c.MODEL}}}}}"),
                   Q(pq.rate(c.REQUESTS, by=(c.MODEL,)), f"all {{{{{c.MODEL}}}}}")),
        timeseries("Goodput attainment", "Good / (good + bad) requests: the share that met "
                   "every objective (cancelled requests are neither).", "percentunit",
                   Q(f"{pq.rate(c.GOODPUT_REQUESTS, good, by=(c.MODEL,))} / "
                     f"{pq.rate(c.GOODPUT_REQUESTS, judged, by=(c.MODEL,))}",
                     f"{{{{{c.MODEL}}}}}"), slo_queries.objective("goodput")),
        timeseries("Good output tokens/s", "Output tokens/s of good requests, next to all "
                   "output tokens/s: the throughput that met the objectives.", "short",
                   Q(pq.rate(c.GOODPUT_OUTPUT_TOKENS, by=(c.MODEL,)), f"good {{{{{c.MODEL}}}}}"),
                   Q(pq.rate(c.OUTPUT_TOKENS, by=(c.MODEL,)), f"all {{{{{c.MODEL}}}}}")),
    )
    b.row("Tokens and load").add(
        timeseries("Tokens/s", "Prompt tokens in and completion tokens out, per model.",
                   "short",
                   Q(pq.rate(c.INPUT_TOKENS, by=(c.MODEL,)), f"in {{{{{c.MODEL}}}}}"),
                   Q(pq.rate(c.OUTPUT_TOKENS, by=(c.MODEL,)), f"out {{{{{c.MODEL}}}}}")),
        timeseries("In flight and queued", "Requests being relayed and requests waiting for a "
                   "concurrency slot in the sidecars.", "short",
                   Q(pq.gauge(c.IN_FLIGHT), "in flight"), Q(pq.gauge(c.QUEUED), "queued")),
        timeseries("Tokens per request (median)", "Median prompt and completion length.",
                   "short",
                   Q(pq.quantile(0.5, c.INPUT_TOKENS_PER_REQUEST), f"in {{{{{c.MODEL}}}}}"),
                   Q(pq.quantile(0.5, c.OUTPUT_TOKENS_PER_REQUEST), f"out {{{{{c.MODEL}}}}}")),
    )
    return b.to_dict()
