"""The transparent relay. Every path and method goes upstream; the status, end-to-end headers
and body the client receives are the upstream's, byte for byte, streamed as they arrive.

For the two LLM routes the relay also fills a :class:`~exporter.timeline.Timeline` and hands
the finished request to ``finish`` (metrics, spans): one cleanup path for success, upstream
failure and client disconnect alike. Instrumentation never breaks the data path: every step
that only measures is guarded, counted and logged once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from exporter.labels import OPERATIONS
from exporter.settings import Settings, shown_url
from exporter.sse import StreamScanner
from exporter.state import ProxyState
from exporter.timeline import Clock, Timeline
from exporter.transport import Pool, RequestBodyMismatch, Response, UpstreamError

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
    "Transfer-Encoding", "Upgrade", "Proxy-Connection"))
_CHUNK = 64 * 1024


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


@dataclass(slots=True)
class Exchange:
    """One LLM request as the relay saw it: what ``finish`` turns into metrics and spans."""

    operation: str
    timeline: Timeline
    wall_ns_at_arrival: int
    headers: CIMultiDictProxy[str]
    body: dict[str, Any] | None = None
    model: Any = None
    stream: bool = False
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


_REQUEST_DROP = frozenset({"host", "content-length"})
# An upstream that refuses an injected stream_options (400/422) and accepts the same request
# as the client sent it this many times in a row is not asked again: one client's odd body
# (an encoding, a schema its own server rejects) is not evidence about the upstream.
USAGE_REFUSALS_TO_STOP = 3
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
        self._sem = (asyncio.Semaphore(settings.max_concurrency)
                     if settings.max_concurrency > 0 else None)
        self._session: aiohttp.ClientSession | None = None
        self._pool: Pool | None = None
        # "probe": relay the first stream that did not ask for usage untouched and see whether
        # usage comes anyway (some servers always send it); then "inject" or "off". One probe
        # at a time: streams arriving while it runs are injected.
        self.usage_mode = "probe" if settings.inject_usage else "off"
        self._probing = False  # a probe stream is in flight
        self._refusals = 0  # injected requests refused in a row, each accepted as sent
        self._scan_error = self._scanner_error  # one bound method, not one per request
        self.base_shown = shown_url(self.base)  # for messages: no credentials

    async def start(self) -> None:
        # LLM routes go through the lean client (exporter.transport) and time reads with one
        # coarse watchdog per request (_Watchdog). Other routes keep aiohttp's client.
        self._pool = Pool(self.base, connect_timeout=self.settings.connect_timeout or None)
        timeout = aiohttp.ClientTimeout(total=None,
                                        connect=self.settings.connect_timeout or None)
        self._passthrough_timeout = aiohttp.ClientTimeout(
            total=None, connect=self.settings.connect_timeout or None,
            sock_read=self.settings.upstream_timeout or None)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, force_close=False),
            timeout=timeout, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=(hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.USER_AGENT,
                               hdrs.CONTENT_TYPE))

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Proxy.start() was not awaited"
        return self._session

    @property
    def upstream(self) -> Pool:
        assert self._pool is not None, "Proxy.start() was not awaited"
        return self._pool

    def upstream_url(self, request: web.BaseRequest) -> URL:
        return URL(self.base + _origin_form(request.raw_path), encoded=True)

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
        if length is not None:
            return None, _exactly(request.content, length)
        buf = bytearray()
        while len(buf) <= limit:
            chunk = await request.content.readany()
            if not chunk:
                return bytes(buf), None
            buf += chunk
        return None, _chain(bytes(buf), request.content)

    # --- entry point ------------------------------------------------------------------------
    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        operation = OPERATIONS.get(request.path) if request.method == hdrs.METH_POST else None
        if operation is None:
            return await self._passthrough(request)
        return await self._llm(request, operation)

    async def _passthrough(self, request: web.BaseRequest) -> web.StreamResponse:
        body, body_stream = await self._read_body(request)
        headers = _forward_headers(request.headers, _REQUEST_DROP)
        if body_stream is not None and request.content_length is not None:
            headers[hdrs.CONTENT_LENGTH] = str(request.content_length)
        try:
            up = await self.session.request(
                request.method, self.upstream_url(request), headers=headers,
                data=body_stream if body_stream is not None else (body or None),
                allow_redirects=False, timeout=self._passthrough_timeout)
        except RequestBodyMismatch as e:
            return self._short_body(request, e)
        except Exception as e:
            return self._upstream_failure(e)
        resp: web.StreamResponse | None = None
        try:
            resp = await self._prepare(request, up)
            async for data in up.content.iter_any():
                await resp.write(data)
            await resp.write_eof()
            return resp
        except ConnectionResetError:
            return resp if resp is not None else web.Response(status=499)
        except (aiohttp.ClientPayloadError, aiohttp.ServerTimeoutError, TimeoutError):
            up.close()
            _abort(request)
            return resp if resp is not None else web.Response(status=499)
        finally:
            up.close() if not up.content.at_eof() else up.release()

    def _upstream_failure(self, e: BaseException) -> web.Response:
        if isinstance(e, aiohttp.ServerTimeoutError | TimeoutError):
            self.hooks.error("upstream_timeout")
            return openai_error(504, f"upstream {self.base_shown} did not answer within "
                                f"{self.settings.upstream_timeout:g} s", "upstream_timeout")
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
                       up: aiohttp.ClientResponse | Response) -> RelayResponse:
        resp = RelayResponse(status=up.status, reason=up.reason,
                             headers=_forward_headers(up.headers, _RESPONSE_DROP))
        if request.version < (1, 1) and hdrs.CONTENT_LENGTH not in up.headers:
            # An HTTP/1.0 client learns where a body of unknown length ends only from the
            # connection closing: no keep-alive for it, whatever it asked.
            resp.force_close()
        await resp.prepare(request)
        return resp

    # --- LLM routes -------------------------------------------------------------------------
    async def _llm(self, request: web.BaseRequest, operation: str) -> web.StreamResponse:
        now, wall = self.clock(), self.wall_ns()
        # When the request's bytes were read (the server's handler notes it), if earlier.
        arrival = min(now, getattr(request.protocol, "last_rx", now))
        ex = Exchange(operation, Timeline(arrival), wall - int((now - arrival) * 1e9),
                      request.headers)
        body, body_stream = await self._read_body(request)
        send: bytes | AsyncIterator[bytes] | None = body_stream
        if body is not None:
            send = body
            self._parse_request(ex, body)
            if ex.injected_usage and ex.body is not None:
                try:
                    send = _with_usage(body, ex.body)
                except (ValueError, RecursionError):  # UnicodeEncodeError: lone surrogate
                    ex.injected_usage = False  # relayed as sent; counted from other sources
        extra = self._guard("started", self.hooks.started, ex) or {}
        headers = _forward_headers(request.headers, _REQUEST_DROP)
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
            if ex.probe_usage:
                self._probing = False  # settled, or failed: a later stream probes again
            if ex.timeline.end is None:
                ex.timeline.end = self.clock()
            if ex.cancelled:
                self.hooks.error("client_disconnect")
            self._guard("finished", self.hooks.finished, ex)

    def _parse_request(self, ex: Exchange, body: bytes) -> None:
        """What the measurement needs from the request body; a body it cannot parse (not JSON,
        compressed, nested past Python's recursion limit) is relayed and counted all the same."""
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return
        if not isinstance(obj, dict):
            return
        ex.body = obj
        ex.model = obj.get("model")
        ex.stream = obj.get("stream") is True
        opts = obj.get("stream_options")
        asked = isinstance(opts, dict) and opts.get("include_usage") is True
        if ex.stream and not asked and (opts is None or isinstance(opts, dict)):
            if self.usage_mode == "probe" and not self._probing:
                self._probing = ex.probe_usage = True  # one probe at a time
            else:
                # While the probe is out, streams ask for usage: their counts stay exact
                # (an upstream that refuses is asked again as the client asked, below).
                # Only UTF-8 bodies (what JSON on the web is): a splice into UTF-16 would
                # corrupt the client's request.
                ex.injected_usage = (self.usage_mode != "off"
                                     and json.detect_encoding(body) == "utf-8")

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
            ex.error = "upstream_timeout" if failure.status == 504 else "upstream_connect"
            return failure
        ex.status = up.status
        ex.upstream_headers = up.headers
        sse = up.status == 200 and "text/event-stream" in up.headers.get(hdrs.CONTENT_TYPE, "")
        capture = not sse or bool(self._guard("wants_capture", self.hooks.wants_capture, ex))
        resp: web.StreamResponse | None = None
        watchdog = _Watchdog(up, timeout, self.clock) if timeout else None
        try:
            resp = await self._prepare(request, up)
            write = _client_writer(request, resp, up)
            scanner = ex.scanner = StreamScanner(ex.injected_usage, self._scan_error) \
                if sse else None
            up.attach(self._sink(ex, scanner, write, capture, watchdog))
            await up.run(request.writer.drain)
            if scanner is not None:
                tail = scanner.flush()
                if tail:
                    write(tail)
                if ex.probe_usage and self.usage_mode == "probe":
                    self._settle_usage_mode(scanner)
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
                error("sse scan", e)
                n, out = 0, scanner.abandon(data)
            if out:
                write(out)
            if n:
                tl.content(t, n)
            if capture:
                ex.capture(data, limit)
        return sse

    def _scanner_error(self, what: str) -> None:
        self.hooks.instrumentation_error("sse scan", ValueError(what))

    def _refused(self) -> None:
        """An injected request was refused and the same request as sent accepted: after
        USAGE_REFUSALS_TO_STOP of them in a row, from as many requests, stop asking."""
        self._refusals += 1
        if self._refusals >= USAGE_REFUSALS_TO_STOP and self.usage_mode != "off":
            log.warning("upstream rejected stream_options.include_usage %d times in a row and "
                        "accepted the same requests without it; token counts fall back to "
                        "--tokenizer or chunks", self._refusals)
            self.usage_mode = "off"

    def _settle_usage_mode(self, scanner: StreamScanner) -> None:
        self.usage_mode = "off" if scanner.usage is not None else "inject"
        log.info("upstream %s usage on streams unasked; %s", "sends" if
                 self.usage_mode == "off" else "does not send",
                 "relaying as is" if self.usage_mode == "off" else
                 "asking for it (stream_options.include_usage) from now on")

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


async def _exactly(body: aiohttp.StreamReader, length: int) -> AsyncIterator[bytes]:
    """The client's body, which must be ``length`` bytes: a short one (the client went away)
    raises instead of leaving the upstream waiting for, or parsing, bytes that never come."""
    seen = 0
    async for chunk in body.iter_chunked(_CHUNK):
        seen += len(chunk)
        yield chunk
    if seen != length:
        raise RequestBodyMismatch(f"request body of {seen} bytes, {length} declared")


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
