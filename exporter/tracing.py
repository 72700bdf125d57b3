"""OpenTelemetry: one SERVER span per LLM request named ``{operation} {model}``, with child
spans ``queue``, ``prefill`` and ``decode`` drawn from the request's timeline.

The tracer provider is passed in. :func:`provider_from_env` builds the default one from the
standard ``OTEL_*`` variables: OTLP/HTTP export when an endpoint is set, no export otherwise
(spans still get ids, so exemplars and the ``traceparent`` sent upstream stay useful).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as genai
from opentelemetry.semconv.attributes import error_attributes, server_attributes
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from exporter import __version__

GEN_AI_REQUEST_STREAM = getattr(genai, "GEN_AI_REQUEST_STREAM", "gen_ai.request.stream")
# Project attributes, namespaced, for what the conventions do not define.
ATTR_QUEUE = "llm_exporter.queue.duration"
ATTR_TTFT = "llm_exporter.time_to_first_token"
ATTR_TOKEN_SOURCE = "llm_exporter.output_tokens.source"
ATTR_PHASE_SOURCE = "llm_exporter.phase.source"
ATTR_API = "llm_exporter.api"  # the protocol (the api label): openai_chat, anthropic_messages…
ATTR_FINISH = "llm_exporter.finish_reason"


def provider_from_env(environ: Mapping[str, str]) -> tuple[TracerProvider, bool]:
    """The provider, and whether it exports anything (if not, spans need not be recorded)."""
    provider = TracerProvider(resource=Resource.create(
        {"service.name": environ.get("OTEL_SERVICE_NAME", "llm-exporter"),
         "service.version": __version__}))
    exporters = {e.strip() for e in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")}
    disabled = environ.get("OTEL_SDK_DISABLED", "").lower() == "true" or "none" in exporters
    if not disabled and "otlp" in exporters and (
            environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return provider, True
    return provider, False


def clean_text(value: str) -> str:
    """``value`` as UTF-8 can carry it: a lone surrogate (a JSON ``"\\ud800"`` escape from a
    client) would make the exporter fail the whole batch, other requests' spans included."""
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace").decode("utf-8")
    return value


def clean(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    """Span attributes with every string (and string in a sequence) made UTF-8-safe."""
    out: dict[str, Any] = {}
    for k, v in (attributes or {}).items():
        if isinstance(v, str):
            v = clean_text(v)
        elif isinstance(v, list | tuple):
            v = [clean_text(x) if isinstance(x, str) else x for x in v]
        out[k] = v
    return out


class RequestTracer:
    """``recording=False`` (nothing exports spans) builds no SDK spans at all: each request
    still gets its own span id in the client's trace (or a new one), so exemplars and the
    ``traceparent`` sent upstream work, at a fraction of the cost."""

    def __init__(self, provider: trace.TracerProvider, capture_content: bool = False,
                 recording: bool = True) -> None:
        self._tracer = provider.get_tracer("llm-exporter", __version__)
        self.capture_content = capture_content
        self.recording = recording
        self._ids = RandomIdGenerator()

    def start(self, headers: Mapping[str, str], operation: str, model: str, start_ns: int,
              attributes: Mapping[str, Any]) -> Span:
        ctx = extract(headers)
        if not self.recording:
            parent = trace.get_current_span(ctx).get_span_context()
            if parent.is_valid:
                return NonRecordingSpan(SpanContext(
                    parent.trace_id, self._ids.generate_span_id(), False,
                    parent.trace_flags, parent.trace_state))
            return NonRecordingSpan(SpanContext(
                self._ids.generate_trace_id(), self._ids.generate_span_id(), False,
                TraceFlags(TraceFlags.SAMPLED)))
        return self._tracer.start_span(
            clean_text(f"{operation} {model}"), context=ctx, kind=SpanKind.SERVER,
            start_time=start_ns,
            attributes=clean({genai.GEN_AI_OPERATION_NAME: operation, **attributes}))

    @staticmethod
    def inject(span: Span, carrier: MutableMapping[str, str]) -> None:
        """Write the span's own ``traceparent``/``tracestate`` into the upstream headers."""
        inject(carrier, context=trace.set_span_in_context(span))

    def child(self, parent: Span, name: str, start_ns: int, end_ns: int,
              attributes: Mapping[str, Any] | None = None) -> None:
        span = self._tracer.start_span(name, context=trace.set_span_in_context(parent),
                                       kind=SpanKind.INTERNAL, start_time=start_ns,
                                       attributes=clean(attributes))
        span.end(end_time=max(end_ns, start_ns))

    @staticmethod
    def trace_id(span: Span) -> str | None:
        ctx = span.get_span_context()
        return format(ctx.trace_id, "032x") if ctx.is_valid else None

    @staticmethod
    def finish(span: Span, end_ns: int, status: int | None, error_type: str | None,
               attributes: Mapping[str, Any]) -> None:
        span.set_attributes(clean(attributes))
        if error_type:
            span.set_attribute(error_attributes.ERROR_TYPE, error_type)
        if status is None or status >= 500 or error_type:
            span.set_status(Status(StatusCode.ERROR, error_type))
        span.end(end_time=end_ns)


SERVER_ADDRESS = server_attributes.SERVER_ADDRESS
SERVER_PORT = server_attributes.SERVER_PORT
