"""A lean HTTP/1.1 client for the LLM routes.

aiohttp's client hands each body chunk to the relay through a StreamReader: a future set, a task
woken, a coroutine per read. Here each upstream connection is an :class:`asyncio.Protocol`
whose responses llhttp parses (``httptools``, the parser uvicorn uses) and whose body bytes go
straight to a synchronous *sink* in the event loop's read callback: no task wake-up, no buffer,
no coroutine per chunk. Connections are kept alive and reused (last in, first out).

What a reverse proxy to one upstream origin needs, for every route: requests with a body or
a body stream (Content-Length or chunked), responses delimited by Content-Length, chunked
coding or connection close, bodiless responses to HEAD, interim 1xx responses skipped. Header
bytes go through as they came (decoded and re-encoded with ``surrogateescape``), UTF-8 or not.
A ``101 Switching Protocols`` is refused: the relay does not tunnel other protocols.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

Sink = Callable[[bytes], None]

_HIGH_WATER = 256 * 1024  # bytes queued towards the upstream before a body stream waits
# The most an upstream may send before its response head is complete (status line, headers):
# nginx's default large_client_header_buffers is 4 x 8 KiB; aiohttp's client allows 8 KiB a
# line. Beyond it the exchange fails instead of growing memory until the timeout.
MAX_HEAD = 64 * 1024


class UpstreamError(Exception):
    """The upstream did not give a complete, well-formed response."""


class UpstreamDisconnected(UpstreamError):
    """The upstream closed the connection before its response was complete."""


class UpstreamProtocolError(UpstreamError):
    """The upstream sent something that is not HTTP/1.x."""


class RequestBodyMismatch(Exception):
    """The client's body did not match its declared length; nothing more goes upstream."""


class Response:
    """One upstream response. Status and headers are known when :meth:`Pool.request` returns;
    body bytes go to the sink given to :meth:`attach` (those that came earlier first)."""

    __slots__ = (
        "_conn",
        "_delimited",
        "_early",
        "_head",
        "_raw_headers",
        "_reason",
        "_sink",
        "_wake",
        "bodiless",
        "complete",
        "drain_wanted",
        "error",
        "head_bytes",
        "headers",
        "keep_alive",
        "reason",
        "received",
        "status",
    )

    def __init__(self, conn: _Connection, bodiless: bool = False) -> None:
        self._conn: _Connection | None = conn
        self.bodiless = bodiless  # the answer to a HEAD: no body, whatever its headers say
        self._head: asyncio.Future[None] = conn.loop.create_future()
        self._wake: asyncio.Future[None] | None = None
        self._sink: Sink | None = None
        self._early: list[bytes] = []
        self._reason = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._delimited = True  # Content-Length or chunked: the end is in the stream
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
        self.keep_alive = False
        self.complete = False
        self.received = False  # any response byte came
        self.head_bytes = 0  # bytes read while the head was incomplete
        self.error: BaseException | None = None
        self.drain_wanted = False

    # --- the relay's side ---------------------------------------------------------------
    def attach(self, sink: Sink) -> None:
        """Deliver the body to ``sink``, synchronously, as it arrives. An exception the sink
        raises ends the exchange: :meth:`run` raises it and the connection is closed."""
        self._sink = sink
        early, self._early = self._early, []
        for data in early:
            sink(data)

    async def run(self, drain: Callable[[], Awaitable[None]]) -> None:
        """Wait until the body is complete; ``drain`` is awaited whenever the sink asked to
        (:meth:`want_drain`), with reading from the upstream paused meanwhile."""
        loop = self._loop
        while self.error is None and not self.complete:
            self._wake = loop.create_future()
            try:
                await self._wake
            finally:
                self._wake = None
            if self.drain_wanted and self.error is None:
                await drain()
                self.drain_wanted = False
                if self._conn is not None and self._conn.transport is not None:
                    self._conn.transport.resume_reading()
        if self.error is not None:
            raise self.error

    def want_drain(self) -> None:
        """Stop reading from the upstream until the client has taken what was written."""
        if not self.drain_wanted and self._conn is not None and self._conn.transport is not None:
            self.drain_wanted = True
            self._conn.transport.pause_reading()
            self._notify()

    def abort(self, error: BaseException) -> None:
        """End the exchange with ``error`` and close the connection."""
        self._fail(error)
        self.close()

    def close(self) -> None:
        """Give the connection back if the response was read to its end, else close it."""
        self._sink = None  # the sink holds the relay's state, which holds us: no cycle left
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.resp = None
        if self.complete and self.keep_alive and self.error is None and not conn.broken:
            conn.pool._put(conn)
        else:
            conn.close()

    # --- the connection's side ------------------------------------------------------------
    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        return self._head.get_loop()

    def _notify(self) -> None:
        w = self._wake
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self.error is not None or self.complete:
            return
        self.error = error
        if not self._head.done():
            self._head.set_exception(error)
        self._notify()

    def _headers_done(self, status: int, keep_alive: bool) -> None:
        headers: CIMultiDict[str] = CIMultiDict()
        chunked = False
        length = False
        for k, v in self._raw_headers:
            name = k.decode("utf-8", "surrogateescape")
            value = v.decode("utf-8", "surrogateescape")
            headers.add(name, value)
            lk = name.lower()
            if lk == "content-length":
                length = True
            elif lk == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        self._raw_headers = []
        self.status = status
        self.reason = self._reason.decode("utf-8", "surrogateescape")
        self.headers = CIMultiDictProxy(headers)
        self.keep_alive = keep_alive
        self._delimited = chunked or length or status in (204, 304)
        self._head.set_result(None)

    def _body(self, data: bytes) -> None:
        sink = self._sink
        if sink is not None:
            sink(data)
        else:
            self._early.append(data)

    def _done(self) -> None:
        if self.error is None:
            self.complete = True
            self._notify()

    def _lost(self, exc: BaseException | None) -> None:
        if self._head.done() and not self._delimited and self.error is None:
            self._done()  # the body ran to the connection's close, as the upstream said
            return
        what = "before its response headers" if not self._head.done() else "mid-body"
        self._fail(UpstreamDisconnected(f"upstream closed the connection {what}"
                                        + (f": {exc}" if exc else "")))


