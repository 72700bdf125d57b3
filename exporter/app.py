"""Wiring: the proxy listener, the metrics server, the OTLP receiver and the collectors.

:class:`Sidecar` takes everything it needs (settings, registry, tracer provider, clock) so
tests run it in-process on port 0 with fresh ones; :func:`run` is what ``llm-exporter serve``
calls and is the only place that builds the process-wide defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast
from urllib.parse import urlsplit

from aiohttp import hdrs, web, web_protocol
from opentelemetry import trace
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from exporter import labels
from exporter.instrument import Instrumentation
from exporter.looplag import LoopLag
from exporter.metrics import FlagSlos, SidecarMetrics, SloPolicy
from exporter.otlp_receiver import EngineSpanStore, build_receiver_app
from exporter.proxy import Proxy
from exporter.settings import Settings, SettingsError, shown_url
from exporter.state import ProxyState
from exporter.timeline import Clock
from exporter.tracing import RequestTracer, provider_from_env

log = logging.getLogger(__name__)


def slo_policy(settings: Settings) -> SloPolicy:
    """Latency SLOs: the SLO file's objectives (per model where it says so) when given, the
    same file the rules are generated from; else the --slo-* flags."""
    if settings.slo:
        from exporter import slo

        try:
            return slo.load(settings.slo)
        except (OSError, ValueError) as e:
            raise SettingsError(f"--slo {settings.slo}: {e}") from e
    return FlagSlos(settings.slo_ttft, settings.slo_tpot, settings.slo_e2e)


class QuietHttpLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The logger aiohttp's server gets for the proxy port. aiohttp logs an ERROR with a
    traceback for every malformed request, its message quoting the request's bytes (a
    smuggled body is prompt text). Here: one WARNING line naming the error type, no traceback,
    no message, at most one per ``every`` seconds with a count of those left out, so a hostile
    client can neither fill the disk nor read its bytes back from the log."""

    def __init__(self, logger: logging.Logger, every: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(logger, {})
        self._every, self._clock = every, clock
        self._last = -1e18
        self._held = 0

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc_info = kwargs.pop("exc_info", None)
        if not exc_info and level < logging.WARNING:
            self.logger.log(level, msg, *args, **kwargs)
            return
        now = self._clock()
        if now - self._last < self._every:
            self._held += 1
            return
        held, self._held, self._last = self._held, 0, now
        exc = exc_info if isinstance(exc_info, BaseException) else \
            sys.exc_info()[1] if exc_info is True else None
        self.logger.warning("%s%s (details not logged: they may quote request bytes)%s",
                            "request failed" if exc_info else "proxy server",
                            f": {type(exc).__name__}" if exc else "",
                            f"; {held} more since the last such line" if held else "")


class _StampingHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, noting when each read arrived: a request's arrival is when
    its bytes were read, not when the event loop got round to starting its handler (under a
    burst of requests that wait is milliseconds the client sees and the sidecar would miss).

    It also bounds how long a client may take over a request's head: the first byte of a
    request arms a timer (``head_timeout``), the handler starting disarms it; a client still
    sending its headers when it fires (slowloris) is disconnected and ``on_head_timeout``
    called. aiohttp has no such limit of its own."""

    __slots__ = ("_awaiting_head", "_head_timer", "clock", "head_timeout", "last_rx",
                 "on_head_timeout")
    clock: Clock
    last_rx: float
    head_timeout: float
    on_head_timeout: Callable[[], None]
    _awaiting_head: bool
    _head_timer: asyncio.TimerHandle | None

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.clock()
        if self._awaiting_head and self._head_timer is None and self.head_timeout:
            self._head_timer = self._loop.call_later(self.head_timeout, self._head_late)
        super().data_received(data)

    def head_in(self) -> None:
        self._awaiting_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def request_done(self) -> None:
        self._awaiting_head = True

    def _head_late(self) -> None:
        self._head_timer = None
        if self._awaiting_head and self.transport is not None:
            self.on_head_timeout()
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.head_in()
        super().connection_lost(exc)


class _Server(web.Server):
    """``web.Server`` whose connections are :class:`_StampingHandler`\\ s reading ``clock``
    and closing clients slower than ``head_timeout`` over a request's head."""

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
                 *args: Any, clock: Clock, head_timeout: float,
                 on_head_timeout: Callable[[], None] = lambda: None, **kwargs: Any) -> None:
        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            proto = cast(_StampingHandler, request.protocol)
            proto.head_in()
            try:
                return await handler(request)
            finally:
                proto.request_done()

        super().__init__(handle, *args, **kwargs)
        self._clock = clock
        self._head_timeout = head_timeout
        self._on_head_timeout = on_head_timeout

    def __call__(self) -> web_protocol.RequestHandler:
        handler = _StampingHandler(self, loop=self._loop, **self._kwargs)
        handler.clock = self._clock
        handler.last_rx = self._clock()
        handler.head_timeout = self._head_timeout
        handler.on_head_timeout = self._on_head_timeout
        handler._awaiting_head = True
        handler._head_timer = None
        return handler


