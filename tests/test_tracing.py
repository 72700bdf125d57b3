"""Spans: one SERVER span per LLM request, child phases, GenAI attributes, W3C context in
from the client and out to the upstream, no content unless asked."""

from __future__ import annotations

import aiohttp
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as genai
from opentelemetry.trace import SpanKind, StatusCode

from tests.harness import running_sidecar, spy
from tests.upstream import Script, SyntheticUpstream

CHAT = "/v1/chat/completions"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
PROMPT = "secret prompt words"


def payload(**extra: object) -> dict[str, object]:
    return {"model": "m1", "stream": True, "max_tokens": 50, "temperature": 0.5,
            "messages": [{"role": "user", "content": PROMPT}], **extra}


async def test_server_span_children_attributes_and_propagation() -> None:
    async with SyntheticUpstream(Script(ttft=0.03, itl=0.005, tokens=5)) as up, \
            running_sidecar(up.url, max_concurrency=1) as sc, aiohttp.ClientSession() as s:
        headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
                   "tracestate": "vendor=abc"}
        async with s.post(sc.url + CHAT, json=payload(), headers=headers) as r:
            text = (await r.read()).decode()
        spans = sc.finished_spans()
        server = [x for x in spans if x.kind is SpanKind.SERVER]
        assert len(server) == 1
        root = server[0]
        assert root.name == "chat m1"
        assert format(root.context.trace_id, "032x") == CLIENT_TRACE
        assert root.parent is not None and format(root.parent.span_id, "016x") == CLIENT_SPAN
        a = root.attributes or {}
        assert a[genai.GEN_AI_OPERATION_NAME] == "chat"
        assert a[genai.GEN_AI_REQUEST_MODEL] == "m1"
        assert a[genai.GEN_AI_REQUEST_MAX_TOKENS] == 50
        assert a[genai.GEN_AI_REQUEST_TEMPERATURE] == 0.5
        assert a[genai.GEN_AI_USAGE_OUTPUT_TOKENS] == 5
        assert tuple(a[genai.GEN_AI_RESPONSE_FINISH_REASONS]) == ("stop",)
        assert root.status.status_code is StatusCode.UNSET
        children = {x.name: x for x in spans if x.parent is not None
                    and x.parent.span_id == root.context.span_id}
        assert set(children) == {"queue", "prefill", "decode"}
        q, pre, dec = children["queue"], children["prefill"], children["decode"]
        assert (q.end_time - q.start_time) / 1e9 < 0.01  # no wait
        assert root.start_time == q.start_time and q.end_time <= pre.start_time
        assert root.start_time <= pre.start_time <= pre.end_time <= dec.start_time
        assert dec.end_time <= root.end_time
        assert (pre.end_time - pre.start_time) / 1e9 > 0.025
        # The upstream got the sidecar's own span as parent, in the client's trace.
        sent = up.requests[-1].headers
        assert sent["traceparent"] == (f"00-{CLIENT_TRACE}-"
                                       f"{root.context.span_id:016x}-01")
        assert sent["tracestate"] == "vendor=abc"
        # No content anywhere unless --capture-content.
        assert "t0" in text
        for span in spans:
            for value in (span.attributes or {}).values():
                assert PROMPT not in str(value) and "t0 t1" not in str(value)


async def test_queue_span_and_new_trace_without_client_context() -> None:
    async with SyntheticUpstream(Script(ttft=0.05, itl=0, tokens=2)) as up, \
            running_sidecar(up.url, max_concurrency=1) as sc, aiohttp.ClientSession() as s:
        import asyncio

        async def go() -> None:
            async with s.post(sc.url + CHAT, json=payload()) as r:
                await r.read()

        await asyncio.gather(go(), go())
        roots = [x for x in sc.finished_spans() if x.kind is SpanKind.SERVER]
        assert len({r.context.trace_id for r in roots}) == 2
        assert all(r.parent is None for r in roots)
        waits = sorted((x.end_time - x.start_time) / 1e9 for x in sc.finished_spans()
                       if x.name == "queue")
        assert len(waits) == 2 and waits[0] < 0.01 and waits[1] > 0.03


async def test_error_status_and_capture_content_opt_in() -> None:
    async with SyntheticUpstream(Script(ttft=0, itl=0, tokens=3)) as up, \
            running_sidecar(up.url, capture_content=True) as sc, aiohttp.ClientSession() as s:
        async with s.post(sc.url + CHAT, json=payload()) as r:
            await r.read()
        async with s.post(sc.url + CHAT, json=payload(),
                          headers=Script(status=500).header()) as r:
            await r.read()
        await sc.settle()
        roots = [x for x in sc.finished_spans() if x.kind is SpanKind.SERVER]
        ok, failed = roots
        assert PROMPT in ok.attributes[genai.GEN_AI_INPUT_MESSAGES]
        assert ok.attributes[genai.GEN_AI_OUTPUT_MESSAGES] == "t0 t1 t2 "
        assert failed.status.status_code is StatusCode.ERROR
        assert failed.attributes["error.type"] == "500"


def test_provider_exports_only_when_configured() -> None:
    from exporter.tracing import provider_from_env

    def processors(env: dict[str, str]) -> int:
        p, exporting = provider_from_env(env)
        n = len(p._active_span_processor._span_processors)
        assert exporting == bool(n)
        p.shutdown()
        return n

    assert processors({}) == 0
    assert processors({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}) == 1
    assert processors({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
                       "OTEL_TRACES_EXPORTER": "none"}) == 0
    assert processors({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/v1/traces",
                       "OTEL_SDK_DISABLED": "true"}) == 0


async def test_without_an_exporter_no_spans_are_built_but_ids_still_flow() -> None:
    """Nothing exports spans: the sidecar builds none, yet the upstream still gets a child
    span id in the client's trace and the exemplars carry that trace id."""
    from exporter.metrics import Outcome

    async with SyntheticUpstream(Script(ttft=0, itl=0.002, tokens=3)) as up, \
            running_sidecar(up.url) as sc, aiohttp.ClientSession() as s:
        sc.sidecar.instrumentation.tracer.recording = False
        seen: list[Outcome] = spy(sc.sidecar.metrics, "record")
        headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
        async with s.post(sc.url + CHAT, json=payload(), headers=headers) as r:
            await r.read()
        async with s.post(sc.url + CHAT, json=payload()) as r:
            await r.read()
        assert sc.finished_spans() == []
        first, second = (rec.headers["traceparent"].split("-") for rec in up.requests)
        assert first[1] == CLIENT_TRACE and first[2] != CLIENT_SPAN and first[3] == "01"
        assert second[1] != CLIENT_TRACE and int(second[1], 16) and second[3] == "01"
        assert [o.trace_id for o in seen] == [CLIENT_TRACE, second[1]]
