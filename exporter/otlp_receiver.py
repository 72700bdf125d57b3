"""An OTLP/HTTP trace receiver for the engines' own request spans.

vLLM (``--otlp-traces-endpoint``) and SGLang export one span per request carrying the
engine's exact phase split as ``gen_ai.latency.*`` attributes. The sidecar passes its own
``traceparent`` upstream, so the engine's span shares the sidecar's trace id (and names the
sidecar's span as its parent): :class:`EngineSpanStore` keys the figures by trace id, and the
proxy waits for them a bounded time before falling back to the outside view.

The receiver speaks OTLP/HTTP ``POST /v1/traces`` in binary protobuf
(``application/x-protobuf``, optionally gzip) and JSON (``application/json``, ids in hex as
the OTLP spec says). It answers 200 with an empty ``ExportTraceServiceResponse``, 400 on a
payload it cannot decode, 415 on another content type; failures go to ``on_error`` (never
raising into the handler). Start-up spans and any span without the latency attributes are
ignored. Everything runs on one event loop: ``add`` and ``wait`` are not thread-safe.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from exporter.engine_timings import number
from exporter.timeline import Clock, EngineTimings

SOURCE = "engine_span"
PATH = "/v1/traces"

# Attribute keys as vLLM (vllm/tracing.py SpanAttributes) and SGLang set them, in seconds.
TIME_IN_QUEUE = "gen_ai.latency.time_in_queue"
TIME_TO_FIRST_TOKEN = "gen_ai.latency.time_to_first_token"
TIME_IN_MODEL_PREFILL = "gen_ai.latency.time_in_model_prefill"
TIME_IN_MODEL_DECODE = "gen_ai.latency.time_in_model_decode"
PHASE_ATTRIBUTES = (TIME_IN_QUEUE, TIME_TO_FIRST_TOKEN, TIME_IN_MODEL_PREFILL, TIME_IN_MODEL_DECODE)
# Token counts: the engines' older names first, then the current GenAI convention names.
PROMPT_TOKENS = ("gen_ai.usage.prompt_tokens", "gen_ai.usage.input_tokens")
COMPLETION_TOKENS = ("gen_ai.usage.completion_tokens", "gen_ai.usage.output_tokens")

MAX_BODY_BYTES = 8 << 20  # compressed or not; an engine batch is a few KiB per span
MAX_INFLATED_BYTES = 32 << 20

# Error types passed to on_error (bounded).
ERR_DECODE = "otlp_decode"
ERR_CONTENT_TYPE = "otlp_content_type"


@dataclass(slots=True)
class _Entry:
    timings: EngineTimings
    added: float


class EngineSpanStore:
    """Engine figures by trace id until the proxy claims them: at most ``max_entries``, each
    kept ``ttl`` seconds (of the injected ``clock``); the oldest go first.

    A figure is claimed once: :meth:`wait` removes what it returns. When the span named its
    parent (the sidecar's span id from ``traceparent``) and the waiter names its span, both
    must agree, so two requests in one client trace do not take each other's figures.
    """

    def __init__(self, max_entries: int = 4096, ttl: float = 120.0,
                 clock: Clock = time.monotonic) -> None:
        self._max = max(1, max_entries)
        self._ttl = ttl
        self._clock = clock
        # (trace id, parent span id or 0) -> entry, oldest first.
        self._entries: OrderedDict[tuple[int, int], _Entry] = OrderedDict()
        # trace id -> [(span id or 0, future)] of requests waiting for their figures.
        self._waiters: dict[int, list[tuple[int, asyncio.Future[EngineTimings]]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def waiting(self) -> int:
        return sum(len(w) for w in self._waiters.values())

    def add(self, trace_id: int, timings: EngineTimings, parent_span_id: int = 0) -> None:
        """Record one engine span's figures; hands them straight to a matching waiter."""
        for i, (span_id, fut) in enumerate(self._waiters.get(trace_id, ())):
            if not fut.done() and _agree(span_id, parent_span_id):
                fut.set_result(timings)
                self._drop_waiter(trace_id, i)
                return
        self._expire()
        key = (trace_id, parent_span_id)
        self._entries.pop(key, None)
        self._entries[key] = _Entry(timings, self._clock())
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def take(self, trace_id: int, span_id: int = 0) -> EngineTimings | None:
        """The figures for this request if they are already here (removed), else None."""
        self._expire()
        key = (trace_id, span_id)
        entry = self._entries.pop(key, None) if span_id else None
        if entry is None:
            for k in self._entries:
                if k[0] == trace_id and _agree(span_id, k[1]):
                    entry = self._entries.pop(k)
                    break
        return entry.timings if entry is not None else None

    async def wait(self, trace_id: int, timeout: float, span_id: int = 0) -> EngineTimings | None:
        """The figures for this request: at once when already here, else when their span
        arrives, or None after ``timeout`` seconds. A cancelled wait leaves nothing behind."""
        found = self.take(trace_id, span_id)
        if found is not None or not timeout or timeout <= 0 or math.isnan(timeout):
            return found
        fut: asyncio.Future[EngineTimings] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(trace_id, [])
        waiters.append((span_id, fut))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return None
        finally:
            self._remove_waiter(trace_id, fut)

    def _drop_waiter(self, trace_id: int, index: int) -> None:
        waiters = self._waiters.get(trace_id)
        if waiters is None:
            return
        del waiters[index]
        if not waiters:
            del self._waiters[trace_id]

    def _remove_waiter(self, trace_id: int, fut: asyncio.Future[EngineTimings]) -> None:
        waiters = self._waiters.get(trace_id)
        if waiters is None:
            return
        for i, (_, f) in enumerate(waiters):
            if f is fut:
                self._drop_waiter(trace_id, i)
                return

    def _expire(self) -> None:
        horizon = self._clock() - self._ttl
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.added > horizon:
                break
            del self._entries[key]


def _agree(a: int, b: int) -> bool:
    """Span ids match, or one side does not know its span id."""
    return not a or not b or a == b


# --- Decoding ------------------------------------------------------------------------------


def _value(v: AnyValue) -> float | None:
    kind = v.WhichOneof("value")
    if kind in ("double_value", "int_value", "string_value"):
        return number(getattr(v, kind))
    return None


def timings_from_span(span: Span) -> EngineTimings | None:
    """The phase figures of one engine request span, or None for any other span."""
    attrs: dict[str, float] = {}
    for kv in span.attributes:
        if kv.key in PHASE_ATTRIBUTES or kv.key in PROMPT_TOKENS or kv.key in COMPLETION_TOKENS:
            f = _value(kv.value)
            if f is not None:
                attrs.setdefault(kv.key, f)
    if not any(k in attrs for k in PHASE_ATTRIBUTES):
        return None

    def count(keys: tuple[str, ...]) -> int | None:
        for k in keys:
            if k in attrs and attrs[k] == int(attrs[k]):
                return int(attrs[k])
        return None

    return EngineTimings(
        SOURCE,
        queue=attrs.get(TIME_IN_QUEUE),
        prefill=attrs.get(TIME_IN_MODEL_PREFILL),
        decode=attrs.get(TIME_IN_MODEL_DECODE),
        ttft=attrs.get(TIME_TO_FIRST_TOKEN),
        input_tokens=count(PROMPT_TOKENS),
        output_tokens=count(COMPLETION_TOKENS),
    )


def engine_spans(req: ExportTraceServiceRequest) -> Iterator[tuple[int, int, EngineTimings]]:
    """(trace id, parent span id or 0, figures) for every engine request span."""
    for rs in req.resource_spans:
        for ss in rs.scope_spans:
            for span in ss.spans:
                if len(span.trace_id) != 16:
                    continue
                t = timings_from_span(span)
                if t is None:
                    continue
                trace_id = int.from_bytes(span.trace_id, "big")
                parent = int.from_bytes(span.parent_span_id, "big") if span.parent_span_id else 0
                if trace_id:
                    yield trace_id, parent, t


_ID_KEYS = frozenset({"traceId", "spanId", "parentSpanId", "trace_id", "span_id",
                      "parent_span_id"})


def _hex_ids_to_base64(node: Any) -> Any:
    """OTLP/JSON writes ids as hex; protobuf's JSON mapping expects base64 for bytes."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k in _ID_KEYS and isinstance(v, str):
                out[k] = base64.b64encode(bytes.fromhex(v)).decode() if v else ""
            else:
                out[k] = _hex_ids_to_base64(v)
        return out
    if isinstance(node, list):
        return [_hex_ids_to_base64(v) for v in node]
    return node


def parse_request(body: bytes, content_type: str) -> ExportTraceServiceRequest:
    """Decode one export request; ValueError when it is not one."""
    req = ExportTraceServiceRequest()
    if content_type == "application/json":
        try:
            doc = json.loads(body)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            json_format.ParseDict(_hex_ids_to_base64(doc), req, ignore_unknown_fields=True)
        except (json_format.ParseError, UnicodeDecodeError, TypeError, RecursionError) as e:
            raise ValueError(str(e)) from e
        return req
    try:
        req.ParseFromString(body)
    except DecodeError as e:
        raise ValueError(str(e)) from e
    return req


def _inflate(body: bytes) -> bytes:
    """gunzip (bounded) when the body is still compressed (aiohttp usually inflates it)."""
    if body[:2] != b"\x1f\x8b":
        return body
    d = zlib.decompressobj(wbits=31)
    try:
        out = d.decompress(body, MAX_INFLATED_BYTES)
    except zlib.error as e:
        raise ValueError(f"bad gzip: {e}") from e
    if d.unconsumed_tail:
        raise ValueError("inflated body too large")
    return out


def build_receiver_app(store: EngineSpanStore,
                       on_error: Callable[[str], None] | None = None) -> web.Application:
    """An aiohttp app serving ``POST /v1/traces`` into ``store``."""

    def error(kind: str) -> None:
        if on_error is not None:
            with contextlib.suppress(Exception):
                on_error(kind)

    async def traces(request: web.Request) -> web.Response:
        ctype = request.content_type
        if ctype not in ("application/x-protobuf", "application/json"):
            error(ERR_CONTENT_TYPE)
            return web.Response(status=415, text=f"unsupported content type {ctype!r}")
        try:
            body = _inflate(await request.read())
            req = parse_request(body, ctype)
            found = list(engine_spans(req))
        except Exception as e:  # a bad export must never take the receiver down
            error(ERR_DECODE)
            return web.Response(status=400, text=f"bad OTLP payload: {e}"[:300])
        for trace_id, parent, timings in found:
            store.add(trace_id, timings, parent)
        if ctype == "application/json":
            return web.Response(body=b"{}", content_type="application/json")
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_post(PATH, traces)
    return app


def spans_of(req: ExportTraceServiceRequest) -> Iterable[Span]:
    """Every span in an export request (tests and debugging)."""
    for rs in req.resource_spans:
        for ss in rs.scope_spans:
            yield from ss.spans
