"""Transparency: what the client gets through the sidecar is what the upstream sent, byte for
byte, for streams, bodies, errors and broken streams; failures map to 502/504; nothing leaks."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp import web

from tests.harness import running_sidecar
from tests.test_sse import EXPECTED as RECORDED
from tests.upstream import Script, SyntheticUpstream, clock

STREAMS = Path(__file__).parent / "data" / "streams"
CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
SKIP_HEADERS = {"date", "transfer-encoding", "connection", "keep-alive"}


async def fetch(session: aiohttp.ClientSession, method: str, url: str, **kw: Any
                ) -> tuple[int, list[tuple[str, str]], bytes, bool]:
    """Status, end-to-end headers (in order), body bytes, and whether the body was cut off."""
    cut = False
    async with session.request(method, url, **kw) as r:
        body = b""
        try:
            async for chunk in r.content.iter_any():
                body += chunk
        except aiohttp.ClientPayloadError:
            cut = True
        headers = [(k.decode(), v.decode()) for k, v in r.raw_headers
                   if k.decode().lower() not in SKIP_HEADERS]
        return r.status, headers, body, cut


def chat(stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "stream": stream,
            "messages": [{"role": "user", "content": "one two three"}], **extra}


CORPUS: list[tuple[str, str, Any, Script]] = [
    ("chat stream", CHAT, chat(), Script(ttft=0.01, itl=0.002, tokens=12)),
    ("chat stream, client asked usage", CHAT,
     chat(stream_options={"include_usage": True}), Script(ttft=0.01, itl=0.001, tokens=5)),
    ("chat stream, 3 tokens per chunk", CHAT, chat(),
     Script(ttft=0.01, itl=0.001, tokens=10, tokens_per_chunk=3)),
    ("chat stream, usage always", CHAT, chat(), Script(ttft=0, itl=0, tokens=4, usage="always")),
    ("chat stream, no role chunk", CHAT, chat(), Script(ttft=0, itl=0, tokens=3, role_chunk=False)),
    ("text stream", TEXT, {"model": "m", "prompt": "a b", "stream": True},
     Script(ttft=0, itl=0.001, tokens=6)),
    ("chat non-stream", CHAT, chat(stream=False), Script(tokens=9)),
    ("text non-stream, no usage", TEXT, {"model": "m", "prompt": "x"},
     Script(tokens=3, usage="never")),
    ("400 error", CHAT, chat(), Script(status=400)),
    ("429 error", CHAT, chat(stream=False), Script(status=429)),
    ("500 error", CHAT, chat(), Script(status=500)),
    ("503 custom body", CHAT, chat(), Script(status=503, error_body=b"overloaded\n",
                                             content_type="text/plain")),
    ("non-JSON response", CHAT, chat(stream=False),
     Script(raw_body=b"\x00\xffnot json at all", content_type="application/octet-stream")),
    ("cut-off stream", CHAT, chat(), Script(ttft=0, itl=0.001, tokens=20, cut_after=5)),
    ("length finish", CHAT, chat(), Script(ttft=0, itl=0, tokens=4, finish_reason="length")),
]


@pytest.mark.parametrize("case", CORPUS, ids=[c[0] for c in CORPUS])
async def test_byte_identical_relay(case: tuple[str, str, Any, Script]) -> None:
    _, path, body, script = case
    async with SyntheticUpstream(script) as up, running_sidecar(up.url) as sc, \
            aiohttp.ClientSession(auto_decompress=False) as s:
        direct = await fetch(s, "POST", up.url + path, json=body)
        # Twice: the first stream probes whether usage comes unasked, the second may ask.
        for _ in range(2):
            proxied = await fetch(s, "POST", sc.url + path, json=body)
            assert proxied[0] == direct[0]
            assert proxied[1] == direct[1]
            assert hashlib.sha256(proxied[2]).hexdigest() == \
                hashlib.sha256(direct[2]).hexdigest()
            assert proxied[3] == direct[3]
        # The upstream saw the client's own bytes unless the sidecar added include_usage.
        sent = [json.loads(r.body) for r in up.requests]
        assert sent[0] == sent[1] == body
        if body.get("stream") and "stream_options" not in body and script.status == 200 \
                and script.usage != "always" and script.cut_after is None:
            assert sent[2]["stream_options"] == {"include_usage": True}
        else:
            assert sent[2] == body


class Replay:
    """An upstream that sends a recorded stream in random pieces (events split anywhere)."""

    def __init__(self, data: bytes, seed: int) -> None:
        self.data, self.seed = data, seed

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "X-Upstream": "replay"})
        await resp.prepare(request)
        rnd = random.Random(self.seed)
        i = 0
        while i < len(self.data):
            n = rnd.randint(1, 90)
            await resp.write(self.data[i:i + n])
            await asyncio.sleep(0.001)
            i += n
        await resp.write_eof()
        return resp


@pytest.mark.parametrize("name", sorted(p.name for p in STREAMS.glob("*.sse")))
async def test_recorded_streams_relay_identically_and_are_measured(name: str) -> None:
    data = (STREAMS / name).read_bytes()
    app = web.Application()
    app.router.add_post(CHAT, Replay(data, seed=len(name)).handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with running_sidecar(f"http://127.0.0.1:{port}") as sc, \
                aiohttp.ClientSession() as s:
            body = chat(stream_options={"include_usage": True})
            status, headers, got, cut = await fetch(s, "POST", sc.url + CHAT, json=body)
            assert (status, got, cut) == (200, data, False)
            assert ("X-Upstream", "replay") in headers
            assert sc.value("llm_exporter_requests_total", {
                "model": "m", "operation": "chat",
                "api": "openai_chat", "stream": "true", "status_class": "2xx",
                "finish_reason": RECORDED[name][1]}) == 1
    finally:
        await runner.cleanup()


async def test_all_methods_and_paths_pass_through() -> None:
    async with SyntheticUpstream() as up, running_sidecar(up.url) as sc, \
            aiohttp.ClientSession() as s:
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            payload = b"\x01\x02 raw body" if method != "GET" else b""
            async with s.request(method, sc.url + "/echo/x?a=1&b=%20", data=payload,
                                 headers={"X-Custom": "v", "Content-Type": "app/raw"}) as r:
                assert r.status == 200
                assert await r.read() == payload
                assert r.headers["x-echo-method"] == method
                assert r.headers["x-echo-path"] == "/echo/x?a=1&b=%20"
        async with s.get(sc.url + "/v1/models") as r:
            assert r.status == 200 and (await r.json())["data"]
        # Not an LLM route: nothing measured.
        assert sc.value("llm_exporter_requests_total", {
            "model": "m", "operation": "chat",
                "api": "openai_chat", "stream": "false", "status_class": "2xx",
            "finish_reason": "stop"}) == 0


async def test_big_bodies_stream_through_both_ways() -> None:
    big = bytes(range(256)) * (6 * 4096)  # 6 MiB, above the 4 MiB parse limit
    async with SyntheticUpstream() as up, running_sidecar(up.url) as sc, \
            aiohttp.ClientSession(auto_decompress=False) as s:
        direct = await fetch(s, "GET", up.url + "/big?size=9000000")
        proxied = await fetch(s, "GET", sc.url + "/big?size=9000000")
        assert proxied[2] == direct[2] and len(proxied[2]) == 9_000_000
        async with s.post(sc.url + "/echo", data=big) as r:
            assert await r.read() == big


async def test_bad_request_bodies_pass_untouched_and_are_counted() -> None:
    async with SyntheticUpstream(Script(ttft=0, itl=0, tokens=2)) as up, \
            running_sidecar(up.url, parse_limit=2048) as sc, aiohttp.ClientSession() as s:
        for raw in (b"{not json", b"\xff\xfe\x00", b"[1,2,3]", b""):
            async with s.post(sc.url + CHAT, data=raw,
                              headers={"Content-Type": "application/json"}) as r:
                await r.read()
        # Larger than the parse limit: relayed as is (no include_usage added), still counted.
        large = json.dumps(chat(padding="x" * 5000)).encode()
        async with s.post(sc.url + CHAT, data=large,
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200
            assert b"data: [DONE]" in await r.read()
        assert [r.body for r in up.requests] == [b"{not json", b"\xff\xfe\x00", b"[1,2,3]", b"",
                                                 large]
        total = sum(v.value for m in sc.collect() if m.name == "llm_exporter_requests"
                    for v in m.samples if v.name.endswith("_total"))
        assert total == 5
        assert sc.value("llm_exporter_errors_total", {"type": "instrumentation"}) == 0


async def test_upstream_down_gives_openai_shaped_502() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with running_sidecar(f"http://127.0.0.1:{port}") as sc, aiohttp.ClientSession() as s:
        async with s.post(sc.url + CHAT, json=chat()) as r:
            assert r.status == 502
            err = (await r.json())["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["type"] == "upstream_unreachable"
        async with s.get(sc.url + "/v1/models") as r:
            assert r.status == 502
        assert sc.value("llm_exporter_errors_total", {"type": "upstream_connect"}) == 2
        assert sc.value("llm_exporter_requests_total", {
            "model": "other", "operation": "chat",
                "api": "openai_chat", "stream": "true", "status_class": "5xx",
            "finish_reason": "error"}) == 1


async def test_upstream_timeout_gives_504() -> None:
    async with SyntheticUpstream(Script(hang=1.0)) as up, \
            running_sidecar(up.url, upstream_timeout=0.2) as sc, aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        async with s.post(sc.url + CHAT, json=chat()) as r:
            assert r.status == 504
            assert (await r.json())["error"]["type"] == "upstream_timeout"
        assert time.monotonic() - t0 < 0.9
        assert sc.value("llm_exporter_errors_total", {"type": "upstream_timeout"}) == 1


async def test_stall_mid_stream_cuts_the_client_off_and_counts_a_timeout() -> None:
    # 3 chunks then a 1 s gap: longer than the 0.3 s read timeout.
    async with SyntheticUpstream(Script(ttft=0, itl=1.0, tokens=3)) as up, \
            running_sidecar(up.url, upstream_timeout=0.3) as sc, aiohttp.ClientSession() as s:
        status, _, body, cut = await fetch(s, "POST", sc.url + CHAT, json=chat())
        assert status == 200 and cut
        assert b"t0 " in body and b"t1 " not in body
        assert sc.value("llm_exporter_errors_total", {"type": "upstream_timeout"}) == 1


async def test_client_disconnect_closes_upstream_within_100ms(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    async with SyntheticUpstream(Script(ttft=0.01, itl=0.005, tokens=2000)) as up, \
            running_sidecar(up.url) as sc:
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", sc.sidecar.port)
            body = json.dumps(chat()).encode()
            writer.write(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (CHAT.encode(), len(body), body))
            await writer.drain()
            buf = b""
            while b't1 ' not in buf:
                buf += await reader.read(65536)
            gone = clock()
            writer.close()
            await writer.wait_closed()
            rec = up.requests[-1]
            for _ in range(100):
                if rec.closed_at is not None:
                    break
                await asyncio.sleep(0.005)
            assert rec.closed_early and rec.closed_at is not None
            assert rec.closed_at - gone < 0.1, f"upstream closed {rec.closed_at - gone:.3f}s late"
        await asyncio.sleep(0.05)
        assert sc.value("llm_exporter_requests_total", {
            "model": "m", "operation": "chat",
                "api": "openai_chat", "stream": "true", "status_class": "2xx",
            "finish_reason": "cancelled"}) == 3
        assert sc.value("llm_exporter_errors_total", {"type": "client_disconnect"}) == 3
        assert sc.sidecar.state.in_flight == 0
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "no tracebacks"


async def test_instrumentation_error_is_counted_logged_once_and_response_continues(
        caplog: pytest.LogCaptureFixture) -> None:
    async with SyntheticUpstream(Script(ttft=0, itl=0, tokens=4)) as up, \
            running_sidecar(up.url) as sc, aiohttp.ClientSession() as s:
        def boom(*a: Any) -> None:
            raise RuntimeError("injected failure")

        sc.sidecar.metrics.record = boom  # type: ignore[method-assign]
        direct = await fetch(s, "POST", up.url + CHAT, json=chat(stream_options={
            "include_usage": True}))
        with caplog.at_level(logging.ERROR):
            for _ in range(3):
                proxied = await fetch(s, "POST", sc.url + CHAT, json=chat(stream_options={
                    "include_usage": True}))
                assert proxied[2] == direct[2]
        assert sc.value("llm_exporter_errors_total", {"type": "instrumentation"}) == 3
        assert sum("injected failure" in (r.exc_text or "") or "record" in r.getMessage()
                   for r in caplog.records) == 1


async def test_no_task_or_connection_left_after_1000_requests() -> None:
    async with SyntheticUpstream(Script(ttft=0, itl=0, tokens=3)) as up, \
            running_sidecar(up.url) as sc:
        me = psutil.Process()

        def upstream_conns() -> int:
            return sum(1 for c in me.net_connections("tcp")
                       if c.raddr and c.raddr.port == up.port and c.status == "ESTABLISHED")

        async def batch(n: int, conc: int) -> None:
            async with aiohttp.ClientSession() as s:
                sem = asyncio.Semaphore(conc)

                async def one(i: int) -> None:
                    async with sem:
                        body = chat(stream=i % 3 != 0)
                        if i % 10 == 5:  # some clients hang up mid-stream
                            async with s.post(sc.url + CHAT, json=body) as r:
                                await r.content.read(10)
                            return
                        async with s.post(sc.url + CHAT, json=body) as r:
                            await r.read()

                await asyncio.gather(*(one(i) for i in range(n)))
            await asyncio.sleep(0.2)

        await batch(50, 16)
        tasks_before = len(asyncio.all_tasks())
        await batch(1000, 16)
        tasks_after = len(asyncio.all_tasks())
        assert tasks_after <= tasks_before, (tasks_before, tasks_after)
        assert upstream_conns() <= 16
        assert sc.sidecar.state.in_flight == 0 and sc.sidecar.state.queued == 0
        assert not sc.sidecar.instrumentation.pending
        assert up.active == 0
        total = sum(v.value for m in sc.collect() if m.name == "llm_exporter_requests"
                    for v in m.samples if v.name.endswith("_total"))
        assert total == 1050


@pytest.mark.parametrize("raw", [
    b'{"model":"m","stream":true,"messages":[{"role":"user","content":"a}"}]}',
    b'{\n  "model": "m",\n  "stream": true,\n  "messages": []\n}\n',
    b'{"model":"m","stream":true,"stream_options":{"foo":1},"messages":[]}',
    b'{"stream":true}',
])
async def test_injected_usage_keeps_the_clients_bytes(raw: bytes) -> None:
    async with SyntheticUpstream(Script(ttft=0, itl=0, tokens=2)) as up, \
            running_sidecar(up.url) as sc, aiohttp.ClientSession() as s:
        sc.sidecar.proxy.usage_mode = "inject"
        async with s.post(sc.url + CHAT, data=raw,
                          headers={"Content-Type": "application/json"}) as r:
            assert b'"usage"' not in await r.read()
        sent = up.requests[-1].body
        obj, orig = json.loads(sent), json.loads(raw)
        assert obj.pop("stream_options") == {**orig.pop("stream_options", {}),
                                             "include_usage": True}
        assert obj == orig
        if b"stream_options" not in raw:  # a splice: the client's own bytes are all there
            brace = raw.rstrip().rfind(b"}")
            assert sent.startswith(raw[:brace].rstrip())  # everything before the last brace
            assert sent.endswith(raw[brace:])  # the brace and what trailed it
