"""Hostile clients and broken upstreams, over real sockets with raw bytes: request smuggling
through a compressed body, decompression bombs, short bodies, HTTP/1.0 keep-alive streams, an
endless upstream head, bodies the measurement cannot parse, secrets and text in logs, error
bodies and spans. Each case: the relay stays exact, nothing leaks, the request is counted."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import psutil
import pytest

from tests.engine_procs import free_port
from tests.harness import Running, running_sidecar
from tests.upstream import Script, SyntheticUpstream

CHAT = "/v1/chat/completions"


# --- a raw HTTP/1.1 upstream: parses exactly what it is sent, as a simple server would --------

@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class RawUpstream:
    """Keep-alive HTTP/1.1 by Content-Length, nothing else: every request it parses is
    recorded and echoed. Bytes past a body are read as the next request, as any server does,
    which is what makes a body longer than its Content-Length a smuggled request."""

    seen: list[Seen] = field(default_factory=list)
    url: str = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, ValueError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (ln.partition(":") for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.seen.append(Seen(method, path, headers, body))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                             b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
                await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    up = RawUpstream()
    server = await asyncio.start_server(up._serve, "127.0.0.1", 0)
    up.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server:
        yield up


def requests_total(sc: Running) -> float:
    return sum(s.value for m in sc.collect() if m.name == "llm_exporter_requests"
               for s in m.samples if s.name == "llm_exporter_requests_total")


# --- request bodies are relayed untouched ------------------------------------------------------

@pytest.mark.parametrize("path", ["/upload", CHAT])
async def test_a_gzip_body_smuggles_nothing_and_the_next_client_is_unharmed(path: str) -> None:
    """The body inflates to more than its Content-Length, with a request hidden after the
    first body's worth: relayed compressed, it is one request; the next client's request (its
    Authorization and prompt) reaches the upstream as its own, and it gets its own answer."""
    hidden = b"\r\n\r\nPOST /smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n"
    payload = os.urandom(6000) + hidden  # random: the compressed body stays over parse_limit
    gz = gzip.compress(payload)
    async with raw_upstream() as up, running_sidecar(up.url, parse_limit=1024) as sc, \
            aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.post(sc.url + path, data=gz, headers={
                "Content-Encoding": "gzip", "Content-Type": "application/json"}) as r:
            assert await r.read() == gz
        victim = b'{"model":"m","messages":[{"role":"user","content":"my secret prompt"}]}'
        async with s.post(sc.url + "/victim", data=victim,
                          headers={"Authorization": "Bearer victim-key"}) as r:
            assert await r.read() == victim
    assert [(x.path, x.body) for x in up.seen] == [(path, gz), ("/victim", victim)]
    assert up.seen[0].headers["content-encoding"] == "gzip"
    assert up.seen[1].headers["authorization"] == "Bearer victim-key"


async def test_a_gzip_bomb_is_relayed_compressed_not_inflated() -> None:
    bomb = gzip.compress(b"\0" * 200_000_000, compresslevel=9)  # ~200 KB -> 200 MB
    proc = psutil.Process()
    async with raw_upstream() as up, running_sidecar(up.url) as sc, \
            aiohttp.ClientSession(auto_decompress=False) as s:
        before = proc.memory_info().rss
        async with s.post(sc.url + CHAT, data=bomb, headers={
                "Content-Encoding": "gzip", "Content-Type": "application/json"}) as r:
            assert r.status == 200 and await r.read() == bomb
        grown = proc.memory_info().rss - before
        assert requests_total(sc) == 1  # not parsed, still counted
    assert up.seen[0].body == bomb
    assert grown < 50 * 2**20, f"RSS grew {grown / 2**20:.0f} MiB"


async def test_a_body_shorter_than_declared_closes_that_upstream_connection() -> None:
    async with raw_upstream() as up, running_sidecar(up.url, parse_limit=1024) as sc:
        host, port = sc.url.removeprefix("http://").split(":")
        _reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
                     + b"x" * 50_000)
        await writer.drain()
        writer.close()  # gone with half its body
        await asyncio.sleep(0.3)
        async with aiohttp.ClientSession() as s, s.post(sc.url + "/next", data=b"ok") as r:
            assert await r.read() == b"ok"
        # the half body never completed a request upstream; the next one arrived intact
        assert [x.path for x in up.seen] == ["/next"]


# --- responses ----------------------------------------------------------------------------------

async def test_http10_keep_alive_client_gets_its_stream_closed() -> None:
    body = json.dumps({"model": "m", "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    async with SyntheticUpstream(Script(ttft=0, itl=0, tokens=3)) as up, \
            running_sidecar(up.url) as sc:
        host, port = sc.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST %b HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                     % (CHAT.encode(), len(body), body))
        raw = await asyncio.wait_for(reader.read(), timeout=5)  # returns only at EOF
        writer.close()
    head, _, stream = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
    assert stream.endswith(b"data: [DONE]\n\n") and stream.count(b"data: [DONE]") == 1


async def test_an_endless_upstream_head_fails_fast_with_bounded_memory() -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(2000):  # up to ~130 MB if nobody stops it
                writer.write(b"a" * 65536)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(endless, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server, running_sidecar(url) as sc, aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        async with s.post(sc.url + CHAT, json={"model": "m", "messages": []}) as r:
            assert r.status == 502
        assert time.monotonic() - t0 < 5


# --- bodies the measurement cannot parse are relayed and counted --------------------------------

async def test_deeply_nested_json_reaches_the_upstream_and_is_counted() -> None:
    body = b'{"model":"m","messages":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    async with raw_upstream() as up, running_sidecar(up.url) as sc, \
            aiohttp.ClientSession() as s:
        async with s.post(sc.url + CHAT, data=body,
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200 and await r.read() == body
        assert requests_total(sc) == 1
    assert up.seen[0].body == body


async def test_a_lone_surrogate_is_relayed_as_sent_not_a_500() -> None:
    body = (b'{"model":"m","stream":true,"stream_options":{},'
            b'"messages":[{"role":"user","content":"\\ud800"}]}')
    async with SyntheticUpstream(Script(ttft=0, itl=0, tokens=2)) as up, \
            running_sidecar(up.url) as sc, aiohttp.ClientSession() as s:
        sc.sidecar.proxy.usage_mode = "inject"
        async with s.post(sc.url + CHAT, data=body,
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200 and (await r.read()).endswith(b"data: [DONE]\n\n")
        assert up.requests[-1].body == body
        assert requests_total(sc) == 1


async def test_one_clients_utf16_body_does_not_switch_usage_off_for_everyone() -> None:
    msg = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "héllo"}]}
    async with raw_upstream() as up, running_sidecar(up.url) as sc, \
            aiohttp.ClientSession() as s:
        sc.sidecar.proxy.usage_mode = "inject"
        utf16 = json.dumps(msg).encode("utf-16")
        async with s.post(sc.url + CHAT, data=utf16,
                          headers={"Content-Type": "application/json; charset=utf-16"}) as r:
            assert await r.read() == utf16  # not spliced into: relayed as sent
        async with s.post(sc.url + CHAT, json=msg) as r:
            await r.read()
        assert b'"stream_options":{"include_usage":true}' in up.seen[-1].body
        assert sc.sidecar.proxy.usage_mode == "inject"


@pytest.mark.parametrize("value", [1, "true", 0, "yes"])
async def test_include_usage_of_another_type_is_the_clients_own(value: object) -> None:
    """Not a plain true or false: relayed as sent, and whatever the upstream answers (usage
    chunk or not) reaches the client; nothing is stripped."""
    body = json.dumps({"model": "m", "stream": True, "stream_options": {"include_usage": value},
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    async with SyntheticUpstream(Script(ttft=0, itl=0, tokens=2, usage="always")) as up, \
            running_sidecar(up.url) as sc, aiohttp.ClientSession() as s:
        sc.sidecar.proxy.usage_mode = "inject"
        async with s.post(sc.url + CHAT, data=body,
                          headers={"Content-Type": "application/json"}) as r:
            assert b'"usage"' in await r.read()
        assert up.requests[-1].body == body


async def test_usage_unasked_is_learnt_per_model() -> None:
    """Model a's server sends usage unasked, model b's does not: a's streams are relayed as
    they are (usage included, nothing asked or stripped), b's are asked and stripped."""
    async with SyntheticUpstream(Script(ttft=0, itl=0, tokens=2)) as up, \
            running_sidecar(up.url) as sc, aiohttp.ClientSession() as s:
        async def stream(model: str) -> bytes:
            body = {"model": model, "stream": True, "messages": []}
            headers = Script(ttft=0, itl=0, tokens=2, usage="always" if model == "a"
                             else "auto").header()
            async with s.post(sc.url + CHAT, json=body, headers=headers) as r:
                return await r.read()

        for _ in range(2):
            assert b'"usage"' in await stream("a")
            assert b'"usage"' not in await stream("b")
        sent = [json.loads(r.body) for r in up.requests]
        assert [("stream_options" in b, b["model"]) for b in sent] == [
            (False, "a"), (False, "b"), (False, "a"), (True, "b")]
        assert sc.value("llm_exporter_output_tokens_total", {"model": "b"}) == 4
        assert sc.value("llm_exporter_token_count_source_total",  # b's probe: chunks
                        {"token_type": "output", "source": "usage"}) == 3