class _Connection(asyncio.Protocol):
    """One upstream connection; carries at most one response at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: Response | None = None
        self.idle_since = 0.0
        self.reused = False
        self.broken = False  # something on it cannot be trusted: never reuse it
        self._writable: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None:  # bytes on an idle connection: nothing can be trusted on it now
            self.close()
            return
        resp.received = True
        in_head = not resp._head.done()
        if in_head:
            resp.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
            if in_head and not resp._head.done() and resp.head_bytes > MAX_HEAD:
                self.broken = True
                resp.abort(UpstreamProtocolError(
                    f"the upstream's response head exceeds {MAX_HEAD} bytes"))
        except httptools.HttpParserCallbackError as e:
            # Raised in one of our callbacks: by the sink (e.g. the client went away) or on
            # a second response. llhttp wraps it; the exchange ends with the original.
            self.broken = True
            resp.abort(e.__context__ if isinstance(e.__context__, Exception) else e)
        except httptools.HttpParserError as e:
            self.broken = True
            resp.abort(UpstreamProtocolError(f"malformed response from the upstream: {e}"))

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self.pool._forget(self)
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if self.resp is not None:
            self.resp._lost(exc)

    def pause_writing(self) -> None:
        self._writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # llhttp callbacks
    def on_message_begin(self) -> None:
        if self.resp is None or self.resp.complete:  # bytes after the response: unusable
            self.broken = True
            raise UpstreamProtocolError("the upstream sent more than one response")

    def on_status(self, status: bytes) -> None:
        if self.resp is not None:
            self.resp._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.resp is not None:
            self.resp._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        resp = self.resp
        if resp is None:
            return
        status = self.parser.get_status_code()
        if status == 101:
            self.broken = True
            raise UpstreamProtocolError("the upstream switched protocols (101), which the "
                                        "sidecar does not relay")
        if 100 <= status < 200:  # interim (e.g. 100, 103): wait for the final one
            resp._raw_headers = []
            resp._reason = b""
            return
        resp._headers_done(status, self.parser.should_keep_alive())
        if resp.bodiless:
            # llhttp does not know the request was a HEAD and would wait for the body the
            # headers announce: the response ends here, and the connection is not reused.
            self.broken = True
            resp._done()

    def on_body(self, body: bytes) -> None:
        if self.resp is not None:
            self.resp._body(body)

    def on_message_complete(self) -> None:
        resp = self.resp
        if resp is not None and resp._head.done():
            resp._done()

    # ours
    async def writable(self) -> None:
        if self._writable is not None:
            await self._writable

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        self.pool._forget(self)


class Pool:
    """Keep-alive connections to one upstream origin (``http://`` or ``https://``)."""

    def __init__(self, base_url: str, *, connect_timeout: float | None = None,
                 idle_timeout: float = 15.0) -> None:
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"upstream must be an http:// or https:// URL, not {base_url!r}")
        self.loop = asyncio.get_running_loop()
        self.host = url.host
        self.port = url.port or (443 if url.scheme == "https" else 80)
        host = url.raw_host or url.host
        host = f"[{host}]" if ":" in host else host
        self.authority = host if url.explicit_port is None else f"{host}:{self.port}"
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._idle: deque[_Connection] = deque()
        self._open: set[_Connection] = set()

    @property
    def open_connections(self) -> int:
        return len(self._open)

    async def request(self, method: str, target: str, headers: Iterable[tuple[str, str]],
                      body: bytes | AsyncIterator[bytes] | None,
                      content_length: int | None = None) -> Response:
        """Send a request and return once the response headers are in. ``headers`` are sent
        as given, plus Host and the body's framing (Content-Length, or chunked for a stream
        of unknown length). A request that meets a reused connection closed under it, before
        any response byte, is sent once more on a new connection (the keep-alive race)."""
        data, stream = (body, None) if isinstance(body, bytes | None) else (None, body)
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {self.authority}\r\n"]
        lines.extend(f"{k}: {v}\r\n" for k, v in headers)
        if stream is None:
            if data or method in ("POST", "PUT", "PATCH"):
                lines.append(f"Content-Length: {len(data or b'')}\r\n")
        elif content_length is not None:
            lines.append(f"Content-Length: {content_length}\r\n")
        else:
            lines.append("Transfer-Encoding: chunked\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("utf-8", "surrogateescape")
        for attempt in (0, 1):
            conn = self._take_idle() or await self._connect()
            resp = Response(conn, bodiless=method == "HEAD")
            conn.resp = resp
            try:
                assert conn.transport is not None
                if stream is not None:
                    await self._send_stream(conn, head, stream, content_length)
                else:
                    conn.transport.write(head + data if data else head)
                await resp._head
                return resp
            except UpstreamDisconnected:
                retry = conn.reused and not resp.received and stream is None and attempt == 0
                resp.close()
                if not retry:
                    raise
            except BaseException:
                resp.close()
                raise
        raise AssertionError("unreachable")

    async def _send_stream(self, conn: _Connection, head: bytes, body: AsyncIterator[bytes],
                           length: int | None) -> None:
        """Stream ``body`` after ``head``: chunked when ``length`` is None, else exactly
        ``length`` bytes. A body that turns out longer or shorter than it declared never reaches
        the upstream as framed (the excess would be parsed as a request of its own on a
        keep-alive connection): the exchange fails and the connection is closed."""
        conn.transport.write(head)  # type: ignore[union-attr]
        sent = 0
        async for chunk in body:
            if conn.transport is None:
                raise UpstreamDisconnected("upstream closed the connection while the request "
                                           "body was sent")
            sent += len(chunk)
            if length is not None and sent > length:
                conn.broken = True
                raise RequestBodyMismatch(f"request body longer than its Content-Length "
                                          f"({length})")
            if chunk:
                conn.transport.write(chunk if length is not None
                                     else b"%x\r\n%b\r\n" % (len(chunk), chunk))
            if conn.transport.get_write_buffer_size() > _HIGH_WATER:
                await conn.writable()
        if length is not None and sent != length:
            conn.broken = True
            raise RequestBodyMismatch(f"request body of {sent} bytes, {length} declared")
        if length is None and conn.transport is not None:
            conn.transport.write(b"0\r\n\r\n")

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle and now - self._idle[0].idle_since > self.idle_timeout:
            self._idle.popleft().close()
        while self._idle:
            conn = self._idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await self.loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None)
        except TimeoutError:
            raise TimeoutError(f"no connection within {self.connect_timeout:g} s") from None
        self._open.add(conn)
        return conn

    def _put(self, conn: _Connection) -> None:
        if conn.transport is None or conn.transport.is_closing():
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        self._open.discard(conn)
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    def close(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
