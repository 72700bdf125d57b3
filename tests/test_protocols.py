"""Every protocol's scanner and readers on its recorded (or source-faithful) samples
(tests/data/protocols, provenance in its README), the route table, and each protocol end to
end through the real sidecar: byte identity, the api label, tokens and TTFT, cut-offs,
malformed and giant events (never a byte lost: an instrumentation error at most)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from exporter.protocols import PROTOCOLS, ROUTES, RouteTable, parse_route
from exporter.protocols.base import MAX_HELD, StreamScanner, stream_texts
from tests import harness
from tests.harness import Running, running_sidecar

DATA = Path(__file__).parent / "data" / "protocols"


# file -> (protocol, content events, input tokens, output tokens, finish reason)
STREAMS: dict[str, tuple[str, int, int | None, int | None, str | None]] = {
    "vllm_responses_stream.sse": ("openai_responses", 8, 27, 12, "length"),
    "vllm_messages_stream.sse": ("anthropic_messages", 11, 27, 12, "length"),
    "tgi_generate_stream.sse": ("tgi", 12, 6, 12, "length"),
    "sglang_generate_stream.sse": ("sglang", 8, 6, 8, "length"),
    "llamacpp_completion_stream.sse": ("llamacpp", 12, 6, 12, "length"),
    "ollama_chat_stream.ndjson": ("ollama_chat", 23, 15, 24, "stop"),
    "ollama_generate_stream.ndjson": ("ollama_generate", 15, 15, 16, "stop"),
}
# file -> (protocol, input tokens, output tokens, finish reason)
WHOLE: dict[str, tuple[str, int | None, int | None, str | None]] = {
    "vllm_responses.json": ("openai_responses", 27, 12, "length"),
    "vllm_messages.json": ("anthropic_messages", 27, 12, "length"),
    "vllm_embeddings.json": ("openai_embeddings", 11, None, None),
    "vllm_rerank.json": ("rerank", 37, None, None),
    "vllm_score.json": ("score", 37, None, None),
    "tgi_generate.json": ("tgi", None, 8, "length"),
    "ollama_chat.json": ("ollama_chat", 15, 24, "stop"),
}
CONTENT_TYPE = {"sse": "text/event-stream; charset=utf-8", "ndjson": "application/x-ndjson"}


def scan(name: str, data: bytes, cuts: list[int], strip: bool = False
         ) -> tuple[StreamScanner, int, bytes]:
    dialect = PROTOCOLS[name].dialect
    assert dialect is not None
    return harness.scan(dialect, data, cuts, strip)


@pytest.mark.parametrize("file", sorted(STREAMS))
def test_streams_whole_and_split_everywhere(file: str) -> None:
    data = (DATA / file).read_bytes()
    name, events, inp, out, finish = STREAMS[file]
    for cuts in ([], *([i] for i in range(1, len(data))), list(range(1, len(data), 7))):
        for strip in (False, True):  # no protocol but OpenAI's has an event to strip
            sc, n, fwd = scan(name, data, cuts, strip)
            assert (n, fwd) == (events, data), (file, cuts[:2], strip)
            r = sc.reply
            assert (r.input_tokens, r.output_tokens, r.finish_reason) == (inp, out, finish)


@pytest.mark.parametrize("form", [b"\r", b"\r\n"])
@pytest.mark.parametrize("file", [f for f in sorted(STREAMS) if f.endswith(".sse")])
def test_every_sse_line_end_form(file: str, form: bytes) -> None:
    data = (DATA / file).read_bytes().replace(b"\n", form)
    name, events, inp, out, finish = STREAMS[file]
    for cuts in ([], list(range(1, len(data), 5))):
        sc, n, fwd = scan(name, data, cuts)
        assert (n, fwd, sc.reply.input_tokens, sc.reply.output_tokens,
                sc.reply.finish_reason) == (events, data, inp, out, finish)


def test_ollama_engine_timings_are_its_nanosecond_durations() -> None:
    sc, _, _ = scan("ollama_chat", (DATA / "ollama_chat_stream.ndjson").read_bytes(), [])
    assert sc.reply.timings is not None
    assert sc.reply.timings.prefill == pytest.approx(0.038417233)
    assert sc.reply.timings.decode == pytest.approx(0.402511067)


def test_llamacpp_native_stream_carries_its_timings() -> None:
    sc, _, _ = scan("llamacpp", (DATA / "llamacpp_completion_stream.sse").read_bytes(), [])
    assert sc.reply.timings is not None and sc.reply.timings.prefill is not None


def test_stream_text_of_each_protocol() -> None:
    def text(file: str) -> str:
        dialect = PROTOCOLS[STREAMS[file][0]].dialect
        assert dialect is not None
        return "".join(stream_texts(dialect, (DATA / file).read_bytes()))

    assert text("vllm_responses_stream.sse") == json.loads(
        (DATA / "vllm_responses.json").read_bytes())["output"][0]["content"][0]["text"]
    assert text("vllm_messages_stream.sse") == json.loads(
        (DATA / "vllm_messages.json").read_bytes())["content"][0]["text"]
    assert text("tgi_generate_stream.sse") == " the capital of the country of France. It is " \
        "the largest"
    assert text("ollama_generate_stream.ndjson").startswith("The sky")


@pytest.mark.parametrize("file", sorted(WHOLE))
def test_complete_bodies(file: str) -> None:
    name, inp, out, finish = WHOLE[file]
    r = PROTOCOLS[name].whole(json.loads((DATA / file).read_bytes()))
    assert (r.input_tokens, r.output_tokens, r.finish_reason) == (inp, out, finish)


@pytest.mark.parametrize("file", ["vllm_responses_error.json", "vllm_messages_error.json"])
def test_error_bodies_read_as_nothing(file: str) -> None:
    name = "openai_responses" if "responses" in file else "anthropic_messages"
    r = PROTOCOLS[name].whole(json.loads((DATA / file).read_bytes()))
    assert (r.input_tokens, r.output_tokens) == (None, None)


# --- malformed, giant and error events ----------------------------------------------------

HOSTILE_EVENTS = {
    "sse": [b'data: {"type":"response.completed","response":[1,2]}\n\n',
            b'data: {"type":"message_delta","usage":"many","delta":7}\n\n',
            b'data: {"details":{"generated_tokens":-4,"finish_reason":9}}\n\n',
            b'data: {"stop":true,"tokens_predicted":"12","timings":[]}\n\n',
            b'data: {"meta_info":{"finish_reason":{"type":null}},"error":{}}\n\n',
            b'data: {"type":"error", broken json\n\n',
            b'data: ' + b'[' * 100_000 + b'\n\n'],
    "ndjson": [b'{"done":true,"eval_count":true,"prompt_eval_duration":"x"}\n',
               b'{"done":true, nope\n', b'[' * 100_000 + b'\n', b'{"error":"boom"}\n'],
}


@pytest.mark.parametrize("name", sorted(n for n, p in PROTOCOLS.items() if p.dialect))
def test_malformed_events_cost_no_byte(name: str) -> None:
    dialect = PROTOCOLS[name].dialect
    assert dialect is not None
    for event in HOSTILE_EVENTS[dialect.framing.name]:
        sc = StreamScanner(dialect)
        _, out = sc.feed(event)
        _, tail = sc.flush()
        assert out + tail == event
        r = sc.reply
        for v in (r.input_tokens, r.output_tokens):
            assert v is None or (isinstance(v, int) and v >= 0)


@pytest.mark.parametrize("name", sorted(n for n, p in PROTOCOLS.items() if p.dialect))
def test_a_giant_event_is_forwarded_unscanned_and_memory_stays_bounded(name: str) -> None:
    dialect = PROTOCOLS[name].dialect
    assert dialect is not None
    errors: list[str] = []
    sc = StreamScanner(dialect, on_error=errors.append)
    piece = b"data: " + b"x" * 60_000 if dialect.framing.name == "sse" else b"x" * 60_000
    sent = out = b""
    for _ in range(40):  # 2.4 MB without an event end
        sent += piece
        out += sc.feed(piece)[1]
        assert len(sc._held) <= MAX_HELD + len(piece)
    end = b"\n\n" if dialect.framing.name == "sse" else b"\n"
    _, last = sc.feed(end)
    out += last + sc.flush()[1]
    assert out == sent + end and len(errors) == 1


# --- the route table ------------------------------------------------------------------------

def test_default_routes_name_known_protocols_and_paths() -> None:
    table = RouteTable()
    for pattern, name in ROUTES:
        path = pattern.replace("**", "a/b").replace("*", "dep1")
        assert table.match("POST", path) is PROTOCOLS[name], pattern
        assert table.match("GET", path) is None
    assert table.match("POST", "/v1/models") is None
    assert table.match("POST", "/v1/chat/completions/") is PROTOCOLS["openai_chat"]
    assert table.match("POST", "/openai/deployments/a/b/chat/completions") is None


def test_user_routes_come_first() -> None:
    table = RouteTable([parse_route("/llm/**=openai_chat"),
                        parse_route("/v1/completions=llamacpp")])
    assert table.match("POST", "/llm/v1/chat/completions") is PROTOCOLS["openai_chat"]
    assert table.match("POST", "/v1/completions") is PROTOCOLS["llamacpp"]
    assert table.match("POST", "/v1/chat/completions") is PROTOCOLS["openai_chat"]


@pytest.mark.parametrize("bad", ["v1/x=openai_chat", "/x=nope", "/x", "=openai_chat"])
def test_bad_routes_are_refused_with_the_reason(bad: str) -> None:
    with pytest.raises(ValueError, match=r"PATTERN=PROTOCOL|unknown protocol"):
        parse_route(bad)


def test_generate_is_tgi_or_sglang_by_body() -> None:
    pick = PROTOCOLS["generate"].pick
    assert pick is not None
    assert pick({"inputs": "x"}) is PROTOCOLS["tgi"]
    assert pick({"text": "x"}) is PROTOCOLS["sglang"]


def test_batch_sizes() -> None:
    def inputs(name: str, body: dict[str, Any]) -> int | None:
        return PROTOCOLS[name].request(body, "/").inputs

    assert inputs("openai_embeddings", {"input": ["a", "b", "c"]}) == 3
    assert inputs("openai_embeddings", {"input": "a"}) == 1
    assert inputs("openai_embeddings", {"input": [1, 2, 3]}) == 1
    assert inputs("openai_embeddings", {"input": [[1], [2]]}) == 2
    assert inputs("rerank", {"query": "q", "documents": ["a", "b"]}) == 2
    assert inputs("score", {"text_1": "q", "text_2": ["a", "b", "c"]}) == 3


# --- end to end through the sidecar ------------------------------------------------------

@asynccontextmanager
async def replay(data: bytes, content_type: str, *, seed: int = 1, cut: int | None = None
                 ) -> AsyncIterator[str]:
    """An upstream answering any POST with ``data`` in random pieces (cut off after ``cut``
    bytes: the connection dropped mid-stream)."""
    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        await resp.prepare(request)
        rnd, i = random.Random(seed), 0
        end = len(data) if cut is None else cut
        while i < end:
            n = min(rnd.randint(1, 200), end - i)
            await resp.write(data[i:i + n])
            await asyncio.sleep(0.001)
            i += n
        if cut is not None:
            assert request.transport is not None
            request.transport.abort()
            return resp
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def _path(name: str) -> str:
    if name == "sglang":
        return "/generate"  # shared with TGI: picked by the body (no "inputs": SGLang)
    return next(p.replace("*", "d") for p, n in ROUTES if n == name)


def requests(sc: Running, **labels: str) -> float:
    return sum(s.value for m in sc.collect() if m.name == "llm_exporter_requests"
               for s in m.samples if s.name.endswith("_total")
               and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.mark.parametrize("file", sorted(STREAMS))
async def test_each_protocol_relayed_identically_and_measured(file: str) -> None:
    data = (DATA / file).read_bytes()
    name, _, inp, out, finish = STREAMS[file]
    dialect = PROTOCOLS[name].dialect
    assert dialect is not None
    body = {"model": "m", "stream": True}
    async with replay(data, CONTENT_TYPE[dialect.framing.name], seed=len(file)) as url, \
            running_sidecar(url) as sc, aiohttp.ClientSession() as s:
        async with s.post(sc.url + _path(name), json=body) as r:
            assert await r.read() == data
        assert requests(sc, api=name, operation=PROTOCOLS[name].operation,
                        finish_reason=finish or "unknown", status_class="2xx") == 1
        assert sc.value("llm_exporter_output_tokens_total", {"model": "m"}) == out
        assert sc.value("llm_exporter_input_tokens_total", {"model": "m"}) == inp
        assert sc.value("gen_ai_server_time_to_first_token_seconds_count",
                        {"model": "m", "operation": PROTOCOLS[name].operation}) == 1
        span = next(x for x in sc.finished_spans() if x.parent is None)
        assert span.attributes is not None and span.attributes["llm_exporter.api"] == name


@pytest.mark.parametrize("file", sorted(STREAMS))
async def test_a_cut_off_stream_reaches_the_client_as_cut_and_is_an_error(file: str) -> None:
    data = (DATA / file).read_bytes()
    name = STREAMS[file][0]
    dialect = PROTOCOLS[name].dialect
    assert dialect is not None
    async with replay(data, CONTENT_TYPE[dialect.framing.name], cut=len(data) // 2) as url, \
            running_sidecar(url) as sc, aiohttp.ClientSession() as s:
        got = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async with s.post(sc.url + _path(name), json={"model": "m", "stream": True}) as r:
                async for chunk in r.content.iter_any():
                    got += chunk
        assert got == data[:len(got)] and len(got) <= len(data) // 2
        assert requests(sc, api=name, finish_reason="error") == 1


@pytest.mark.parametrize("file", sorted(WHOLE))
async def test_complete_responses_through_the_sidecar(file: str) -> None:
    data = (DATA / file).read_bytes()
    name, inp, out, finish = WHOLE[file]
    body: dict[str, Any] = {"model": "m", "input": ["a", "b", "c"], "documents": ["a", "b"],
                            "text_1": "q", "text_2": ["a", "b"], "inputs": "x"}
    if name in ("ollama_chat",):
        body["stream"] = False
    async with replay(data, "application/json") as url, running_sidecar(url) as sc, \
            aiohttp.ClientSession() as s:
        async with s.post(sc.url + _path(name), json=body) as r:
            assert await r.read() == data
        assert requests(sc, api=name, finish_reason=finish or "unknown") == 1
        assert sc.value("llm_exporter_input_tokens_total", {"model": "m"}) == (inp or 0)
        assert sc.value("llm_exporter_output_tokens_total", {"model": "m"}) == (out or 0)
        op = PROTOCOLS[name].operation
        if op == "embeddings":
            assert sc.value("llm_exporter_request_inputs_count",
                            {"model": "m", "operation": op}) == 1
            assert sc.value("llm_exporter_request_inputs_sum",
                            {"model": "m", "operation": op}) in (2, 3)


async def test_unmatched_requests_are_counted_without_their_path() -> None:
    async with replay(b'{"data":[]}', "application/json") as url, running_sidecar(url) as sc, \
            aiohttp.ClientSession() as s:
        for method, path in (("GET", "/v1/models"), ("GET", "/health"),
                             ("POST", "/custom/secret-path"), ("PROPFIND", "/dav")):
            async with s.request(method, sc.url + path, data=b"{}") as r:
                await r.read()
        assert requests(sc) == 0
        series = {(x.labels["method"], x.labels["status_class"]): x.value
                  for m in sc.collect() if m.name == "llm_exporter_unmatched_requests"
                  for x in m.samples if x.name.endswith("_total")}
        assert series == {("GET", "2xx"): 2, ("POST", "2xx"): 1, ("other", "2xx"): 1}
        assert sc.value("llm_exporter_unmatched_request_duration_seconds_count",
                        {"method": "GET"}) == 2
        assert "secret-path" not in sc.scrape()


async def test_a_prefixed_route_is_measured_when_configured() -> None:
    data = (DATA / "vllm_messages_stream.sse").read_bytes()
    async with replay(data, "text/event-stream") as url, \
            running_sidecar(url, route=("/llm/**=anthropic_messages",)) as sc, \
            aiohttp.ClientSession() as s:
        async with s.post(sc.url + "/llm/v1/messages", json={"model": "m", "stream": True}
                          ) as r:
            assert await r.read() == data
        assert requests(sc, api="anthropic_messages") == 1
        assert sc.value("llm_exporter_output_tokens_total", {"model": "m"}) == 12


# An error reported inside a 200 stream, in each protocol's own shape (the first lines of
# each file's normal stream, then the error event the server sends when generation fails).
ERROR_EVENTS = {
    "vllm_responses_stream.sse": b'event: error\ndata: {"type":"error","code":"server_error",'
                                 b'"message":"engine died","param":null,"sequence_number":9}\n\n',
    "vllm_messages_stream.sse": b'event: error\ndata: {"type":"error","error":{"type":'
                                b'"overloaded_error","message":"Overloaded"}}\n\n',
    "tgi_generate_stream.sse": b'data:{"error":"Request failed during generation: out of '
                               b'memory","error_type":"generation"}\n\n',
    "llamacpp_completion_stream.sse": b'data: {"error":{"code":500,"message":"slot died",'
                                      b'"type":"server_error"}}\n\n',
    "sglang_generate_stream.sse": b'data: {"error":{"message":"aborted"}}\n\ndata: [DONE]\n\n',
    "ollama_chat_stream.ndjson": b'{"error":"model runner has unexpectedly stopped"}\n',
    "ollama_generate_stream.ndjson": b'{"error":"model runner has unexpectedly stopped"}\n',
}


@pytest.mark.parametrize("file", sorted(ERROR_EVENTS))
async def test_an_error_event_mid_stream_is_relayed_and_finishes_as_error(file: str) -> None:
    sep = b"\n" if file.endswith(".ndjson") else b"\n\n"
    events = (DATA / file).read_bytes().split(sep)
    data = sep.join(events[:3]) + sep + ERROR_EVENTS[file]
    name = STREAMS[file][0]
    dialect = PROTOCOLS[name].dialect
    assert dialect is not None
    async with replay(data, CONTENT_TYPE[dialect.framing.name]) as url, \
            running_sidecar(url) as sc, aiohttp.ClientSession() as s:
        async with s.post(sc.url + _path(name), json={"model": "m", "stream": True}) as r:
            assert await r.read() == data
        assert requests(sc, api=name, status_class="2xx", finish_reason="error") == 1
