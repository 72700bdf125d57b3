"""The lean upstream client (exporter.transport) against a raw TCP server that writes exactly
the bytes each test gives it: keep-alive reuse, the keep-alive race, every way a body can end,
malformed responses, interim responses, backpressure."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from exporter.transport import Pool, Response, UpstreamDisconnected, UpstreamProtocolError
from tests.harness import running_sidecar

Handler = Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """Serve ``handler(connection number, reader, writer)``; yields the URL and a list that
    counts connections."""
    conns: list[int] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(len(conns))
        try:
            await handler(len(conns) - 1, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", conns
    finally:
        server.close()


async def body_of(resp: Response) -> bytes:
    got = bytearray()
    resp.attach(got.extend)
    await resp.run(asyncio.sleep)  # type: ignore[arg-type]
    resp.close()
    return bytes(got)


async def test_connections_are_kept_alive_and_reused() -> None:
    seen: list[bytes] = []

    async def handler(n: int, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await read_request(reader))
            w.write(OK)

    async with raw_server(handler) as (url, conns):
        pool = Pool(url)
        for _ in range(3):
            resp = await pool.request("POST", "/v1/x?a=1", [("X-A", "1")], b"{}")
            assert (resp.status, resp.reason, await body_of(resp)) == (200, "OK", b"ok")
        assert len(conns) == 1 and pool.open_connections == 1
        host = url.removeprefix("http://")
        assert seen[0] == (f"POST /v1/x?a=1 HTTP/1.1\r\nHost: {host}\r\nX-A: 1\r\n"
                           "Content-Length: 2\r\n\r\n{}").encode()
        pool.close()


async def test_a_reused_connection_closed_under_the_request_is_retried_once() -> None:
    """The keep-alive race: the upstream closes an idle connection as we send on it."""
    async def handler(n: int, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)
        w.write(OK)
        if n == 0:
            await read_request(reader)  # the second request on it: close without answering

    async with raw_server(handler) as (url, conns):
        pool = Pool(url)
        assert await body_of(await pool.request("POST", "/", [], b"1")) == b"ok"
        assert await body_of(await pool.request("POST", "/", [], b"2")) == b"ok"
        assert len(conns) == 2
        pool.close()


async def test_a_fresh_connection_closed_before_the_response_is_not_retried() -> None:
    async def handler(n: int, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with raw_server(handler) as (url, conns):
        pool = Pool(url)
        with pytest.raises(UpstreamDisconnected, match="before its response headers"):
            await pool.request("POST", "/", [], b"1")
        assert len(conns) == 1 and pool.open_connections == 0


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabcde",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabcde",  # ends when the upstream closes
    b"HTTP/1.0 200 OK\r\n\r\nabcde",
    b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    b"abcde",
], ids=["chunked", "length", "close", "http10", "interim"])
async def test_every_body_framing_ends_where_the_upstream_says(response: bytes) -> None:
    async def handler(n: int, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)
        for i in range(0, len(response), 7):  # split anywhere
            w.write(response[i:i + 7])
            await w.drain()
            await asyncio.sleep(0.001)
        if b"Connection: close" in response or b"HTTP/1.0" in response:
            w.close()
        else:
            await reader.read()

    async with raw_server(handler) as (url, _):
        pool = Pool(url)
        resp = await pool.request("POST", "/", [], b"{}")
        assert resp.status == 200 and "Link" not in resp.headers
        assert await body_of(resp) == b"abcde"
        pool.close()


@pytest.mark.parametrize("response,error,delivered", [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", UpstreamDisconnected,
     b"abc"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc", UpstreamDisconnected, b"abc"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\nd",
     UpstreamProtocolError, b"abc"),
], ids=["chunked-cut", "length-cut", "bad-chunk"])
async def test_a_body_cut_short_or_malformed_is_an_error(
        response: bytes, error: type[Exception], delivered: bytes) -> None:
    async def handler(n: int, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)
        w.write(response)
        await w.drain()

    async with raw_server(handler) as (url, _):
        pool = Pool(url)
        resp = await pool.request("POST", "/", [], b"{}")
        got = bytearray()
        resp.attach(got.extend)
        with pytest.raises(error):
            await resp.run(asyncio.sleep)  # type: ignore[arg-type]
        resp.close()
        assert pool.open_connections == 0
        assert bytes(got) == delivered  # what came before the failure, and only that


async def test_garbage_instead_of_a_status_line_is_a_protocol_error() -> None:
    async def handler(n: int, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)
        w.write(b"SSH-2.0-OpenSSH_9.2\r\n")
        await reader.read()

    async with raw_server(handler) as (url, _):
        pool = Pool(url)
        with pytest.raises(UpstreamProtocolError):
            await pool.request("POST", "/", [], b"{}")
        assert pool.open_connections == 0


async def test_a_body_stream_of_unknown_length_goes_chunked() -> None:
    got: list[bytes] = []

    async def handler(n: int, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got.append(await reader.readuntil(b"0\r\n\r\n"))
        w.write(OK)

    async def parts() -> AsyncIterator[bytes]:
        yield b"ab"
        yield b""
        yield b"cde"

    async with raw_server(handler) as (url, _):
        pool = Pool(url)
        assert await body_of(await pool.request("POST", "/", [], parts())) == b"ok"
        assert got[0].endswith(
            b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n")
        pool.close()


async def test_a_slow_client_pauses_the_upstream_instead_of_buffering_it() -> None:
    """64 MiB streamed through the sidecar to a client that stops reading: the sidecar must
    stop reading from the upstream (its memory stays flat), not take the pause for an upstream
    stall (its read timeout is shorter than the pause), and lose nothing once the client
    reads again."""
    payload = bytes(range(256)) * (256 * 1024)  # 64 MiB
    sent = asyncio.Event()
    progress: list[int] = [0]

    async def handler(n: int, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(payload))
        step = 256 * 1024
        for i in range(0, len(payload), step):
            w.write(payload[i:i + step])
            await w.drain()
            progress[0] = i + step
        sent.set()

    async with raw_server(handler) as (url, _), \
            running_sidecar(url, upstream_timeout=0.3) as sc, \
            aiohttp.ClientSession() as s:
        async with s.post(sc.url + "/v1/chat/completions", json={"model": "m"}) as r:
            await asyncio.sleep(1.0)  # the client reads nothing for a second
            stalled_at = progress[0]
            assert not sent.is_set() and stalled_at < len(payload) // 4, stalled_at
            digest = hashlib.sha256()
            async for chunk in r.content.iter_any():
                digest.update(chunk)
        assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()
        assert sent.is_set()
        assert sc.value("llm_exporter_errors_total", {"type": "upstream_timeout"}) == 0


async def test_an_http10_client_gets_the_body_unframed_then_close() -> None:
    events = [b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n', b"data: [DONE]\n\n"]

    async def handler(n: int, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        for e in events:
            w.write(b"%x\r\n%b\r\n" % (len(e), e))
            await w.drain()
        w.write(b"0\r\n\r\n")
        await reader.read()

    async with raw_server(handler) as (url, _), running_sidecar(url) as sc:
        port = int(sc.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b'{"model":"m","stream":true}'
        writer.write(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        raw = await asyncio.wait_for(reader.read(), 5)  # to EOF: the sidecar closes
        writer.close()
        head, _, got = raw.partition(b"\r\n\r\n")
        assert b"transfer-encoding" not in head.lower()
        assert got == b"".join(events)


async def test_an_error_in_the_sink_ends_the_exchange_with_that_error() -> None:
    """The relay's sink raises ConnectionResetError when the client went away: the exchange
    must end with it (a cancellation), not as a malformed upstream response."""
    async def handler(n: int, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await w.drain()
        await asyncio.sleep(0.05)
        w.write(b"3\r\nabc\r\n")
        await reader.read()

    def sink(data: bytes) -> None:
        raise ConnectionResetError("the client went away")

    async with raw_server(handler) as (url, _):
        pool = Pool(url)
        resp = await pool.request("POST", "/", [], b"{}")
        resp.attach(sink)
        with pytest.raises(ConnectionResetError):
            await resp.run(asyncio.sleep)  # type: ignore[arg-type]
        resp.close()
        assert pool.open_connections == 0


async def test_bytes_after_the_response_make_the_connection_unusable() -> None:
    async def handler(n: int, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)
        w.write(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno")
        await reader.read()

    async with raw_server(handler) as (url, conns):
        pool = Pool(url)
        resp = await pool.request("POST", "/", [], b"{}")
        await asyncio.sleep(0.05)  # both responses are in
        with contextlib.suppress(UpstreamProtocolError):
            await body_of(resp)
        assert pool.open_connections == 0  # closed, not kept for the next request
        assert await body_of(await pool.request("POST", "/", [], b"{}")) == b"ok"
        assert len(conns) == 2
        pool.close()
