"""The one metric catalogue: every family the exporter can export, with its help, unit,
labels and default buckets.

Dashboards, rules, the chart and the tests import names from here instead of retyping strings.
Names follow the OpenTelemetry GenAI conventions where they define the metric
(``gen_ai_server_*``) and carry the project prefix ``llm_exporter_`` otherwise. Every name
carries its base unit. Counters are listed without ``_total``: prometheus_client appends it,
and :func:`series` gives the exposed sample names.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

PREFIX = "llm_exporter_"


class Kind(StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"
    INFO = "info"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    # Which part of the exporter produces it: "sidecar", "gpu", "host", "engine", "cost".
    group: str = "sidecar"

    @property
    def exposed(self) -> str:
        """The sample-family name a PromQL query uses (``_total``, ``_info`` suffixes)."""
        suffix = {Kind.COUNTER: "_total", Kind.INFO: "_info"}.get(self.kind, "")
        return self.name + suffix


# --- Bounded label names (values are bounded too; see exporter.labels) -----------------------
MODEL = "model"  # at most --max-models values, the rest "other"
# OpenTelemetry GenAI operation names: chat | text_completion | embeddings (exporter.protocols)
OPERATION = "operation"
API = "api"  # the protocol: openai_chat, openai_responses, anthropic_messages… (exporter.protocols)
METHOD = "method"  # GET, POST, PUT, DELETE, PATCH, HEAD, OPTIONS, or other
STREAM = "stream"  # true | false
STATUS_CLASS = "status_class"  # 1xx..5xx, or "none" when no response status was received
# stop | length | tool_calls | content_filter | cancelled | error | other
FINISH_REASON = "finish_reason"
ERROR_TYPE = "type"
SLO = "slo"  # ttft | tpot | e2e | availability
RESULT = "result"  # good | bad (goodput: also cancelled)
PHASE = "phase"  # queue | prefill | decode | engine_queue
SOURCE = "source"
TOKEN_TYPE = "token_type"  # input | output
GPU = "gpu"
GPU_UUID = "uuid"
GPU_NAME = "name"
ENGINE = "engine"  # vllm | sglang | tgi | trtllm | llamacpp | embedded | unknown

# --- Buckets ----------------------------------------------------------------------------------
# OpenTelemetry GenAI recommended boundaries.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)
# Phases: fine at the bottom (sub-300 ms SLOs must be expressible), coarse at the top; about
# 2.5x apart, 11 boundaries up to a minute (was 22: the phase histograms were the largest item
# of the series budget, README "Series budget"; the 300 s boundary went to make room for the
# goodput counters). --buckets-phase sets others.
PHASE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0)
# Inter-token gaps: from a few ms (a large GPU batch) to the seconds of a stalled stream.
ITL_BUCKETS = (0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5,
               1.0)
# Inputs per batch request (embeddings, rerank, score): powers of 2 up to 1024.
INPUTS_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0)
# Tokens per request: the OpenTelemetry GenAI token-usage boundaries (powers of 4) from 16 to
# 256k; fewer than 16 tokens land in the first bucket.
TOKEN_BUCKETS = (16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0)

_LAT = (MODEL, OPERATION)

# --- Sidecar: per-request figures ----------------------------------------------------------------
TTFT = MetricSpec(
    "gen_ai_server_time_to_first_token_seconds", Kind.HISTOGRAM,
    "Time to first token: request arrival at the sidecar to the first content token relayed "
    "(streaming requests).", _LAT, TTFT_BUCKETS)
TPOT = MetricSpec(
    "gen_ai_server_time_per_output_token_seconds", Kind.HISTOGRAM,
    "Time per output token after the first: (e2e - TTFT) / (output tokens - 1).",
    _LAT, TPOT_BUCKETS)
REQUEST_DURATION = MetricSpec(
    "gen_ai_server_request_duration_seconds", Kind.HISTOGRAM,
    "End-to-end request duration: arrival at the sidecar to the last response byte relayed "
    "(streaming or not: the OpenTelemetry GenAI attributes; llm_exporter_requests_total "
    "splits by stream).", _LAT, DURATION_BUCKETS)
QUEUE = MetricSpec(
    PREFIX + "queue_duration_seconds", Kind.HISTOGRAM,
    "Time a request waited in the sidecar for a concurrency slot (only with "
    "--max-concurrency: without a limit nothing waits and no series is exported).",
    _LAT, PHASE_BUCKETS)
PREFILL = MetricSpec(
    PREFIX + "prefill_duration_seconds", Kind.HISTOGRAM,
    "Prefill: dispatch upstream to the first content token (includes the engine's own queue "
    "unless the engine reports it; see llm_exporter_phase_source_total).", _LAT, PHASE_BUCKETS)
DECODE = MetricSpec(
    PREFIX + "decode_duration_seconds", Kind.HISTOGRAM,
    "Decode: first content token to the last content token.", _LAT, PHASE_BUCKETS)
ENGINE_QUEUE = MetricSpec(
    PREFIX + "engine_queue_duration_seconds", Kind.HISTOGRAM,
    "Time a request waited in the engine's own queue, when the engine reports it.",
    _LAT, PHASE_BUCKETS)
ITL = MetricSpec(
    PREFIX + "inter_token_latency_seconds", Kind.HISTOGRAM,
    "Inter-token latency: the gap between consecutive content chunks divided evenly across "
    "the tokens the later chunk carries (one observation per token).", _LAT, ITL_BUCKETS)
INPUT_TOKENS_PER_REQUEST = MetricSpec(
    PREFIX + "request_input_tokens", Kind.HISTOGRAM,
    "Input (prompt) tokens per request.", _LAT, TOKEN_BUCKETS)
OUTPUT_TOKENS_PER_REQUEST = MetricSpec(
    PREFIX + "request_output_tokens", Kind.HISTOGRAM,
    "Output (completion) tokens per request.", _LAT, TOKEN_BUCKETS)

REQUEST_INPUTS = MetricSpec(
    PREFIX + "request_inputs", Kind.HISTOGRAM,
    "Inputs per batch request (embeddings, rerank, score, classify, pooling): how many texts "
    "one request carried.", _LAT, INPUTS_BUCKETS)

REQUESTS = MetricSpec(
    PREFIX + "requests", Kind.COUNTER,
    "Requests finished, by API, status class and finish reason (cancelled = client went "
    "away).", (MODEL, OPERATION, API, STREAM, STATUS_CLASS, FINISH_REASON))
UNMATCHED_REQUESTS = MetricSpec(
    PREFIX + "unmatched_requests", Kind.COUNTER,
    "Requests no route matched (relayed unmeasured: model lists, health checks, paths to map "
    "with --route), by method and status class; never by path.", (METHOD, STATUS_CLASS))
UNMATCHED_DURATION = MetricSpec(
    PREFIX + "unmatched_request_duration_seconds", Kind.HISTOGRAM,
    "Duration of requests no route matched: arrival to the last byte relayed.", (METHOD,),
    DURATION_BUCKETS)
INPUT_TOKENS = MetricSpec(
    PREFIX + "input_tokens", Kind.COUNTER, "Input (prompt) tokens processed.", (MODEL,))
OUTPUT_TOKENS = MetricSpec(
    PREFIX + "output_tokens", Kind.COUNTER, "Output (completion) tokens generated.", (MODEL,))
TOKEN_SOURCE = MetricSpec(
    PREFIX + "token_count_source", Kind.COUNTER,
    "Requests by where their token count came from: usage (the response), tokenizer "
    "(--tokenizer), chunks (content chunks counted), none.", (TOKEN_TYPE, SOURCE))
PHASE_SOURCE = MetricSpec(
    PREFIX + "phase_source", Kind.COUNTER,
    "Requests by where their phase figures came from: sidecar (outside view), "
    "engine_timings (response timings/headers), engine_span (the engine's OTLP span).",
    (PHASE, SOURCE))
ERRORS = MetricSpec(
    PREFIX + "errors", Kind.COUNTER,
    "Errors by type: upstream_connect, upstream_timeout, upstream_protocol, client_disconnect, "
    "client_timeout (headers too slow: closed), queue_full, instrumentation.", (ERROR_TYPE,))
GOODPUT_REQUESTS = MetricSpec(
    PREFIX + "goodput_requests", Kind.COUNTER,
    "Requests judged against every latency objective of their model at once (TTFT, TPOT, "
    "e2e, those that apply: TTFT to streams, TPOT to two tokens or more): good = succeeded "
    "and met all of them; bad = failed (5xx, error, no response) or missed one; cancelled = "
    "the client went away (neither). 4xx answers are not judged, but a 429 (refused for "
    "load) is bad.", (MODEL, RESULT))
GOODPUT_OUTPUT_TOKENS = MetricSpec(
    PREFIX + "goodput_output_tokens", Kind.COUNTER,
    "Output tokens of good requests (llm_exporter_goodput_requests_total{result=\"good\"}): "
    "the throughput that met the objectives.", (MODEL,))
SLO_REQUESTS = MetricSpec(
    PREFIX + "slo_requests", Kind.COUNTER,
    "Requests judged against each configured SLO threshold: good or bad.",
    (MODEL, SLO, RESULT))
IN_FLIGHT = MetricSpec(
    PREFIX + "requests_in_flight", Kind.GAUGE,
    "LLM requests admitted and not yet finished (being relayed).")
QUEUED = MetricSpec(
    PREFIX + "requests_queued", Kind.GAUGE,
    "LLM requests waiting in the sidecar for a concurrency slot.")
SLO_THRESHOLD = MetricSpec(
    PREFIX + "slo_threshold_seconds", Kind.GAUGE,
    "The configured SLO thresholds, so dashboards can draw them.", (SLO,))
# How late the sidecar's own event loop runs: a request's bytes wait in the kernel until the
# loop reads them, and its clock starts at that read.
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0)
EVENT_LOOP_LAG = MetricSpec(
    PREFIX + "event_loop_lag_seconds", Kind.HISTOGRAM,
    "How late the sidecar's event loop ran a timer due every 100 ms: the wait a request or "
    "chunk arriving at a random moment has in the kernel before the sidecar reads it, which "
    "its figures start after. A high p99 means the sidecar is short of CPU and its latencies "
    "read low by up to this much.", (), LOOP_LAG_BUCKETS)
BUILD_INFO = MetricSpec(
    PREFIX + "build", Kind.INFO, "Version of the exporter and the upstream it fronts.",
    ("version", ENGINE))

# --- GPU (NVML, collected at scrape time) ------------------------------------------------------
_GPU = (GPU, GPU_UUID, GPU_NAME)
GPU_COLLECTOR_UP = MetricSpec(
    PREFIX + "gpu_collector_up", Kind.GAUGE,
    "1 when NVML answered on this scrape, 0 when not (see the reason label).", ("reason",),
    group="gpu")
GPU_UTILIZATION = MetricSpec(
    PREFIX + "gpu_utilization_ratio", Kind.GAUGE,
    "Fraction of the last sample period a kernel ran on the GPU (NVML; coarse, prefer SM "
    "activity).", _GPU, group="gpu")
HARDWARE_UTILIZATION = MetricSpec(
    PREFIX + "hardware_utilization_ratio", Kind.GAUGE,
    "U = T_compute / T_total measured on the device: the mean over the engine's GPUs (all "
    "GPUs when its processes are not seen) of GPM SM activity (source sm_active, Hopper and "
    "later) or else NVML utilization (source nvml, a kernel ran at all: an upper bound). "
    "Absent without a GPU.", ("source",), group="gpu")
GPU_MEMORY_UTILIZATION = MetricSpec(
    PREFIX + "gpu_memory_utilization_ratio", Kind.GAUGE,
    "Fraction of the last sample period device memory was read or written.", _GPU, group="gpu")
GPU_MEMORY_USED = MetricSpec(
    PREFIX + "gpu_memory_used_bytes", Kind.GAUGE, "GPU memory in use.", _GPU, group="gpu")
GPU_MEMORY_TOTAL = MetricSpec(
    PREFIX + "gpu_memory_total_bytes", Kind.GAUGE, "GPU memory installed.", _GPU, group="gpu")
GPU_POWER = MetricSpec(
    PREFIX + "gpu_power_watts", Kind.GAUGE, "GPU power draw.", _GPU, group="gpu")
GPU_ENERGY = MetricSpec(
    PREFIX + "gpu_energy_joules", Kind.COUNTER, "GPU energy consumed since the driver loaded.",
    _GPU, group="gpu")
GPU_TEMPERATURE = MetricSpec(
    PREFIX + "gpu_temperature_celsius", Kind.GAUGE, "GPU die temperature.", _GPU, group="gpu")
GPU_SM_CLOCK = MetricSpec(
    PREFIX + "gpu_sm_clock_hertz", Kind.GAUGE, "SM clock.", _GPU, group="gpu")
GPU_MEMORY_CLOCK = MetricSpec(
    PREFIX + "gpu_memory_clock_hertz", Kind.GAUGE, "Memory clock.", _GPU, group="gpu")
GPU_THROTTLE = MetricSpec(
    PREFIX + "gpu_throttle_reason", Kind.GAUGE,
    "1 for each clock throttle reason currently active.", (*_GPU, "reason"), group="gpu")
GPU_ECC_ERRORS = MetricSpec(
    PREFIX + "gpu_ecc_errors", Kind.COUNTER, "ECC errors since the driver loaded.",
    (*_GPU, "error_type"), group="gpu")
GPU_XID_ERRORS = MetricSpec(
    PREFIX + "gpu_xid_errors", Kind.COUNTER, "XID critical errors seen.", _GPU, group="gpu")
GPU_PROCESS_MEMORY = MetricSpec(
    PREFIX + "gpu_engine_process_memory_bytes", Kind.GAUGE,
    "GPU memory used by the engine's process(es).", _GPU, group="gpu")
GPU_SM_ACTIVE = MetricSpec(
    PREFIX + "gpu_sm_active_ratio", Kind.GAUGE,
    "GPM: fraction of SMs busy (Hopper and later; the figure to trust over utilization).",
    _GPU, group="gpu")
GPU_SM_OCCUPANCY = MetricSpec(
    PREFIX + "gpu_sm_occupancy_ratio", Kind.GAUGE, "GPM: warps resident over the maximum.",
    _GPU, group="gpu")
GPU_TENSOR_ACTIVE = MetricSpec(
    PREFIX + "gpu_tensor_active_ratio", Kind.GAUGE, "GPM: tensor-core pipe activity.",
    _GPU, group="gpu")
GPU_DRAM_ACTIVE = MetricSpec(
    PREFIX + "gpu_dram_active_ratio", Kind.GAUGE, "GPM: DRAM bandwidth utilisation.",
    _GPU, group="gpu")

# --- Host and processes (psutil, collected at scrape time) ----------------------------------------
PROCESS = "process"  # engine | sidecar
PROCESS_CPU = MetricSpec(
    PREFIX + "process_cpu_seconds", Kind.COUNTER, "CPU time of the process (and children).",
    (PROCESS,), group="host")
PROCESS_CPU_UTILIZATION = MetricSpec(
    PREFIX + "process_cpu_utilization_ratio", Kind.GAUGE,
    "CPU time over wall time since the previous scrape, in cores.", (PROCESS,), group="host")
PROCESS_RSS = MetricSpec(
    PREFIX + "process_resident_memory_bytes", Kind.GAUGE, "Resident memory.", (PROCESS,),
    group="host")
PROCESS_RSS_PEAK = MetricSpec(
    PREFIX + "process_resident_memory_peak_bytes", Kind.GAUGE, "Peak resident memory.",
    (PROCESS,), group="host")
PROCESS_FDS = MetricSpec(
    PREFIX + "process_open_fds", Kind.GAUGE, "Open file descriptors.", (PROCESS,), group="host")
PROCESS_THREADS = MetricSpec(
    PREFIX + "process_threads", Kind.GAUGE, "Threads.", (PROCESS,), group="host")
PROCESS_UP = MetricSpec(
    PREFIX + "process_up", Kind.GAUGE, "1 when the process was found on this scrape.",
    (PROCESS,), group="host")
HOST_CPU_UTILIZATION = MetricSpec(
    PREFIX + "host_cpu_utilization_ratio", Kind.GAUGE, "Host CPU busy fraction (all cores).",
    group="host")
HOST_MEMORY_USED = MetricSpec(
    PREFIX + "host_memory_used_bytes", Kind.GAUGE, "Host memory in use.", group="host")
HOST_MEMORY_TOTAL = MetricSpec(
    PREFIX + "host_memory_total_bytes", Kind.GAUGE, "Host memory installed.", group="host")
ENGINE_BUSY = MetricSpec(
    PREFIX + "engine_busy_seconds", Kind.COUNTER,
    "Wall time the engine had a batch in flight; rate() of it is the engine's occupancy, not "
    "hardware utilisation (an engine busy in Python leaves the GPU idle: see "
    "llm_exporter_hardware_utilization_ratio).", group="host")

# --- Engine signals, normalised across engines ---------------------------------------------------
ENGINE_UP = MetricSpec(
    PREFIX + "engine_metrics_up", Kind.GAUGE,
    "1 when the upstream's /metrics (or the embedded engine's /engine/stats) was scraped and "
    "recognised on this scrape.", (ENGINE,),
    group="engine")
ENGINE_WAITING = MetricSpec(
    PREFIX + "engine_requests_waiting", Kind.GAUGE, "Requests waiting in the engine's queue.",
    group="engine")
ENGINE_RUNNING = MetricSpec(
    PREFIX + "engine_requests_running", Kind.GAUGE, "Requests running in the engine's batch.",
    group="engine")
ENGINE_KV_USAGE = MetricSpec(
    PREFIX + "engine_kv_cache_usage_ratio", Kind.GAUGE, "KV-cache usage, 0 to 1.",
    group="engine")
ENGINE_PREFIX_HIT = MetricSpec(
    PREFIX + "engine_prefix_cache_hit_ratio", Kind.GAUGE, "Prefix-cache hit ratio, 0 to 1.",
    group="engine")
ENGINE_PREEMPTIONS = MetricSpec(
    PREFIX + "engine_preemptions", Kind.COUNTER, "Requests preempted by the engine.",
    group="engine")
SATURATION = MetricSpec(
    PREFIX + "saturation_ratio", Kind.GAUGE,
    "Per-replica saturation for autoscalers: max(queued / queue threshold, KV usage / KV "
    "threshold); 1 means at capacity.", group="engine")

CAPACITY = MetricSpec(
    PREFIX + "capacity_requests_per_second", Kind.GAUGE,
    "Requests/s one replica carries within its objectives, as `llm-exporter calibrate` "
    "measured it (--capacity-rps); absent when not configured.")
CAPACITY_LOAD = MetricSpec(
    PREFIX + "capacity_load_ratio", Kind.GAUGE,
    "Demand on this replica over its calibrated capacity: requests that arrived in the last "
    "--slo-load-window seconds, per second, divided by --capacity-rps (1 = at capacity; the "
    "sum over replicas is the replica count the load needs). Absent without --capacity-rps.")
SLO_LOAD = MetricSpec(
    PREFIX + "slo_load_ratio", Kind.GAUGE,
    "SLO-normalised load of this replica: over the last --slo-load-window seconds, the 90th "
    "percentile of each request's TTFT divided by its model's TTFT objective, and the same for "
    "TPOT; the larger of the two. 1 = recent requests sit at their objectives; 0 with no "
    "request in the window.")

# --- Cost ---
COST = MetricSpec(
    PREFIX + "cost_dollars", Kind.COUNTER,
    "Accumulated cost of this replica at --gpu-hourly-cost x GPUs + --replica-hourly-cost.",
    group="cost")
HOURLY_COST = MetricSpec(
    PREFIX + "hourly_cost_dollars", Kind.GAUGE, "Configured hourly cost of this replica.",
    group="cost")

ALL: tuple[MetricSpec, ...] = tuple(v for v in list(globals().values())
                                    if isinstance(v, MetricSpec))
SIDECAR: tuple[MetricSpec, ...] = tuple(m for m in ALL if m.group == "sidecar")
LATENCY_HISTOGRAMS: tuple[MetricSpec, ...] = (TTFT, TPOT, REQUEST_DURATION, QUEUE, PREFILL,
                                              DECODE, ENGINE_QUEUE, ITL)


def by_name(name: str) -> MetricSpec:
    for m in ALL:
        if m.name == name or m.exposed == name:
            return m
    raise KeyError(name)


def markdown_table() -> str:
    """The README's metric table, generated so it cannot drift from the catalogue."""
    rows = ["| metric | type | labels | what |", "|---|---|---|---|"]
    for m in ALL:
        labels = ", ".join(m.labels) or "—"
        rows.append(f"| `{m.exposed}` | {m.kind.value} | {labels} | {m.help} |")
    return "\n".join(rows)