# --- secrets and text stay out of logs, error bodies and spans ----------------------------------

async def test_a_smuggled_body_is_not_quoted_in_the_log(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    async with raw_upstream() as up, running_sidecar(up.url) as sc:
        host, port = sc.url.removeprefix("http://").split(":")
        with caplog.at_level(logging.DEBUG):
            for _ in range(3):
                reader, writer = await asyncio.open_connection(host, int(port))
                # 2 bytes declared, the rest read as a malformed second request
                writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n"
                             b"{}SECRET PROMPT TEXT \x00\x01 not http\r\n\r\n")
                await writer.drain()
                with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
                    await asyncio.wait_for(reader.read(), timeout=2)
                writer.close()
    assert "SECRET PROMPT" not in caplog.text
    assert "Traceback" not in caplog.text
    http = [r for r in caplog.records if r.name == "exporter.http"]
    assert len(http) <= 1, "throttled: one line per 10 s"


async def test_upstream_credentials_never_reach_clients_or_logs(
        caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there once closed
    with caplog.at_level(logging.DEBUG):
        async with running_sidecar(f"http://admin:hunter2@127.0.0.1:{port}") as sc, \
                aiohttp.ClientSession() as s:
            async with s.post(sc.url + CHAT, json={"model": "m", "messages": []}) as r:
                assert r.status == 502
                text = await r.text()
            async with s.get(sc.url + "/v1/models") as r:
                text += await r.text()
    assert "hunter2" not in text and "admin" not in text
    assert "hunter2" not in caplog.text
    assert f"127.0.0.1:{port}" in text  # still says which upstream


async def test_a_lone_surrogate_model_cannot_drop_the_span_batch() -> None:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    body = b'{"model":"\\ud800evil","stream":false,"messages":[]}'
    async with SyntheticUpstream(Script(ttft=0, itl=0, tokens=2)) as up, \
            running_sidecar(up.url) as sc, aiohttp.ClientSession() as s:
        for data in (body, b'{"model":"good","stream":false,"messages":[]}'):
            async with s.post(sc.url + CHAT, data=data,
                              headers={"Content-Type": "application/json"}) as r:
                await r.read()
        await sc.settle()
        spans = sc.finished_spans()
    assert len([x for x in spans if x.parent is None]) == 2
    assert encode_spans(spans).SerializeToString()  # the OTLP exporter's own encoding


async def test_an_absolute_form_target_goes_upstream_as_a_path() -> None:
    async with raw_upstream() as up, running_sidecar(up.url) as sc:
        host, port = sc.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST http://elsewhere.example:81/v1/x?a=1 HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
        raw = await asyncio.wait_for(reader.read(), timeout=5)
        writer.close()
    assert raw.startswith(b"HTTP/1.1 200")
    assert [x.path for x in up.seen] == ["/v1/x?a=1"]


def test_the_engine_scraper_does_not_follow_redirects() -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from exporter.collectors.engine_metrics import EngineScraper

    paths: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            paths.append(self.path)
            self.send_response(302)
            self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        sig = EngineScraper(lambda: url + "/metrics", lambda: "").signals()
    finally:
        srv.shutdown()
        srv.server_close()
    assert not sig.up
    assert paths == ["/metrics"]


# --- protocol corners: Expect, header bytes, HEAD, 101, X-Forwarded-For ---------------------------

async def _exchange(sc: Running, data: bytes, *, until: bytes | None = None,
                    timeout: float = 5) -> bytes:
    """Send raw bytes to the proxy port; read until ``until`` is seen, or EOF."""
    host, port = sc.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    out = b""
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(timeout):
            while until is None or until not in out:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                out += chunk
    writer.close()
    return out


async def test_expect_100_continue_is_answered_and_not_forwarded() -> None:
    async with raw_upstream() as up, running_sidecar(up.url) as sc:
        host, port = sc.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=2)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"{}")
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n{}"), timeout=5)
        writer.close()
        assert final.startswith(b"HTTP/1.1 200")
        assert requests_total(sc) == 1
        unknown = await _exchange(sc, b"POST /x HTTP/1.1\r\nHost: x\r\nExpect: teapot\r\n"
                                  b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        assert unknown.startswith(b"HTTP/1.1 417")
    assert [x.path for x in up.seen] == ["/v1/chat/completions"]
    assert "expect" not in up.seen[0].headers


async def test_header_bytes_that_are_not_utf8_go_through_unchanged() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        got.append(head)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Up: r\xe9sum\xe9 \xff\r\nContent-Length: 2\r\n"
                     b"Connection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    got: list[bytes] = []
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server, running_sidecar(url) as sc:
        for path in (b"/v1/models", CHAT.encode()):
            raw = await _exchange(sc, b"POST %b HTTP/1.1\r\nHost: x\r\nX-Bin: caf\xe9\xff\r\n"
                                  b"Content-Length: 2\r\nConnection: close\r\n\r\n{}" % path)
            assert b"\r\nX-Up: r\xe9sum\xe9 \xff\r\n" in raw and raw.endswith(b"\r\n\r\nok")
    assert all(b"\r\nX-Bin: caf\xe9\xff\r\n" in head for head in got) and len(got) == 2


async def test_head_answers_end_at_their_headers() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = b"" if head.startswith(b"HEAD") else b"x" * 1000
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + body)
                await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server, running_sidecar(url) as sc, aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.head(sc.url + "/file") as r:
                assert r.status == 200 and r.headers["Content-Length"] == "1000"
                assert await r.read() == b""
            async with s.get(sc.url + "/file") as r:
                assert await r.read() == b"x" * 1000