class WithoutCreated:
    """A registry as exposed: without prometheus_client's ``_created`` samples, one timestamp
    per counter and histogram series (a fifth of all series) that no dashboard, rule or alert
    reads. Per registry, at scrape time: no process-wide switch flipped from library code."""

    _KINDS = frozenset({"counter", "histogram", "summary", "gaugehistogram"})

    def __init__(self, registry: Any) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for fam in self._registry.collect():
            if fam.type in self._KINDS:
                created = fam.name + "_created"
                fam.samples = [smp for smp in fam.samples if smp.name != created]
            yield fam

    def restricted_registry(self, names: Iterable[str]) -> WithoutCreated:
        return WithoutCreated(self._registry.restricted_registry(names))


class MetricsServer:
    """``/metrics`` (text or OpenMetrics with exemplars, by the scraper's Accept header;
    gzip when accepted; ``name[]`` selects families), ``/healthz`` and ``/readyz``.

    Served by an event loop of its own, in one thread: a slow collector never stalls the
    relay, and an idle or slow client costs a few hundred bytes, not a thread (a client slower
    than ``head_timeout`` over its headers is closed). Scrapes are rendered one at a time."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int,
                 ready: Callable[[], tuple[bool, str]],
                 before_scrape: Callable[[], None] = lambda: None,
                 head_timeout: float = 30.0,
                 on_head_timeout: Callable[[], None] = lambda: None) -> None:
        self._exposed = WithoutCreated(registry)
        self._on_head_timeout = on_head_timeout
        self._host, self._port = host, port
        self._ready, self._before_scrape = ready, before_scrape
        self._head_timeout = head_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.ServerRunner | None = None
        self._started = threading.Event()
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="llm-exporter-metrics")
        self.port = 0

    def start(self) -> None:
        """Listen and serve; raises the bind error (OSError) if the port cannot be had."""
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=10)

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._open())
        except OSError as e:
            self._error = e
        self._started.set()
        if self._error is None:
            loop.run_forever()
        loop.close()

    async def _open(self) -> None:
        server = _Server(self._handle, clock=time.monotonic, head_timeout=self._head_timeout,
                         on_head_timeout=self._on_head_timeout, access_log=None,
                         logger=QuietHttpLog(logging.getLogger("exporter.metrics_http")))
        runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._port, reuse_address=True).start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = _bound_port(runner)

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path == "/healthz":
            return web.Response(text="ok\n")
        if path == "/readyz":
            ok, why = self._ready()
            return web.Response(status=200 if ok else 503, text=why + "\n")
        if path in ("/metrics", "/"):
            self._before_scrape()
            encoder, ctype = choose_encoder(request.headers.get(hdrs.ACCEPT, ""))
            names = request.query.getall("name[]", [])
            body = encoder(self._exposed.restricted_registry(names) if names
                           else self._exposed)
            headers = {hdrs.CONTENT_TYPE: ctype}
            if "gzip" in request.headers.get(hdrs.ACCEPT_ENCODING, ""):
                body = gzip.compress(body, compresslevel=1)
                headers[hdrs.CONTENT_ENCODING] = "gzip"
            return web.Response(body=body, headers=headers)
        return web.Response(status=404, text="not found: try /metrics, /healthz or /readyz\n")


class UpstreamProbe:
    """Readiness: the upstream accepts TCP connections (checked at most every 2 s)."""

    def __init__(self, url: str, clock: Clock = time.monotonic) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self._clock = clock
        self._last = (-1e9, False, "")
        self._lock = threading.Lock()

    def __call__(self) -> tuple[bool, str]:
        with self._lock:
            t, ok, why = self._last
            if self._clock() - t < 2.0:
                return ok, why
            try:
                socket.create_connection((self.host, self.port), timeout=1.0).close()
                ok, why = True, f"upstream {self.host}:{self.port} reachable"
            except OSError as e:
                ok, why = False, f"upstream {self.host}:{self.port} unreachable: {e}"
            self._last = (self._clock(), ok, why)
            return ok, why


class Sidecar:
    def __init__(self, settings: Settings, registry: CollectorRegistry,
                 tracer_provider: trace.TracerProvider, *, clock: Clock = time.perf_counter,
                 state: ProxyState | None = None, collectors: bool = True,
                 record_spans: bool = True) -> None:
        if not settings.upstream:
            raise SettingsError("no upstream: start the embedded engine first (see run())")
        self.settings = settings
        self.registry = registry
        self.state = state or ProxyState()
        self.metrics = SidecarMetrics(registry, settings, self.state, slo_policy(settings))
        tokens = None
        if settings.tokenizer:
            from exporter import tokens as tokens_mod

            try:
                tokens = tokens_mod.load(settings.tokenizer)
            except (OSError, ValueError) as e:
                raise SettingsError(f"--tokenizer {settings.tokenizer}: {e}") from e
        self.spans = EngineSpanStore() if settings.otlp_receiver_port else None
        self.instrumentation = Instrumentation(
            self.metrics, RequestTracer(tracer_provider, settings.capture_content, record_spans),
            labels.ModelLabels(settings.max_models), tokens, self.spans,
            settings.engine_span_wait)
        self.proxy = Proxy(settings, self.instrumentation, self.state, clock=clock)
        self._probe = UpstreamProbe(settings.upstream)
        self.loop_lag = LoopLag(self.metrics.loop_lag.observe, clock)
        self._started = False
        self._runners: list[web.BaseRunner] = []
        self._metrics_server: MetricsServer | None = None
        self.port = 0
        self.receiver_port = 0
        if collectors:
            self._register_collectors()

    def _register_collectors(self) -> None:
        try:
            from exporter.collectors import register_collectors
        except ImportError as e:  # pragma: no cover - the package ships them
            log.warning("collectors unavailable: %s", e)
            return
        register_collectors(self.registry, self.settings, self.state,
                            on_error=lambda where: self.metrics.instrumentation_error(where))

    def ready(self) -> tuple[bool, str]:
        if not self._started:
            return False, "starting"
        return self._probe()

    @property
    def metrics_port(self) -> int:
        return self._metrics_server.port if self._metrics_server else 0

    async def start(self) -> None:
        s = self.settings
        await self.proxy.start()
        # auto_decompress off: request bodies are relayed exactly as the client sent them. An
        # inflated body forwarded under the compressed Content-Length smuggles requests into
        # the pooled upstream connection, and a small gzip body inflates to gigabytes.
        server = _Server(self.proxy.handle, handler_cancellation=True, access_log=None,
                         auto_decompress=False, clock=self.proxy.clock,
                         head_timeout=s.client_header_timeout,
                         on_head_timeout=lambda: self.metrics.error("client_timeout"),
                         logger=QuietHttpLog(logging.getLogger("exporter.http")))
        runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, s.host, s.port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            await self.proxy.close()
            raise SettingsError(f"cannot listen on {s.host}:{s.port} (--port): {e.strerror}") \
                from e
        self._runners.append(runner)
        self.port = _bound_port(runner)
        if self.spans is not None:
            app = build_receiver_app(self.spans, on_error=lambda kind: self.metrics.error(
                "instrumentation"))
            rrunner = web.AppRunner(app, handle_signals=False, access_log=None)
            await rrunner.setup()
            await web.TCPSite(rrunner, s.host, s.otlp_receiver_port).start()
            self._runners.append(rrunner)
            self.receiver_port = _bound_port(rrunner)
        loop = asyncio.get_running_loop()
        self._metrics_server = MetricsServer(
            self.registry, s.metrics_host, s.metrics_port, self.ready,
            before_scrape=lambda: self.instrumentation.flush_from_thread(loop),
            head_timeout=s.client_header_timeout,
            on_head_timeout=lambda: self.metrics.error("client_timeout"))
        try:
            self._metrics_server.start()
        except OSError as e:
            await self.stop()
            raise SettingsError(f"cannot listen on {s.metrics_host}:{s.metrics_port} "
                                f"(--metrics-port): {e.strerror}") from e
        self.loop_lag.start()
        self._started = True

    async def stop(self) -> None:
        self._started = False
        await self.loop_lag.stop()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        await self.instrumentation.close()
        await self.proxy.close()
        if self._metrics_server is not None:
            self._metrics_server.stop()
            self._metrics_server = None


def _bound_port(runner: web.BaseRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            return int(addr[1])
    return 0


def run(settings: Settings) -> int:
    """``llm-exporter serve``: start (the embedded engine and) the sidecar until a signal."""
    engine = None
    state = ProxyState()
    if not settings.upstream:
        from exporter.engine.launch import EngineStartError, start_engine

        log.info("no --upstream: starting the embedded engine")
        try:
            engine = start_engine(settings.model, "127.0.0.1", settings.engine_port,
                                  settings.max_batch, settings.engine_max_queue, settings.device)
        except EngineStartError as e:
            raise SettingsError(f"the embedded engine did not start: {e}") from e
        settings = settings.replace(upstream=engine.url)
        state.engine_pid, state.engine = engine.pid, "embedded"
    elif settings.engine_pid:
        state.engine_pid = settings.engine_pid
    runner: Callable[[Any], int] = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    try:
        return runner(_serve(settings, state))
    finally:
        if engine is not None:
            engine.stop()


async def _serve(settings: Settings, state: ProxyState) -> int:
    provider, exporting = provider_from_env(os.environ)
    sidecar = Sidecar(settings, CollectorRegistry(), provider, state=state,
                      record_spans=exporting)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await sidecar.start()
    # Everything built so far lives as long as the process: keep the collector from
    # re-scanning it on every full collection (per-request garbage is still collected).
    gc.collect()
    gc.freeze()
    log.info("proxy on http://%s:%d -> %s; metrics on http://%s:%d/metrics",
             settings.host, sidecar.port, shown_url(settings.upstream), settings.metrics_host,
             sidecar.metrics_port)
    if sidecar.receiver_port:
        log.info("OTLP receiver for engine spans on http://127.0.0.1:%d/v1/traces",
                 sidecar.receiver_port)
    await stop.wait()
    log.info("shutting down")
    await sidecar.stop()
    provider.shutdown()
    return 0
