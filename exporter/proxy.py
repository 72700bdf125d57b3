"""The transparent relay. Every path and method goes upstream; the status, end-to-end headers
and body the client receives are the upstream's, byte for byte, streamed as they arrive.

The route table (exporter.protocols) says which inference API a request speaks; for those the
relay also fills a :class:`~exporter.timeline.Timeline` and hands
the finished request to ``finish`` (metrics, spans): one cleanup path for success, upstream
failure and client disconnect alike. Instrumentation never breaks the data path: every step
that only measures is guarded, counted and logged once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
from aiohttp import hdrs, web
from aiohttp.http_writer import StreamWriter
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from exporter.protocols import Protocol, RouteTable, StreamScanner, parse_route
from exporter.settings import Settings, shown_url
from exporter.state import ProxyState
from exporter.timeline import Clock, Timeline
from exporter.transport import (
    Pool,
    RequestBodyMismatch,
    Response,
    UpstreamError,
    UpstreamProtocolError,
)

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
    "Transfer-Encoding", "Upgrade", "Proxy-Connection"))
_CHUNK = 64 * 1024
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes decoded with surrogateescape


class RelayResponse(web.StreamResponse):
    """A StreamResponse that adds nothing of its own: aiohttp would add ``Server``, ``Date``
    and ``Content-Type`` when the upstream sent none."""

    def __init__(self, *, status: int, reason: str | None, headers: CIMultiDict[str]) -> None:
        super().__init__(status=status, reason=reason, headers=headers)
        self._absent = [h for h in (hdrs.SERVER, hdrs.DATE, hdrs.CONTENT_TYPE) if h not in headers]

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        for h in self._absent:
            self._headers.popall(h, None)

    async def _write_headers(self) -> None:
        """aiohttp's serializer drops header bytes that are not UTF-8; the upstream's go out
        as they came (the transport decoded them with ``surrogateescape``)."""
        if not any(_NOT_UTF8.search(v) for v in (self._reason or "", *self._headers.keys(),
                                                  *self._headers.values())):
            await super()._write_headers()
            return
        request, writer = self._req, cast(StreamWriter, self._payload_writer)
        assert request is not None and writer is not None
        lines = [f"HTTP/{request.version[0]}.{request.version[1]} {self._status} "
                 f"{self._reason}", *(f"{k}: {v}" for k, v in self._headers.items())]
        if any("\r" in line or "\n" in line for line in lines):  # llhttp never yields one
            raise ValueError("a response header holds a line break")
        head = "\r\n".join(lines) + "\r\n\r\n"
        writer._headers_buf = head.encode("utf-8", "surrogateescape")
        writer._headers_written = False
        writer.send_headers()


@dataclass(slots=True)
class Exchange:
    """One measured request as the relay saw it: what ``finish`` turns into metrics and spans."""

    protocol: Protocol
    timeline: Timeline
    wall_ns_at_arrival: int
    headers: CIMultiDictProxy[str]
    body: dict[str, Any] | None = None
    model: Any = None
    stream: bool = False
    inputs: int | None = None  # batch size (embeddings, rerank…)
    attrs: dict[str, Any] = field(default_factory=dict)  # the protocol's GenAI request attributes
    injected_usage: bool = False
    probe_usage: bool = False
    status: int | None = None
    upstream_headers: CIMultiDictProxy[str] | None = None
    scanner: StreamScanner | None = None
    # Copy of the response body (non-streaming, or streams kept for a tokenizer), bounded.
    captured: list[bytes] = field(default_factory=list)
    captured_bytes: int = 0
    capture_overflow: bool = False
    error: str | None = None  # errors_total type, or None
    cancelled: bool = False
    span: Any = None

    @property
    def operation(self) -> str:
        return self.protocol.operation

    def capture(self, data: bytes, limit: int) -> None:
        if self.capture_overflow:
            return
        self.captured_bytes += len(data)
        if self.captured_bytes > limit:
            self.capture_overflow = True
            self.captured.clear()
        else:
            self.captured.append(data)


class Hooks:
    """What the relay calls to measure; the app wires it to metrics and tracing."""

    def started(self, ex: Exchange) -> dict[str, str]:
        """Called once the request body is known; returns headers to add upstream."""
        return {}

    def finished(self, ex: Exchange) -> None: ...

    def unmatched(self, method: str, status: int | None, seconds: float) -> None:
        """A request no route matched, relayed (or failed) after ``seconds``."""

    def error(self, kind: str) -> None: ...

    def instrumentation_error(self, where: str, exc: BaseException) -> None: ...

    def wants_capture(self, ex: Exchange) -> bool:
        return False


def openai_error(status: int, message: str, kind: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status)


def _forward_headers(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> CIMultiDict[str]:
    conn = {t.strip().lower() for v in headers.getall(hdrs.CONNECTION, [])
            for t in v.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        lk = k.lower()
        if lk in HOP_BY_HOP or lk in conn or lk in drop:
            continue
        out.add(k, v)
    return out


# Expect is answered by the sidecar itself (100 Continue), never by the upstream.
_REQUEST_DROP = frozenset({"host", "content-length", "expect"})
_XFF = "X-Forwarded-For"
# An upstream that refuses an injected stream_options (400/422) and accepts the same request
# as the client sent it this many times in a row is not asked again: one client's odd body
# (an encoding, a schema its own server rejects) is not evidence about the upstream.
USAGE_REFUSALS_TO_STOP = 3
# Models whose usage behaviour is learnt one by one; further ones are asked without a probe.
MAX_PROBED = 256
_RESPONSE_DROP: frozenset[str] = frozenset()


class Proxy:
    def __init__(self, settings: Settings, hooks: Hooks, state: ProxyState,
                 clock: Clock = time.perf_counter,
                 wall_ns: Callable[[], int] = time.time_ns) -> None:
        self.settings = settings
        self.hooks = hooks
        self.state = state
        self.clock = clock
        self.wall_ns = wall_ns
        self.base = settings.upstream.rstrip("/")
        self.routes = RouteTable(parse_route(r) for r in settings.route)
        self._sem = (asyncio.Semaphore(settings.max_concurrency)
                     if settings.max_concurrency > 0 else None)
        self._pool: Pool | None = None
        # "probe": for each model, relay its first stream that did not ask for usage untouched
        # and see whether usage comes anyway (some servers send it for some models); then
        # "inject" or "off" for that model. One probe per model at a time: streams arriving
        # while it runs are injected. "inject" / "off" here hold for every model.
        self.usage_mode = "probe" if settings.inject_usage else "off"
        self._model_usage: dict[str, str] = {}  # settled per model (bounded, MAX_PROBED)
        self._probing: set[str] = set()  # models with a probe stream in flight
        self._refusals = 0  # injected requests refused in a row, each accepted as sent
        self._scan_error = self._scanner_error  # one bound method, not one per request
        self.base_shown = shown_url(self.base)  # for messages: no credentials

    async def start(self) -> None:
        # Every route goes through the lean client (exporter.transport); reads are timed by
        # one coarse watchdog per request (_Watchdog).
        self._pool = Pool(self.base, connect_timeout=self.settings.connect_timeout or None)

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    @property
    def upstream(self) -> Pool:
        assert self._pool is not None, "Proxy.start() was not awaited"
        return self._pool

    # --- request bodies -------------------------------------------------------------------
    async def _read_body(self, request: web.BaseRequest) -> tuple[bytes | None,
                                                              AsyncIterator[bytes] | None]:
        """The whole body when it is within the parse limit, else a stream of it (untouched)."""
        if not request.body_exists:
            return b"", None
        limit = self.settings.parse_limit
        length = request.content_length
        if length is not None and length <= limit:
            return await request.content.read(), None
        if length is not None:  # Pool._send_stream holds it to exactly that length
            return None, request.content.iter_chunked(_CHUNK)
        buf = bytearray()
        while len(buf) <= limit:
            chunk = await request.content.readany()
            if not chunk:
                return bytes(buf), None
            buf += chunk
        return None, _chain(bytes(buf), request.content)

    # --- entry point ------------------------------------------------------------------------
    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        expect = request.headers.get(hdrs.EXPECT)
        if expect is not None:
            if expect.strip().lower() != "100-continue":
                return openai_error(417, "only 'Expect: 100-continue' is understood",
                                    "invalid_request_error")
            if request.version >= (1, 1) and request.body_exists and \
                    request.transport is not None:
                # The client waits for this before it sends its body (curl does for bodies
                # over 1 MiB); the upstream never sees the Expect header (dropped below).
                request.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        protocol = self.routes.match(request.method, request.path)
        if protocol is None:
            return await self._unmatched(request)
        return await self._llm(request, protocol)

    def _headers_out(self, request: web.BaseRequest) -> CIMultiDict[str]:
        """The client's end-to-end headers as the upstream gets them, with X-Forwarded-For
        as --forwarded-for says (default: the client's list with its peer appended, as
        nginx's ``$proxy_add_x_forwarded_for``)."""
        headers = _forward_headers(request.headers, _REQUEST_DROP)
        mode = self.settings.forwarded_for
        if mode != "pass":
            peer = request.transport.get_extra_info("peername") if request.transport else None
            addr = peer[0] if isinstance(peer, tuple) and peer else None
            given = ", ".join(headers.popall(_XFF, ()))
            if mode == "append" and given:
                headers[_XFF] = f"{given}, {addr}" if addr else given
            elif addr:
                headers[_XFF] = addr
        return headers

    async def _unmatched(self, request: web.BaseRequest) -> web.StreamResponse:
        """A request no route matched: relayed all the same, counted by method and status."""
        t0 = self.clock()
        status: int | None = None
        try:
            resp = await self._passthrough(request)
            status = resp.status
            return resp
        finally:
            try:
                self.hooks.unmatched(request.method, status, self.clock() - t0)
            except Exception as e:
                self.hooks.instrumentation_error("unmatched", e)

    async def _passthrough(self, request: web.BaseRequest) -> web.StreamResponse:
        """Relayed byte for byte on the same upstream connections, nothing measured."""
        body, body_stream = await self._read_body(request)
        timeout = self.settings.upstream_timeout or None
        try:
            async with asyncio.timeout(timeout):
                up = await self._send(request, self._headers_out(request),
                                      body_stream if body_stream is not None else body)
        except RequestBodyMismatch as e:
            return self._short_body(request, e)
        except Exception as e:
            return self._upstream_failure(e)
        resp: web.StreamResponse | None = None
        watchdog = _Watchdog(up, timeout, self.clock) if timeout else None
        try:
            resp = await self._prepare(request, up)
            write = _client_writer(request, resp, up)
            if watchdog is None:
                up.attach(write)
            else:
                def sink(data: bytes) -> None:
                    watchdog.last = self.clock()
                    write(data)
                up.attach(sink)
            await up.run(request.writer.drain)
            await resp.write_eof()
            return resp
        except ConnectionResetError:
            return resp if resp is not None else web.Response(status=499)
        except (UpstreamError, TimeoutError) as e:
            self.hooks.error("upstream_timeout" if isinstance(e, TimeoutError)
                             else "upstream_protocol")
            _abort(request)
            return resp if resp is not None else web.Response(status=499)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            up.close()

    def _upstream_failure(self, e: BaseException) -> web.Response:
        if isinstance(e, TimeoutError):
            self.hooks.error("upstream_timeout")
            return openai_error(504, f"upstream {self.base_shown} did not answer within "
                                f"{self.settings.upstream_timeout:g} s", "upstream_timeout")
        if isinstance(e, UpstreamProtocolError):
            self.hooks.error("upstream_protocol")
            log.warning("upstream %s: %s", self.base_shown, e)
            return openai_error(502, f"upstream {self.base_shown} sent no usable response: "
                                f"{e}", "upstream_protocol")
        self.hooks.error("upstream_connect")
        why = shown_url(str(e))
        log.warning("upstream %s unreachable: %s", self.base_shown, why)
        return openai_error(502, f"upstream {self.base_shown} unreachable: {why}",
                            "upstream_unreachable")

    def _short_body(self, request: web.BaseRequest, e: RequestBodyMismatch) -> web.Response:
        """The client's body did not match its Content-Length (it went away, or lied): the
        upstream connection that carried part of it is closed, never reused."""
        self.hooks.error("client_disconnect")
        _abort(request)
        return openai_error(400, str(e), "invalid_request_error")

    async def _prepare(self, request: web.BaseRequest,
                       up: Response) -> RelayResponse:
        resp = RelayResponse(status=up.status, reason=up.reason,
                             headers=_forward_headers(up.headers, _RESPONSE_DROP))
        if request.version < (1, 1) and hdrs.CONTENT_LENGTH not in up.headers:
            # An HTTP/1.0 client learns where a body of unknown length ends only from the
            # connection closing: no keep-alive for it, whatever it asked.
            resp.force_close()
        await resp.prepare(request)
        return resp

    # --- LLM routes -------------------------------------------------------------------------
    async def _llm(self, request: web.BaseRequest, protocol: Protocol) -> web.StreamResponse:
        now, wall = self.clock(), self.wall_ns()
        # When the request's bytes were read (the server's handler notes it), if earlier.
        arrival = min(now, getattr(request.protocol, "last_rx", now))
        ex = Exchange(protocol, Timeline(arrival), wall - int((now - arrival) * 1e9),
                      request.headers)
        body, body_stream = await self._read_body(request)
        send: bytes | AsyncIterator[bytes] | None = body_stream
        if body is not None:
            send = body
            self._parse_request(ex, body, request.path)
            if ex.injected_usage and ex.body is not None:
                try:
                    send = _with_usage(body, ex.body)
                except (ValueError, RecursionError):  # UnicodeEncodeError: lone surrogate
                    ex.injected_usage = False  # relayed as sent; counted from other sources
        extra = self._guard("started", self.hooks.started, ex) or {}
        headers = self._headers_out(request)
        for k in extra:
            headers.popall(k, None)
        headers.update(extra)

        admitted = False
        try:
            if self._sem is not None:
                if self.settings.max_queue and self.state.queued >= self.settings.max_queue:
                    self.hooks.error("queue_full")
                    ex.status = 429
                    ex.error = "queue_full"
                    return openai_error(429, "the sidecar's queue is full; retry later",
                                        "queue_full")
                self.state.queued += 1
                try:
                    await self._sem.acquire()
                finally:
                    self.state.queued -= 1
            admitted = True
            ex.timeline.admitted = self.clock()
            self.state.in_flight += 1
            return await self._relay_llm(request, ex, headers, send, body)
        except asyncio.CancelledError:
            ex.cancelled = True
            raise
        finally:
            if admitted:
                self.state.in_flight -= 1
                if self._sem is not None:
                    self._sem.release()
            if ex.probe_usage:  # settled, or failed: a later stream probes again
                self._probing.discard(ex.model if isinstance(ex.model, str) else "")
            if ex.timeline.end is None:
                ex.timeline.end = self.clock()
            if ex.cancelled:
                self.hooks.error("client_disconnect")
            self._guard("finished", self.hooks.finished, ex)

    def _parse_request(self, ex: Exchange, body: bytes, path: str) -> None:
        """What the measurement needs from the request body; a body it cannot parse (not JSON,
        compressed, nested past Python's recursion limit) is relayed and counted all the same."""
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return
        if not isinstance(obj, dict):
            return
        ex.body = obj
        try:
            if ex.protocol.pick is not None:
                ex.protocol = ex.protocol.pick(obj)
            info = ex.protocol.request(obj, path)
        except Exception as e:  # a protocol's reader met a shape it did not expect
            self.hooks.instrumentation_error("request " + ex.protocol.name, e)
            return
        ex.model, ex.stream, ex.inputs, ex.attrs = info.model, info.stream, info.inputs, \
            info.attrs
        if ex.protocol.inject_usage:
            self._plan_usage(ex, obj, body)

    def _plan_usage(self, ex: Exchange, obj: dict[str, Any], body: bytes) -> None:
        opts = obj.get("stream_options")
        # Only a request that plainly did not ask (no stream_options, no include_usage, or
        # include_usage false) is changed: a value of another type (1, "true") is the client's
        # and the upstream's business, relayed as sent with its answer.
        unasked = opts is None or (isinstance(opts, dict) and (
            opts.get("include_usage") is None or opts.get("include_usage") is False))
        if ex.stream and unasked:
            mode = self._usage_mode(ex.model)
            if mode == "off":
                return
            key = ex.model if isinstance(ex.model, str) else ""
            if mode == "probe" and key not in self._probing:
                self._probing.add(key)  # one probe per model at a time
                ex.probe_usage = True
            else:
                # While the probe is out, streams ask for usage: their counts stay exact
                # (an upstream that refuses is asked again as the client asked, below).
                # Only UTF-8 bodies (what JSON on the web is): a splice into UTF-16 would
                # corrupt the client's request.
                ex.injected_usage = json.detect_encoding(body) == "utf-8"

    def _usage_mode(self, model: Any) -> str:
        if self.usage_mode != "probe":
            return self.usage_mode
        key = model if isinstance(model, str) else ""
        default = "probe" if len(self._model_usage) < MAX_PROBED else "inject"
        return self._model_usage.get(key, default)

    async def _send(self, request: web.BaseRequest, headers: CIMultiDict[str],
                    data: bytes | AsyncIterator[bytes] | None) -> Response:
        length = None if isinstance(data, bytes | None) else request.content_length
        return await self.upstream.request(request.method, _origin_form(request.raw_path),
                                           headers.items(),
                                           data, length)

    async def _relay_llm(self, request: web.BaseRequest, ex: Exchange, headers: CIMultiDict[str],
                         send: bytes | AsyncIterator[bytes] | None,
                         original: bytes | None) -> web.StreamResponse:
        ex.timeline.dispatched = self.clock()
        timeout = self.settings.upstream_timeout or None
        try:
            async with asyncio.timeout(timeout):
                up = await self._send(request, headers, send)
            if ex.injected_usage and up.status in (400, 422) and original is not None:
                # The upstream refused stream_options: ask again exactly as the client did.
                up.close()
                ex.injected_usage = False
                async with asyncio.timeout(timeout):
                    up = await self._send(request, headers, original)
                if up.status < 400:
                    self._refused()
            elif ex.injected_usage and up.status < 400:
                self._refusals = 0
        except RequestBodyMismatch as e:
            ex.status, ex.error = 400, "client_disconnect"
            return self._short_body(request, e)
        except Exception as e:
            failure = self._upstream_failure(e)
            ex.status = failure.status
            ex.error = ("upstream_timeout" if failure.status == 504 else "upstream_protocol"
                        if isinstance(e, UpstreamProtocolError) else "upstream_connect")
            return failure
        ex.status = up.status
        ex.upstream_headers = up.headers
        dialect = ex.protocol.dialect
        if dialect is not None and (up.status != 200 or not any(
                t in up.headers.get(hdrs.CONTENT_TYPE, "") for t in dialect.framing.content_types)):
            dialect = None  # not a stream: an error body, or a complete response
        capture = dialect is None or bool(self._guard("wants_capture", self.hooks.wants_capture,
                                                       ex))
        resp: web.StreamResponse | None = None
        watchdog = _Watchdog(up, timeout, self.clock) if timeout else None
        try:
            resp = await self._prepare(request, up)
            write = _client_writer(request, resp, up)
            scanner = ex.scanner = StreamScanner(dialect, ex.injected_usage, self._scan_error) \
                if dialect is not None else None
            up.attach(self._sink(ex, scanner, write, capture, watchdog))
            await up.run(request.writer.drain)
            if scanner is not None:
                n, tail = scanner.flush()
                if n:
                    ex.timeline.content(self.clock(), n)
                if tail:
                    write(tail)
                if ex.probe_usage and self.usage_mode == "probe":
                    self._settle_usage_mode(ex, scanner)
            ex.timeline.end = self.clock()
            await resp.write_eof()
            return resp
        except ConnectionResetError:
            # The client went away while we wrote: a cancellation, not an error of ours.
            # Returning the prepared response lets aiohttp finish quietly.
            ex.cancelled = True
            return resp if resp is not None else web.Response(status=499)
        except (UpstreamError, TimeoutError) as e:
            timed_out = isinstance(e, TimeoutError)
            ex.error = "upstream_timeout" if timed_out else "upstream_protocol"
            self.hooks.error(ex.error)
            ex.timeline.end = self.clock()
            if not timed_out:
                log.warning("%s", e)
            _abort(request)  # the client sees the stream cut off, as it was upstream
            return resp if resp is not None else web.Response(status=499)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            up.close()

    def _sink(self, ex: Exchange, scanner: StreamScanner | None, write: Callable[[bytes], None],
              capture: bool, watchdog: _Watchdog | None) -> Callable[[bytes], None]:
        """The hot path, run in the event loop's read callback for every upstream read: one
        clock read, one scan, one write. Nothing here awaits or allocates per token."""
        tl = ex.timeline
        clock = self.clock
        limit = self.settings.parse_limit
        if scanner is None:
            def body(data: bytes) -> None:
                if watchdog is not None:
                    watchdog.last = clock()
                write(data)
                ex.capture(data, limit)
            return body
        feed = scanner.feed
        error = self.hooks.instrumentation_error

        def sse(data: bytes) -> None:
            t = clock()
            if watchdog is not None:
                watchdog.last = t
            try:
                n, out = feed(data)
            except Exception as e:  # never let measuring cost the client a byte
                error("stream scan", e)
                n, out = 0, scanner.abandon(data)
            if out:
                write(out)
            if n:
                tl.content(t, n)
            if capture:
                ex.capture(data, limit)
        return sse

    def _scanner_error(self, what: str) -> None:
        self.hooks.instrumentation_error("stream scan", ValueError(what))

    def _refused(self) -> None:
        """An injected request was refused and the same request as sent accepted: after
        USAGE_REFUSALS_TO_STOP of them in a row, from as many requests, stop asking."""
        self._refusals += 1
        if self._refusals >= USAGE_REFUSALS_TO_STOP and self.usage_mode != "off":
            log.warning("upstream rejected stream_options.include_usage %d times in a row and "
                        "accepted the same requests without it; token counts fall back to "
                        "--tokenizer or chunks", self._refusals)
            self.usage_mode = "off"

    def _settle_usage_mode(self, ex: Exchange, scanner: StreamScanner) -> None:
        mode = "off" if scanner.reply.usage_seen else "inject"
        key = ex.model if isinstance(ex.model, str) else ""
        if key not in self._model_usage and len(self._model_usage) < MAX_PROBED:
            self._model_usage[key] = mode
            log.info("upstream %s usage on streams unasked for one model; %s", "sends" if
                     mode == "off" else "does not send", "relaying its streams as they are"
                     if mode == "off" else "asking for it (stream_options.include_usage) "
                     "from now on")

    def _guard(self, where: str, fn: Callable[[Exchange], Any], ex: Exchange) -> Any:
        try:
            return fn(ex)
        except Exception as e:
            self.hooks.instrumentation_error(where, e)
            return None


class _Watchdog:
    """Closes the upstream response when no byte came for ``timeout`` seconds. One timer per
    request, re-armed only when it fires early; the relay just stamps ``last`` per read."""

    __slots__ = ("_clock", "_handle", "_loop", "_timeout", "_up", "last")

    def __init__(self, up: Response, timeout: float, clock: Clock) -> None:
        self._up, self._timeout, self._clock = up, timeout, clock
        self._loop = asyncio.get_running_loop()
        self.last = clock()
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(timeout, self._check)

    def _check(self) -> None:
        if self._up.drain_wanted:  # waiting for the client, not for the upstream
            self.last = self._clock()
        idle = self._clock() - self.last
        if idle >= self._timeout:
            self._up.abort(TimeoutError(f"upstream sent nothing for {self._timeout:g} s"))
        else:
            self._handle = self._loop.call_later(self._timeout - idle, self._check)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None  # it holds our bound method: leave no cycle to the collector


def _client_writer(request: web.BaseRequest, resp: web.StreamResponse,
                   up: Response) -> Callable[[bytes], None]:
    """Write body bytes straight to the client's transport once ``resp`` sent its headers,
    framed as aiohttp framed the response (chunked, or raw when it has a length or the client
    speaks HTTP/1.0). Reading from the upstream pauses while the client's buffer is full."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("the client went away")
    chunked = resp.headers.get(hdrs.TRANSFER_ENCODING, "").lower() == "chunked"
    high = transport.get_write_buffer_limits()[1]

    def write(data: bytes) -> None:
        if transport.is_closing():
            raise ConnectionResetError("the client went away")
        transport.write(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
        if transport.get_write_buffer_size() > high:
            up.want_drain()
    return write


def _with_usage(raw: bytes, body: dict[str, Any]) -> bytes:
    """The client's request asking for the usage chunk. Usually a splice before the closing
    brace, keeping every byte the client sent; re-encoded only when stream_options exists."""
    if b'"stream_options"' not in raw:
        end = raw.rstrip().rfind(b"}")
        if end > 0:
            head = raw[:end].rstrip()
            sep = b"" if head.endswith(b"{") else b","
            return head + sep + b'"stream_options":{"include_usage":true}' + raw[end:]
    opts = dict(body.get("stream_options") or {})
    opts["include_usage"] = True
    return json.dumps({**body, "stream_options": opts}, ensure_ascii=False,
                      separators=(",", ":")).encode()


async def _chain(first: bytes, rest: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest.iter_chunked(_CHUNK):
        yield chunk


def _origin_form(target: str) -> str:
    """The request target as the upstream gets it: an absolute-form target
    (``POST http://host/v1/... HTTP/1.1``, proxy style) becomes its path and query; the
    sidecar is the upstream's only client, not a forward proxy to wherever the client names."""
    if target.startswith("/") or "://" not in target:
        return target
    return URL(target, encoded=True).raw_path_qs or "/"


def _abort(request: web.BaseRequest) -> None:
    if request.transport is not None:
        request.transport.close()
