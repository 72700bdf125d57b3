"""Turns a finished :class:`~exporter.proxy.Exchange` into metrics and spans.

This is the only module that knows both the relay's view of a request and the exporters'.
Nothing here sits on a request's critical path: finished requests are recorded in batches a
few milliseconds after they end (so the next request a client sends is forwarded first, and
the recording code runs warm), and work that could delay the event loop (a tokenizer, waiting
for an engine's span) runs in a task.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any

from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as genai

from exporter import engine_timings, labels
from exporter.metrics import Outcome, SidecarMetrics
from exporter.otlp_receiver import EngineSpanStore
from exporter.protocols import Reply, stream_texts
from exporter.proxy import Exchange, Hooks
from exporter.timeline import EngineTimings, derive
from exporter.tokens import TokenCounter
from exporter.tracing import (
    ATTR_API,
    ATTR_PHASE_SOURCE,
    ATTR_QUEUE,
    ATTR_TOKEN_SOURCE,
    ATTR_TTFT,
    GEN_AI_REQUEST_STREAM,
    RequestTracer,
)

log = logging.getLogger(__name__)

# How long a finished request waits to be recorded with the others that end meanwhile.
RECORD_DELAY = 0.005


@dataclass(slots=True)
class _Result:
    """What the response said, decoded once."""

    reply: Reply
    engine: EngineTimings | None
    text: str | None  # generated text, only when captured (tokenizer or --capture-content)


class Instrumentation(Hooks):
    def __init__(self, metrics: SidecarMetrics, tracer: RequestTracer, model_labels:
                 labels.ModelLabels, tokens: TokenCounter | None = None,
                 spans: EngineSpanStore | None = None, span_wait: float = 10.0) -> None:
        self.metrics = metrics
        self.tracer = tracer
        self.labels = model_labels
        self.tokens = tokens
        self.spans = spans
        self.span_wait = span_wait
        self.pending: set[asyncio.Task[None]] = set()
        self._batch: list[Exchange] = []
        self._flush_at: asyncio.TimerHandle | None = None

    # --- hooks the relay calls -----------------------------------------------------------------
    def started(self, ex: Exchange) -> dict[str, str]:
        self.metrics.slo_load.arrived()
        model = ex.model if isinstance(ex.model, str) and ex.model else "unknown"
        if not self.tracer.recording:
            ex.span = self.tracer.start(ex.headers, ex.operation, model, 0, {})
            carrier: dict[str, str] = {}
            self.tracer.inject(ex.span, carrier)
            return carrier
        attrs: dict[str, Any] = {genai.GEN_AI_REQUEST_MODEL: model[:256],
                                 GEN_AI_REQUEST_STREAM: ex.stream,
                                 ATTR_API: ex.protocol.name, **ex.attrs}
        body = ex.body or {}
        if self.tracer.capture_content:
            prompt = next((body[k] for k in _PROMPT_KEYS if k in body), None)
            if prompt is not None:
                attrs[genai.GEN_AI_INPUT_MESSAGES] = json.dumps(prompt, ensure_ascii=False)
        ex.span = self.tracer.start(ex.headers, ex.operation, model[:128],
                                    ex.wall_ns_at_arrival, attrs)
        carrier = {}
        self.tracer.inject(ex.span, carrier)
        return carrier

    def wants_capture(self, ex: Exchange) -> bool:
        return self.tokens is not None or self.tracer.capture_content

    def error(self, kind: str) -> None:
        self.metrics.error(kind)

    def unmatched(self, method: str, status: int | None, seconds: float) -> None:
        self.metrics.unmatched_request(labels.method(method), labels.status_class(status),
                                       seconds)

    def instrumentation_error(self, where: str, exc: BaseException) -> None:
        self.metrics.instrumentation_error(where, exc)

    def finished(self, ex: Exchange) -> None:
        self._batch.append(ex)
        if self._flush_at is None:
            self._flush_at = asyncio.get_running_loop().call_later(RECORD_DELAY, self.flush)

    def flush(self) -> None:
        """Record every finished request now (the timer does it ``RECORD_DELAY`` after the
        first of a batch ends; a scrape may see a request that just ended a moment late)."""
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        batch, self._batch = self._batch, []
        for ex in batch:
            try:
                self._finish(ex)
            except Exception as e:
                self.metrics.instrumentation_error("finished", e)

    def flush_from_thread(self, loop: asyncio.AbstractEventLoop, timeout: float = 0.1) -> None:
        """For the scrape thread: have the event loop record what has ended and wait for it
        (at most ``timeout``), so a scrape includes every request that ended before it."""
        if not self._batch:
            return
        done = threading.Event()

        def run() -> None:
            try:
                self.flush()
            finally:
                done.set()

        try:
            loop.call_soon_threadsafe(run)
        except RuntimeError:  # the loop is closed: nothing will record them now
            return
        done.wait(timeout)

    def _finish(self, ex: Exchange) -> None:
        result = self._result(ex)
        need_tokens = self.tokens is not None and ex.body is not None and (
            result.reply.output_tokens is None or result.reply.input_tokens is None)
        need_span = (self.spans is not None and result.engine is None and ex.span is not None
                     and _ok(ex))
        if not (need_tokens or need_span):
            self._record(ex, result, None)
            return
        task = asyncio.get_running_loop().create_task(self._finish_later(ex, result,
                                                                         need_tokens, need_span))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def close(self) -> None:
        """Finish what is pending (bounded by the span wait), at shutdown."""
        self.flush()
        if self.pending:
            await asyncio.wait(set(self.pending), timeout=self.span_wait + 1)

    # --- the one cleanup path ----------------------------------------------------------------
    async def _finish_later(self, ex: Exchange, result: _Result, need_tokens: bool,
                            need_span: bool) -> None:
        counted: tuple[int | None, int | None] | None = None
        try:
            if need_tokens:
                counted = await asyncio.get_running_loop().run_in_executor(
                    None, self._count, ex, result)
            if need_span and self.spans is not None:
                # The engine's span is the child of ours: match on both ids, so two requests
                # of one client trace never take each other's figures.
                ctx = ex.span.get_span_context()
                result.engine = await self.spans.wait(ctx.trace_id, self.span_wait,
                                                      span_id=ctx.span_id)
        except Exception as e:
            self.metrics.instrumentation_error("deferred finish", e)
        self._record(ex, result, counted)

    def _count(self, ex: Exchange, result: _Result) -> tuple[int | None, int | None]:
        assert self.tokens is not None and ex.body is not None
        prompt = self.tokens.count_prompt(ex.body)
        output = self.tokens.count(result.text) if result.text is not None else None
        return prompt, output

    def _result(self, ex: Exchange) -> _Result:
        reply = Reply()
        timings: EngineTimings | None = None
        text: str | None = None
        if ex.upstream_headers is not None:
            timings = engine_timings.from_headers(ex.upstream_headers)
        dialect = ex.protocol.dialect
        if ex.scanner is not None and dialect is not None:
            reply = ex.scanner.reply
            if ex.captured and not ex.capture_overflow:
                text = "".join(stream_texts(dialect, b"".join(ex.captured)))
        elif ex.captured and not ex.capture_overflow:
            try:
                obj = json.loads(b"".join(ex.captured))
            except (ValueError, RecursionError):
                obj = None  # not JSON (or compressed): relayed untouched, counted without it
            if obj is not None:
                reply = ex.protocol.whole(obj)
                text = "".join(reply.texts)
        return _Result(reply, reply.timings or timings, text)

    def _record(self, ex: Exchange, r: _Result,
                counted: tuple[int | None, int | None] | None) -> None:
        try:
            self._record_unguarded(ex, r, counted)
        except Exception as e:
            self.metrics.instrumentation_error("record", e)

    def _record_unguarded(self, ex: Exchange, r: _Result,
                          counted: tuple[int | None, int | None] | None) -> None:
        tl = ex.timeline
        reply = r.reply
        input_tokens, input_source = reply.input_tokens, "usage"
        output_tokens, output_source = reply.output_tokens, "usage"
        if input_tokens is None:
            input_source = "none"
        if output_tokens is None:
            output_source = "none"
        if counted is not None:
            if input_tokens is None and counted[0] is not None:
                input_tokens, input_source = counted[0], "tokenizer"
            if output_tokens is None and counted[1] is not None:
                output_tokens, output_source = counted[1], "tokenizer"
        if output_tokens is None and r.engine is not None and r.engine.output_tokens is not None:
            output_tokens, output_source = r.engine.output_tokens, "engine"
        if input_tokens is None and r.engine is not None and r.engine.input_tokens is not None:
            input_tokens, input_source = r.engine.input_tokens, "engine"
        if output_tokens is None and ex.scanner is not None and _ok(ex):
            output_tokens, output_source = tl.content_events, "chunks"

        if ex.cancelled:
            finish = "cancelled"
        elif ex.error or ex.status is None or ex.status >= 400:
            finish = "error"
        else:
            finish = labels.finish_reason(reply.finish_reason)
        ok = bool(ex.status and 200 <= ex.status < 300)
        model = self.labels.label(ex.model, accepted=ok)
        iv = derive(tl, output_tokens, r.engine)
        trace_id = self.tracer.trace_id(ex.span) if ex.span is not None else None
        self.metrics.record(Outcome(
            model, ex.operation, ex.protocol.name, ex.stream, labels.status_class(ex.status),
            finish, iv, input_tokens, output_tokens, input_source, output_source, trace_id,
            ex.inputs, ex.status))
        if ex.span is not None and self.tracer.recording:
            self._end_span(ex, r, iv, input_tokens, output_tokens, output_source, finish)

    def _end_span(self, ex: Exchange, r: _Result, iv: Any, input_tokens: int | None,
                  output_tokens: int | None, output_source: str, finish: str) -> None:
        tl = ex.timeline

        def ns(t: float | None) -> int:
            return ex.wall_ns_at_arrival + int(((t if t is not None else tl.arrival)
                                                - tl.arrival) * 1e9)

        if tl.admitted is not None:
            self.tracer.child(ex.span, "queue", ns(tl.arrival), ns(tl.admitted))
        if tl.first_token is not None and tl.dispatched is not None:
            self.tracer.child(ex.span, "prefill", ns(tl.dispatched), ns(tl.first_token),
                              {ATTR_PHASE_SOURCE: iv.phase_source})
            self.tracer.child(ex.span, "decode", ns(tl.first_token), ns(tl.last_token),
                              {ATTR_PHASE_SOURCE: iv.phase_source})
        attrs: dict[str, Any] = {genai.GEN_AI_RESPONSE_FINISH_REASONS: [finish],
                                 ATTR_TOKEN_SOURCE: output_source,
                                 ATTR_PHASE_SOURCE: iv.phase_source}
        if ex.status is not None:
            attrs["http.response.status_code"] = ex.status
        if input_tokens is not None:
            attrs[genai.GEN_AI_USAGE_INPUT_TOKENS] = input_tokens
        if output_tokens is not None:
            attrs[genai.GEN_AI_USAGE_OUTPUT_TOKENS] = output_tokens
        if r.reply.model:
            attrs[genai.GEN_AI_RESPONSE_MODEL] = r.reply.model[:256]
        if iv.queue is not None:
            attrs[ATTR_QUEUE] = iv.queue
        if iv.ttft is not None:
            attrs[ATTR_TTFT] = iv.ttft
        if self.tracer.capture_content and r.text is not None:
            attrs[genai.GEN_AI_OUTPUT_MESSAGES] = r.text
        error = ex.error or ("cancelled" if ex.cancelled else None)
        if error is None and ex.status is not None and ex.status >= 500:
            error = str(ex.status)
        self.tracer.finish(ex.span, ns(tl.end), ex.status, error, attrs)


def _ok(ex: Exchange) -> bool:
    return bool(ex.status and 200 <= ex.status < 300) and not ex.cancelled and not ex.error


# Where a request body keeps its prompt, by protocol (for --capture-content only).
_PROMPT_KEYS = ("messages", "prompt", "input", "inputs", "text", "query")