async def test_an_upstream_101_is_a_502_without_a_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\n\r\n\x81\x05hello")
        await writer.drain()
        await asyncio.sleep(1)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    with caplog.at_level(logging.DEBUG):
        async with server, running_sidecar(url) as sc, aiohttp.ClientSession() as s:
            for path in ("/ws", CHAT):
                async with s.post(sc.url + path, json={"model": "m", "messages": []},
                                  headers={"Upgrade": "websocket",
                                           "Connection": "Upgrade"}) as r:
                    assert r.status == 502
                    assert (await r.json())["error"]["type"] == "upstream_protocol"
            assert sc.value("llm_exporter_errors_total", {"type": "upstream_protocol"}) == 2
            assert requests_total(sc) == 1  # the LLM route's, counted as a 5xx
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize(("mode", "expected"), [
    ("append", "203.0.113.7, 127.0.0.1"),
    ("replace", "127.0.0.1"),
    ("pass", "203.0.113.7"),
])
async def test_x_forwarded_for_gets_the_peer_as_configured(mode: str, expected: str) -> None:
    async with raw_upstream() as up, running_sidecar(up.url, forwarded_for=mode) as sc, \
            aiohttp.ClientSession() as s:
        for path in ("/other", CHAT):
            async with s.post(sc.url + path, data=b"{}",
                              headers={"X-Forwarded-For": "203.0.113.7"}) as r:
                await r.read()
        async with s.post(sc.url + "/none", data=b"{}") as r:
            await r.read()
    assert [x.headers["x-forwarded-for"] for x in up.seen[:2]] == [expected, expected]
    assert up.seen[2].headers.get("x-forwarded-for") == (None if mode == "pass"
                                                         else "127.0.0.1")


