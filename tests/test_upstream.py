"""Self-test of the synthetic upstream: shapes, token counts, timing, cut-offs, disconnects."""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.upstream import RawUpstream, Script, SyntheticUpstream, script_header

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def upstream() -> AsyncIterator[SyntheticUpstream]:
    async with SyntheticUpstream(Script(ttft=0.02, itl=0.005, tokens=5)) as up:
        yield up


def events(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n")
    return [e.removeprefix(b"data: ") for e in raw.split(b"\n\n")[:-1]]


async def post(up: SyntheticUpstream, path: str, body: dict[str, Any],
               **script: Any) -> tuple[int, bytes, aiohttp.ClientResponse]:
    headers = script_header(**script) if script else {}
    async with aiohttp.ClientSession() as s, s.post(up.url + path, json=body,
                                                    headers=headers) as r:
        return r.status, await r.read(), r


CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hello there you"}],
        "stream": True}


async def test_chat_stream_shape(upstream: SyntheticUpstream) -> None:
    status, raw, r = await post(upstream, "/v1/chat/completions", CHAT)
    assert status == 200 and r.content_type == "text/event-stream"
    ev = events(raw)
    assert ev[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in ev[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert contents == ["t0 ", "t1 ", "t2 ", "t3 ", "t4 "]
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert all(c["model"] == "m1" and c["id"] == "chatcmpl-1" for c in chunks)
    assert all("usage" not in c for c in chunks)  # not asked for
    rec = upstream.requests[-1]
    assert rec.stream and rec.model == "m1" and rec.completion_tokens == 5
    assert rec.headers["content-type"] == "application/json" and not rec.closed_early


async def test_stream_is_deterministic(upstream: SyntheticUpstream) -> None:
    a = await post(upstream, "/v1/chat/completions", CHAT)
    b = await post(upstream, "/v1/chat/completions", CHAT)
    assert a[1] == b[1]


async def test_usage_when_asked_and_tokens_per_chunk(upstream: SyntheticUpstream) -> None:
    body = {**CHAT, "stream_options": {"include_usage": True}}
    _, raw, _ = await post(upstream, "/v1/chat/completions", body, tokens=10,
                           tokens_per_chunk=3)
    chunks = [json.loads(e) for e in events(raw)[:-1]]
    contents = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert [len(c.split()) for c in contents] == [3, 3, 3, 1]
    assert " ".join(contents).split() == [f"t{i}" for i in range(10)]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 10,
                                   "total_tokens": 13}
    assert upstream.requests[-1].chunk_tokens == [3, 3, 3, 1]


async def test_usage_always_and_never(upstream: SyntheticUpstream) -> None:
    _, raw, _ = await post(upstream, "/v1/chat/completions", CHAT, usage="always")
    assert b'"usage"' in raw
    body = {**CHAT, "stream_options": {"include_usage": True}}
    _, raw, _ = await post(upstream, "/v1/chat/completions", body, usage="never")
    assert b'"usage"' not in raw


async def test_text_completion_stream_and_whole(upstream: SyntheticUpstream) -> None:
    body = {"model": "m2", "prompt": ["a b", "c"], "stream": True,
            "stream_options": {"include_usage": True}}
    _, raw, _ = await post(upstream, "/v1/completions", body, finish_reason="length")
    chunks = [json.loads(e) for e in events(raw)[:-1]]
    assert chunks[0]["object"] == "text_completion" and chunks[0]["choices"][0]["text"] == "t0 "
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["prompt_tokens"] == 3
    status, raw, r = await post(upstream, "/v1/completions", {"model": "m2", "prompt": "x y"})
    whole = json.loads(raw)
    assert status == 200 and r.content_type == "application/json"
    assert whole["choices"][0]["text"] == "t0 t1 t2 t3 t4 "
    assert whole["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}


async def test_chat_whole_and_content_parts(upstream: SyntheticUpstream) -> None:
    body = {"model": "m", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "one two three"},
                                     {"type": "image_url", "image_url": {"url": "x"}}]}]}
    _, raw, _ = await post(upstream, "/v1/chat/completions", body, usage="never")
    whole = json.loads(raw)
    assert whole["choices"][0]["message"]["content"] == "t0 t1 t2 t3 t4 "
    assert "usage" not in whole
    _, raw, _ = await post(upstream, "/v1/chat/completions", body)
    assert json.loads(raw)["usage"]["prompt_tokens"] == 5


async def test_errors_and_raw_bodies(upstream: SyntheticUpstream) -> None:
    status, raw, _ = await post(upstream, "/v1/chat/completions", CHAT, status=429)
    assert status == 429 and json.loads(raw)["error"]["code"] == 429
    status, raw, r = await post(upstream, "/v1/chat/completions", CHAT, status=500,
                                error_body="oops", content_type="text/plain")
    assert (status, raw, r.content_type) == (500, b"oops", "text/plain")
    status, raw, _ = await post(upstream, "/v1/chat/completions", CHAT, raw_body="\x00abc")
    assert (status, raw) == (200, b"\x00abc")
    async with aiohttp.ClientSession() as s, s.post(
            upstream.url + "/v1/completions", data=b"not json") as resp:
        assert resp.status == 400