# --- slow clients: a bound on the proxy port and the metrics port -----------------------------

async def test_a_client_slow_over_its_headers_is_closed() -> None:
    async with raw_upstream() as up, running_sidecar(up.url, client_header_timeout=0.5) as sc:
        host, port = sc.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        t0 = time.monotonic()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        with contextlib.suppress(ConnectionError):
            for _ in range(20):  # one header line every 0.2 s, never the blank line
                await asyncio.sleep(0.2)
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
        try:
            rest = await asyncio.wait_for(reader.read(), timeout=2)
        except ConnectionError:  # reset while we wrote: closed all the same
            rest = b""
        assert rest == b""  # closed, unanswered
        assert time.monotonic() - t0 < 2
        writer.close()
        assert sc.value("llm_exporter_errors_total", {"type": "client_timeout"}) == 1
        # a prompt client on another connection is unaffected, its body as slow as it likes
        async with aiohttp.ClientSession() as s:
            async def slow_body() -> AsyncIterator[bytes]:
                yield b"{"
                await asyncio.sleep(0.8)
                yield b"}"
            async with s.post(sc.url + "/ok", data=slow_body()) as r:
                assert await r.read() == b"{}"
    assert [x.path for x in up.seen] == ["/ok"]


async def test_a_client_slow_over_its_headers_on_the_metrics_port_is_closed_and_counted(
        ) -> None:
    async with raw_upstream() as up, running_sidecar(up.url, client_header_timeout=0.3) as sc:
        host, port = sc.metrics_url.removeprefix("http://").split("/")[0].split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        await writer.drain()
        try:
            rest = await asyncio.wait_for(reader.read(), timeout=2)
        except ConnectionError:
            rest = b""
        writer.close()
        assert rest == b""
        assert sc.value("llm_exporter_errors_total", {"type": "client_timeout"}) == 1
    assert up.seen == []


def test_idle_connections_to_the_metrics_port_cost_no_threads() -> None:
    import threading
    import urllib.request

    async def main() -> None:
        async with raw_upstream() as up, running_sidecar(up.url,
                                                         client_header_timeout=30) as sc:
            host, port = sc.metrics_url.removeprefix("http://").split("/")[0].split(":")
            threads = threading.active_count()
            socks = []
            for _ in range(200):  # slowloris: connect, send half a line, wait
                sk = socket.create_connection((host, int(port)))
                sk.sendall(b"GET /metr")
                socks.append(sk)
            await asyncio.sleep(0.2)
            assert threading.active_count() == threads

            def scrape() -> bytes:
                with urllib.request.urlopen(sc.metrics_url, timeout=5) as r:
                    return bytes(r.read())
            body = await asyncio.get_running_loop().run_in_executor(None, scrape)
            assert b"llm_exporter_build_info" in body
            for sk in socks:
                sk.close()
    asyncio.run(main())