async def _timed_stream(ttft: float, itl: float, n: int) -> tuple[list[float], list[float],
                                                                 float, float]:
    """(server lateness per event, server gaps, server TTFT, client TTFT) of one stream."""
    async with SyntheticUpstream(Script(ttft=ttft, itl=itl, tokens=n)) as up:
        arrivals: list[float] = []
        async with aiohttp.ClientSession() as s:
            t0 = time.monotonic()
            async with s.post(up.url + "/v1/chat/completions", json=CHAT) as r:
                async for _ in r.content.iter_any():
                    arrivals.append(time.monotonic())
        rec = up.requests[-1]
        assert len(rec.chunk_times) == n and rec.ttft is not None
        lateness = [t - (rec.started_at + ttft + j * itl) for j, t in enumerate(rec.chunk_times)]
        return lateness, rec.gaps(), rec.ttft, arrivals[1] - t0  # [0] is the role chunk


async def test_timing_honoured() -> None:
    # A busy shared machine can stall any process for tens of ms, so one of five attempts must
    # be on time in every respect (events are on absolute deadlines: a stall is caught up).
    ttft, itl, n = 0.05, 0.01, 30
    failures = []
    for _ in range(5):
        lateness, gaps, server_ttft, client_ttft = await _timed_stream(ttft, itl, n)
        assert min(lateness) >= 0  # never early
        checks = {"median lateness": statistics.median(lateness) < 0.002,
                  "median gap": abs(statistics.median(gaps) - itl) < 0.001,
                  "server ttft": abs(server_ttft - ttft) < 0.003,
                  "client ttft": abs(client_ttft - ttft) < 0.01}
        if all(checks.values()):
            return
        failures.append((checks, server_ttft, client_ttft, lateness))
    pytest.fail(f"no attempt was on time: {failures}")


async def test_cut_off_stream(upstream: SyntheticUpstream) -> None:
    async with aiohttp.ClientSession() as s, s.post(
            upstream.url + "/v1/chat/completions", json=CHAT,
            headers=script_header(cut_after=2)) as r:
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    await asyncio.sleep(0.05)
    rec = upstream.requests[-1]
    assert rec.cut and not rec.closed_early and len(rec.chunk_times) == 2
    assert upstream.active == 0


async def test_client_disconnect_is_noticed(upstream: SyntheticUpstream) -> None:
    async with aiohttp.ClientSession() as s:
        r = await s.post(upstream.url + "/v1/chat/completions", json=CHAT,
                         headers=script_header(ttft=5.0))
        assert r.status == 200
        t = time.monotonic()
        r.close()
    for _ in range(100):
        if upstream.requests[-1].closed_early:
            break
        await asyncio.sleep(0.005)
    rec = upstream.requests[-1]
    assert rec.closed_early and rec.closed_at is not None
    assert rec.closed_at - t < 0.1
    assert upstream.active == 0


async def test_hang_delays_headers(upstream: SyntheticUpstream) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.1)) as s:
        with pytest.raises(asyncio.TimeoutError):
            await s.post(upstream.url + "/v1/chat/completions", json=CHAT,
                         headers=script_header(hang=1.0))


async def test_other_routes(upstream: SyntheticUpstream) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(upstream.url + "/v1/models") as r:
            assert (await r.json())["data"][0]["id"] == "synthetic"
        async with s.get(upstream.url + "/health") as r:
            assert r.status == 200
        async with s.put(upstream.url + "/echo/x?q=1", data=b"\xffbody",
                         headers={"Content-Type": "application/x-thing",
                                  "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
                         ) as r:
            assert await r.read() == b"\xffbody"
            assert r.headers["x-echo-method"] == "PUT" and r.headers["x-echo-path"] == "/echo/x?q=1"
            assert r.content_type == "application/x-thing"
        assert upstream.requests[-1].headers["traceparent"].startswith("00-aaaa")
        async with s.get(upstream.url + "/headers", headers={"X-Foo": "bar"}) as r:
            assert (await r.json())["x-foo"] == "bar"
        async with s.get(upstream.url + "/big?size=300000&chunked=1") as r:
            data = await r.read()
            assert len(data) == 300000 and data[256:258] == b"\x00\x01"
        async with s.get(upstream.url + "/status/503") as r:
            assert r.status == 503
        async with s.get(upstream.url + "/nope") as r:
            assert r.status == 404 and "error" in await r.json()


def test_command_line_entry_point() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tests.upstream", "--port", str(port),
                             "--ttft", "0.001", "--itl", "0.001", "--tokens", "3"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert "synthetic upstream on" in proc.stdout.readline()

        async def fetch() -> bytes:
            async with aiohttp.ClientSession() as s, s.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT) as r:
                return await r.read()

        raw = asyncio.run(fetch())
        assert raw.count(b'"content":"t') == 3 and raw.endswith(b"data: [DONE]\n\n")
    finally:
        proc.terminate()
        proc.wait(5)


async def test_raw_mode_sends_the_same_bytes() -> None:
    script = Script(ttft=0.002, itl=0.001, tokens=4, tokens_per_chunk=3)
    body = {**CHAT, "stream_options": {"include_usage": True}}
    raw_server = await RawUpstream(script).serve("127.0.0.1", 0)
    port = raw_server.sockets[0].getsockname()[1]
    try:
        async with SyntheticUpstream(script) as up, aiohttp.ClientSession() as s:
            got = []
            for url in (up.url, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}"):
                for path, b in (("/v1/chat/completions", body),
                                ("/v1/completions", {"prompt": "a", "stream": True}),
                                ("/v1/completions", {"prompt": "a b"})):
                    async with s.post(url + path, json=b) as r:
                        got.append((r.status, r.headers.get("Content-Type"), await r.read()))
            assert got[:3] == got[3:6] == got[6:]  # the last three reuse a connection
    finally:
        raw_server.close()
        await raw_server.wait_closed()
