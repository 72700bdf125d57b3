"""A deterministic synthetic OpenAI-shaped upstream, for tests and the relay benchmark.

Behaviour per request comes from a :class:`Script`: the server's ``default``, or the JSON object
in the request header ``x-synthetic`` (any subset of Script's fields; ``error_body`` and
``raw_body`` given as strings are UTF-8 encoded).

Deterministic output (so streams hash the same on every run):

- token ``i`` is the word ``f"t{i} "``; an event carrying k tokens carries k such words, so a
  whitespace tokenizer counts exactly. The last event carries the remainder.
- ``prompt_tokens`` = number of whitespace-separated words in the prompt: the string contents of
  all ``messages`` (string content, or the ``text`` of each text part) for chat; ``prompt``
  (string, list of strings, or a list of token ids counted one per id) for text completions.
- ids and ``created`` are fixed (``chatcmpl-1`` / ``cmpl-1``, 1700000000); JSON is compact.

Streaming timing: the response headers go out at once (after ``hang``), then for chat the
role-only chunk (empty content) immediately; content event ``j`` (0-based) is written at
``t0 + ttft + j * itl`` where ``t0`` is when the handler started (request headers in), scheduled
against absolute deadlines so errors don't accumulate. Each event is one ``await resp.write()``.
After the last content event, the finish chunk, the usage chunk when asked for, and
``data: [DONE]`` follow at once (each its own write).

Clock: ``time.monotonic()`` (on Linux the same CLOCK_MONOTONIC as ``time.perf_counter()``).
Each :class:`RequestRecord` keeps when its handler started, when headers went out, and when each
content event's ``write`` returned, so tests can compare the sidecar's figures with what was
really sent rather than with what was programmed.

``POST /v1/embeddings``: one vector per input, ``prompt_tokens`` = the inputs' words.

Other routes: ``GET /v1/models``, ``GET /health``, ``/echo[/anything]`` (any method: answers the
request body as-is, with the request's content type and ``x-echo-method`` / ``x-echo-path``
headers), ``/headers`` (the request headers as JSON), ``GET /big?size=N[&chunked=1]`` (N bytes of
a deterministic pattern, default 8 MiB), ``/status/{code}`` (that status, an OpenAI-shaped error
body). Anything else: 404 with an OpenAI-shaped error.

Run alone: ``python -m tests.upstream --port 8080 --ttft 0.05 --itl 0.01 --tokens 16``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from aiohttp import web

CREATED = 1700000000
SYNTHETIC_HEADER = "x-synthetic"
CHAT_PATH = "/v1/chat/completions"
TEXT_PATH = "/v1/completions"
DEFAULT_MODEL = "synthetic"
BIG_DEFAULT = 8 * 1024 * 1024
clock: Callable[[], float] = time.monotonic


@dataclass
class Script:
    """Behaviour of one request."""

    ttft: float = 0.05  # seconds from request to first content chunk
    itl: float = 0.01  # seconds between content chunks
    tokens: int = 16  # content tokens to generate
    tokens_per_chunk: int = 1  # tokens carried by one SSE event
    usage: str = "auto"  # auto: usage chunk only if stream_options.include_usage; never; always
    status: int = 200  # non-200: answer this status with error_body
    error_body: bytes | None = None  # default: an OpenAI-shaped JSON error
    cut_after: int | None = None  # abort the connection after N content chunks
    role_chunk: bool = True  # chat: first chunk carries only the role (empty content)
    finish_reason: str = "stop"
    content_type: str | None = None  # override the response content type
    raw_body: bytes | None = None  # answer exactly these bytes (non-stream)
    hang: float = 0.0  # sleep before sending headers (for timeout tests)
    # A server that slows with load: TTFT grows by this much per other stream in flight when
    # the request arrives, and ITL by ``itl_per_active`` (for calibrate's capacity tests).
    ttft_per_active: float = 0.0
    itl_per_active: float = 0.0

    @classmethod
    def from_json(cls, text: str | bytes, base: Script | None = None) -> Script:
        """``base`` with the fields the JSON object names replaced."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("x-synthetic must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown Script fields: {sorted(unknown)}")
        for key in ("error_body", "raw_body"):
            if isinstance(data.get(key), str):
                data[key] = data[key].encode()
        return dataclasses.replace(base or cls(), **data)

    def header(self, **changes: Any) -> dict[str, str]:
        """Request headers that make the upstream follow this script (with ``changes``)."""
        return script_header(dataclasses.replace(self, **changes))

    @property
    def chunks(self) -> int:
        """Number of content events a full response carries."""
        return math.ceil(self.tokens / self.tokens_per_chunk) if self.tokens > 0 else 0


def script_header(script: Script | None = None, **fields: Any) -> dict[str, str]:
    """``{"x-synthetic": json}`` for a script, or for just the given fields."""
    data: dict[str, Any] = dataclasses.asdict(script) if script is not None else {}
    data.update(fields)
    for key in ("error_body", "raw_body"):
        if isinstance(data.get(key), bytes):
            data[key] = data[key].decode()
    return {SYNTHETIC_HEADER: json.dumps(data)}


@dataclass
class Event:
    """One thing the server did, for tests that want a flat log."""

    request: int  # index into SyntheticUpstream.requests
    kind: str  # "start" | "headers" | "chunk" | "end" | "client_gone" | "cut"
    t: float  # clock()
    index: int = -1  # chunk index for "chunk"


@dataclass
class RequestRecord:
    """What arrived, and what the server did with it (times from ``clock()``)."""

    index: int
    method: str
    path: str  # path with query string
    headers: dict[str, str]  # lower-case keys (repeated headers joined with ", ")
    body: bytes
    script: Script
    started_at: float  # handler started (request headers in)
    stream: bool = False
    model: str | None = None
    json: Any = None  # the parsed body when it was JSON
    headers_sent_at: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # each content event's write returned
    chunk_tokens: list[int] = field(default_factory=list)  # tokens each content event carried
    finished_at: float | None = None  # last byte written (or the cut)
    closed_early: bool = False  # the client went away before the response ended
    closed_at: float | None = None  # when the server noticed the client had gone
    cut: bool = False  # the server aborted the stream (Script.cut_after)
    status: int | None = None

    @property
    def completion_tokens(self) -> int:
        return sum(self.chunk_tokens)

    def gaps(self) -> list[float]:
        """Gaps between consecutive content events as really written (seconds)."""
        t = self.chunk_times
        return [b - a for a, b in itertools.pairwise(t)]

    @property
    def ttft(self) -> float | None:
        """Handler start -> first content event written."""
        return self.chunk_times[0] - self.started_at if self.chunk_times else None


def count_words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)  # token ids
        return sum(count_words(v) for v in value)
    if isinstance(value, dict):
        # A content part: {"type": "text", "text": ...}; other parts carry no words.
        return count_words(value.get("text"))
    return 0


def prompt_tokens(body: Any, chat: bool) -> int:
    if not isinstance(body, dict):
        return 0
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return 0
        return sum(count_words(m.get("content")) for m in messages if isinstance(m, dict))
    return count_words(body.get("prompt"))


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    return model if isinstance(model, str) else DEFAULT_MODEL


def token_words(start: int, count: int) -> str:
    return "".join(f"t{i} " for i in range(start, start + count))


def error_json(message: str, status: int, type_: str = "invalid_request_error") -> bytes:
    return dumps({"error": {"message": message, "type": type_, "param": None, "code": status}})


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"


class Shapes:
    """The OpenAI objects for one request (chat or text completion)."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = "chatcmpl-1" if chat else "cmpl-1"

    def _chunk(self, choices: list[Any]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": CREATED, "model": self.model,
                "choices": choices}

    def role(self) -> bytes:
        return sse(self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "finish_reason": None}]))

    def content(self, text: str) -> bytes:
        if self.chat:
            choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
        return sse(self._chunk([choice]))

    def finish(self, reason: str) -> bytes:
        if self.chat:
            choice = {"index": 0, "delta": {}, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": reason}
        return sse(self._chunk([choice]))

    @staticmethod
    def usage(prompt: int, completion: int) -> dict[str, int]:
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def usage_chunk(self, prompt: int, completion: int) -> bytes:
        chunk = self._chunk([])
        chunk["usage"] = self.usage(prompt, completion)
        return sse(chunk)

    def full(self, text: str, reason: str, usage: dict[str, int] | None) -> bytes:
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            obj = "text_completion"
        body: dict[str, Any] = {"id": self.id, "object": obj, "created": CREATED,
                                "model": self.model, "choices": [choice]}
        if usage is not None:
            body["usage"] = usage
        return dumps(body)


def named(event: str, obj: Any) -> bytes:
    """An SSE event with an ``event:`` line, as vLLM writes Responses and Messages events."""
    return b"event: " + event.encode() + b"\ndata: " + dumps(obj) + b"\n\n"


class ApiShapes:
    """The streams of the OpenAI Responses and Anthropic Messages APIs, one token per content
    event, in vLLM 0.32's shapes (tests/data/protocols): events before the first content event
    (``head``), one per token (``content``), and after (``tail``). For the relay benchmark."""

    RESPONSES = "/v1/responses"
    MESSAGES = "/v1/messages"

    def __init__(self, path: str, model: str) -> None:
        self.path, self.model = path, model

    def _response(self, status: str, usage: Any, text: str = "") -> dict[str, Any]:
        output = [{"id": "msg_1", "content": [{"annotations": [], "text": text,
                                               "type": "output_text", "logprobs": None}],
                   "role": "assistant", "status": "completed", "type": "message"}] \
            if status != "in_progress" else []
        return {"id": "resp_1", "created_at": CREATED, "model": self.model,
                "object": "response", "output": output, "status": status, "usage": usage}

    def head(self) -> list[bytes]:
        if self.path == self.RESPONSES:
            r = self._response("in_progress", None)
            item: dict[str, Any] = {"id": "msg_1", "content": [], "role": "assistant",
                                    "status": "in_progress", "type": "message"}
            part: dict[str, Any] = {"annotations": [], "text": "", "type": "output_text",
                                    "logprobs": None}
            events: tuple[tuple[str, dict[str, Any]], ...] = (
                ("response.created", {"response": r}),
                ("response.in_progress", {"response": r}),
                ("response.output_item.added", {"item": item, "output_index": 0}),
                ("response.content_part.added", {"content_index": 0, "item_id": "msg_1",
                                                 "output_index": 0, "part": part}))
            return [named(t, {**body, "sequence_number": i, "type": t})
                    for i, (t, body) in enumerate(events)]
        return [named("message_start", {"type": "message_start", "message": {
                    "id": "msg_1", "type": "message", "role": "assistant", "content": [],
                    "model": self.model, "stop_reason": None, "stop_sequence": None,
                    "usage": {"input_tokens": 3, "output_tokens": 0}}}),
                named("content_block_start", {"type": "content_block_start", "content_block": {
                    "type": "text", "text": ""}, "index": 0})]

    def content(self, text: str, i: int) -> bytes:
        if self.path == self.RESPONSES:
            return named("response.output_text.delta", {
                "content_index": 0, "delta": text, "item_id": "msg_1", "logprobs": [],
                "output_index": 0, "sequence_number": 4 + i,
                "type": "response.output_text.delta"})
        return named("content_block_delta", {"type": "content_block_delta", "delta": {
            "type": "text_delta", "text": text}, "index": 0})

    def tail(self, tokens: int) -> list[bytes]:
        if self.path == self.RESPONSES:
            usage = {"input_tokens": 3, "output_tokens": tokens, "total_tokens": 3 + tokens}
            r = self._response("completed", usage, token_words(0, tokens))
            return [named("response.completed", {"response": r, "sequence_number": 4 + tokens,
                                                 "type": "response.completed"})]
        return [named("content_block_stop", {"type": "content_block_stop", "index": 0}),
                named("message_delta", {"type": "message_delta", "delta": {
                    "stop_reason": "max_tokens", "stop_sequence": None},
                    "usage": {"input_tokens": 3, "output_tokens": tokens}}),
                named("message_stop", {"type": "message_stop"})]


def _big_pattern(size: int) -> bytes:
    unit = bytes(range(256))
    return (unit * (size // 256 + 1))[:size]


class SyntheticUpstream:
    """The synthetic server: ``async with SyntheticUpstream() as up: ... up.url ...``."""

    def __init__(self, default: Script | None = None, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.default = default or Script()
        self.host = host
        self.port = port
        self.url = ""
        self.requests: list[RequestRecord] = []
        self.events: list[Event] = []
        self.active = 0
        self.max_active = 0
        self.record_events = True  # the benchmark turns the flat log off
        # Seconds before each deadline spent yielding instead of sleeping (precise timing for
        # tests; the benchmark sets 0 to keep the upstream cheap).
        self.spin = 0.0015
        self._runner: web.AppRunner | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("POST", CHAT_PATH, self._completion)
        app.router.add_route("POST", TEXT_PATH, self._completion)
        app.router.add_route("POST", "/v1/embeddings", self._embeddings)
        app.router.add_route("GET", "/v1/models", self._models)
        app.router.add_route("GET", "/health", self._health)
        app.router.add_route("*", "/echo", self._echo)
        app.router.add_route("*", "/echo/{tail:.*}", self._echo)
        app.router.add_route("*", "/headers", self._headers)
        app.router.add_route("GET", "/big", self._big)
        app.router.add_route("*", "/status/{code:\\d+}", self._status)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    async def start(self) -> None:
        # handler_cancellation: a handler is cancelled the moment its client goes away, so
        # closed_at is when the server noticed, not when it next tried to write.
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.url = f"http://{self.host}:{self.port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SyntheticUpstream:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def reset(self) -> None:
        """Forget recorded requests and events (between test phases)."""
        self.requests.clear()
        self.events.clear()

    # -- helpers -----------------------------------------------------------------------------
    def _event(self, rec: RequestRecord, kind: str, t: float, index: int = -1) -> None:
        if self.record_events:
            self.events.append(Event(rec.index, kind, t, index))

    async def _record(self, request: web.Request, started: float) -> RequestRecord:
        headers: dict[str, str] = {}
        for k, v in request.headers.items():
            key = k.lower()
            headers[key] = f"{headers[key]}, {v}" if key in headers else v
        body = await request.read()
        script = self.default
        raw = headers.get(SYNTHETIC_HEADER)
        if raw is not None:
            script = Script.from_json(raw, self.default)
        rec = RequestRecord(index=len(self.requests), method=request.method,
                            path=request.path_qs, headers=headers, body=body, script=script,
                            started_at=started)
        self.requests.append(rec)
        self._event(rec, "start", started)
        return rec

    def _gone(self, rec: RequestRecord) -> None:
        if not rec.closed_early and not rec.cut:
            rec.closed_early = True
            rec.closed_at = clock()
            self._event(rec, "client_gone", rec.closed_at)

    # -- completions -------------------------------------------------------------------------
    async def _completion(self, request: web.Request) -> web.StreamResponse:
        started = clock()
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        rec: RequestRecord | None = None
        try:
            try:
                rec = await self._record(request, started)
            except ValueError as e:
                return web.Response(status=400, body=error_json(str(e), 400),
                                    content_type="application/json")
            return await self._serve_completion(request, rec)
        except asyncio.CancelledError:
            if rec is not None:
                self._gone(rec)
            raise
        except ConnectionError:
            if rec is not None:
                self._gone(rec)
            raise
        finally:
            self.active -= 1
            if rec is not None and rec.finished_at is None:
                rec.finished_at = clock()
                self._event(rec, "end", rec.finished_at)

    async def _serve_completion(self, request: web.Request,
                                rec: RequestRecord) -> web.StreamResponse:
        script = rec.script
        chat = request.path == CHAT_PATH
        try:
            body: Any = json.loads(rec.body) if rec.body else {}
            rec.json = body
        except (ValueError, UnicodeDecodeError):
            body = None
        if script.hang > 0:
            await asyncio.sleep(script.hang)
        if script.status != 200:
            return self._error(rec, script.status, script.error_body, script.content_type)
        if script.raw_body is None and not isinstance(body, dict):
            return self._error(rec, 400, error_json("request body is not a JSON object", 400),
                               None)
        body = body if isinstance(body, dict) else {}
        model = _model(body)
        rec.model = model
        rec.stream = bool(body.get("stream"))
        shapes = Shapes(chat, model)
        n_prompt = prompt_tokens(body, chat)
        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        want_usage = script.usage == "always" or (script.usage == "auto" and include_usage)
        if rec.stream and script.raw_body is None:
            return await self._stream(request, rec, shapes, n_prompt, want_usage)
        return await self._whole(request, rec, shapes, n_prompt)

    def _error(self, rec: RequestRecord, status: int, body: bytes | None,
               content_type: str | None) -> web.Response:
        if body is None:
            body = error_json(f"synthetic error {status}", status,
                              "server_error" if status >= 500 else "invalid_request_error")
        rec.status = status
        rec.headers_sent_at = rec.finished_at = clock()
        resp = web.Response(status=status, body=body)
        resp.content_type = content_type or "application/json"
        return resp

    async def _whole(self, request: web.Request, rec: RequestRecord, shapes: Shapes,
                     n_prompt: int) -> web.StreamResponse:
        script = rec.script
        chunks = script.chunks if script.cut_after is None else min(script.chunks,
                                                                    script.cut_after)
        # Generation time as if streamed: first token at ttft, the last at ttft + (n-1)*itl.
        delay = script.ttft + max(chunks - 1, 0) * script.itl
        await _sleep_until(rec.started_at + delay, self.spin)
        if script.cut_after is not None:
            rec.cut = True
            self._event(rec, "cut", clock())
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(3600)  # cancelled when the connection is lost
        if script.raw_body is not None:
            body = script.raw_body
        else:
            n = max(script.tokens, 0)
            rec.chunk_tokens = [n]
            usage = None if script.usage == "never" else shapes.usage(n_prompt, n)
            body = shapes.full(token_words(0, n), script.finish_reason, usage)
        rec.status = 200
        resp = web.Response(status=200, body=body)
        resp.content_type = script.content_type or "application/json"
        rec.headers_sent_at = rec.finished_at = clock()
        return resp

    async def _stream(self, request: web.Request, rec: RequestRecord, shapes: Shapes,
                      n_prompt: int, want_usage: bool) -> web.StreamResponse:
        script = rec.script
        resp = web.StreamResponse(status=200)
        resp.content_type = script.content_type or "text/event-stream"
        resp.headers["Cache-Control"] = "no-cache"
        await resp.prepare(request)
        rec.status = 200
        rec.headers_sent_at = clock()
        self._event(rec, "headers", rec.headers_sent_at)
        if shapes.chat and script.role_chunk:
            await resp.write(shapes.role())
        k = max(script.tokens_per_chunk, 1)
        emitted = 0
        others = self.active - 1  # this request is counted in self.active already
        first = rec.started_at + script.ttft + script.ttft_per_active * others
        itl = script.itl + script.itl_per_active * others
        for j in range(script.chunks):
            if script.cut_after is not None and j >= script.cut_after:
                break
            await _sleep_until(first + j * itl, self.spin)
            n = min(k, script.tokens - emitted)
            await resp.write(shapes.content(token_words(emitted, n)))
            t = clock()
            emitted += n
            rec.chunk_times.append(t)
            rec.chunk_tokens.append(n)
            self._event(rec, "chunk", t, j)
        if script.cut_after is not None and script.cut_after < script.chunks:
            rec.cut = True
            rec.finished_at = clock()
            self._event(rec, "cut", rec.finished_at)
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(3600)  # cancelled when the connection is lost
        await resp.write(shapes.finish(script.finish_reason))
        if want_usage:
            await resp.write(shapes.usage_chunk(n_prompt, emitted))
        await resp.write(DONE)
        await resp.write_eof()
        rec.finished_at = clock()
        self._event(rec, "end", rec.finished_at)
        return resp

    async def _embeddings(self, request: web.Request) -> web.Response:
        """OpenAI embeddings: one 4-dimensional vector per input, prompt_tokens = words."""
        rec = await self._record(request, clock())
        body = json.loads(rec.body) if rec.body else {}
        inputs = body.get("input", [])
        inputs = [inputs] if isinstance(inputs, str) else inputs
        words = sum(count_words(x) for x in inputs)
        out = {"object": "list", "model": _model(body), "data": [
            {"object": "embedding", "index": i, "embedding": [0.5, -0.5, 0.25, 0.0]}
            for i in range(len(inputs))], "usage": {"prompt_tokens": words,
                                                   "total_tokens": words}}
        return web.Response(body=dumps(out), content_type="application/json")

    # -- other routes ------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request, clock())
        body = {"object": "list", "data": [{"id": DEFAULT_MODEL, "object": "model",
                                            "created": CREATED, "owned_by": "synthetic"}]}
        return web.Response(body=dumps(body), content_type="application/json")

    async def _health(self, request: web.Request) -> web.Response:
        await self._record(request, clock())
        return web.Response(body=b"")

    async def _echo(self, request: web.Request) -> web.Response:
        rec = await self._record(request, clock())
        resp = web.Response(status=200, body=rec.body)
        resp.headers["Content-Type"] = rec.headers.get("content-type",
                                                       "application/octet-stream")
        resp.headers["x-echo-method"] = rec.method
        resp.headers["x-echo-path"] = rec.path
        return resp

    async def _headers(self, request: web.Request) -> web.Response:
        rec = await self._record(request, clock())
        return web.Response(body=dumps(rec.headers), content_type="application/json")

    async def _big(self, request: web.Request) -> web.StreamResponse:
        await self._record(request, clock())
        size = int(request.query.get("size", BIG_DEFAULT))
        data = _big_pattern(size)
        if request.query.get("chunked") != "1":
            return web.Response(body=data, content_type="application/octet-stream")
        resp = web.StreamResponse()
        resp.content_type = "application/octet-stream"
        await resp.prepare(request)
        step = 64 * 1024
        for i in range(0, size, step):
            await resp.write(data[i:i + step])
        await resp.write_eof()
        return resp

    async def _status(self, request: web.Request) -> web.Response:
        await self._record(request, clock())
        code = int(request.match_info["code"])
        return web.Response(status=code, body=error_json(f"status {code}", code),
                            content_type="application/json")

    async def _not_found(self, request: web.Request) -> web.Response:
        await self._record(request, clock())
        return web.Response(status=404, body=error_json(f"no route {request.path}", 404),
                            content_type="application/json")


class RawUpstream:
    """The same streams as SyntheticUpstream from a bare asyncio protocol (``--raw``).

    For the relay benchmark: an aiohttp server costs ~20-30 µs per event, which at 256 streams
    would load the benchmark's own core more than the proxy under test. This one writes
    pre-built chunked frames from timer callbacks. It serves the two completions routes (same
    bytes as SyntheticUpstream, ``x-synthetic`` honoured; no ``hang``/``cut_after``) and answers
    404 elsewhere; it records nothing.
    """

    def __init__(self, default: Script) -> None:
        self.default = default
        self._frames: dict[tuple[bool, str, int, int], list[bytes]] = {}

    def frames(self, chat: bool, model: str, tokens: int, k: int) -> list[bytes]:
        key = (chat, model, tokens, k)
        got = self._frames.get(key)
        if got is None:
            shapes = Shapes(chat, model)
            got = [_frame(shapes.content(token_words(i, min(k, tokens - i))))
                   for i in range(0, tokens, k)]
            if len(self._frames) < 64:
                self._frames[key] = got
        return got

    async def serve(self, host: str, port: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: _RawProtocol(self), host, port,
                                        reuse_address=True, backlog=4096)


def _frame(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


_STATUSES = {s.value for s in HTTPStatus}
_STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")


class _RawProtocol(asyncio.Protocol):
    def __init__(self, server: RawUpstream) -> None:
        self.server = server
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.keep_alive = True
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._next()

    def _next(self) -> None:
        if self.busy or self.transport is None:
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].decode("latin-1").split("\r\n")
        fields = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        length = int(fields.get("content-length", "0"))
        if len(self.buf) < end + 4 + length:
            return
        body = self.buf[end + 4:end + 4 + length]
        self.buf = self.buf[end + 4 + length:]
        method, path = [*head[0].split(" "), "", ""][:2]
        self.busy = True
        self.keep_alive = fields.get("connection", "").lower() != "close"
        try:
            self._respond(method, path, fields, body)
        except Exception as e:  # a bad request must not kill the server
            self._whole(400, error_json(str(e), 400))

    def _whole(self, status: int, body: bytes) -> None:
        assert self.transport is not None
        reason = HTTPStatus(status).phrase.encode() if status in _STATUSES else b"Status"
        self.transport.write(b"HTTP/1.1 %d %b\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%b" % (status, reason, len(body), body))
        self._done()

    def _done(self) -> None:
        self.busy = False
        if not self.keep_alive and self.transport is not None:
            self.transport.close()
            return
        self._next()

    def _respond(self, method: str, path: str, fields: dict[str, str], body: bytes) -> None:
        chat = path == CHAT_PATH
        api = path in (ApiShapes.RESPONSES, ApiShapes.MESSAGES)
        if method != "POST" or (path not in (CHAT_PATH, TEXT_PATH) and not api):
            return self._whole(404, error_json(f"no route {path}", 404))
        script = self.server.default
        if SYNTHETIC_HEADER in fields:
            script = Script.from_json(fields[SYNTHETIC_HEADER], script)
        req = json.loads(body) if body else {}
        model = _model(req)
        if script.status != 200:
            return self._whole(script.status, script.error_body or error_json(
                f"synthetic error {script.status}", script.status))
        if api:
            return self._api_stream(ApiShapes(path, model), script)
        shapes = Shapes(chat, model)
        n_prompt = prompt_tokens(req, chat)
        if not req.get("stream"):
            usage = None if script.usage == "never" else shapes.usage(n_prompt, script.tokens)
            return self._whole(200, shapes.full(token_words(0, script.tokens),
                                                script.finish_reason, usage))
        opts = req.get("stream_options")
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        tail = [_frame(shapes.finish(script.finish_reason))]
        if script.usage == "always" or (script.usage == "auto" and include_usage):
            tail.append(_frame(shapes.usage_chunk(n_prompt, script.tokens)))
        tail += [_frame(DONE), b"0\r\n\r\n"]
        frames = self.server.frames(chat, model, script.tokens,
                                    max(script.tokens_per_chunk, 1))
        head = _STREAM_HEAD
        if chat and script.role_chunk:
            head += _frame(shapes.role())
        self._play(head, frames, b"".join(tail), script)

    def _api_stream(self, shapes: ApiShapes, script: Script) -> None:
        """A Responses or Messages stream: one token per content event, timed as chat's."""
        self._play(_STREAM_HEAD + b"".join(_frame(e) for e in shapes.head()),
                   [_frame(shapes.content(token_words(i, 1), i)) for i in range(script.tokens)],
                   b"".join(_frame(e) for e in shapes.tail(script.tokens)) + b"0\r\n\r\n",
                   script)

    def _play(self, head: bytes, frames: list[bytes], tail: bytes, script: Script) -> None:
        """``head`` now; content frame ``j`` at ``ttft + j * itl`` from timer callbacks (no
        task per stream); ``tail`` right after the last."""
        assert self.transport is not None
        self.transport.write(head)
        if not frames:
            self.transport.write(tail)
            return self._done()
        loop = asyncio.get_running_loop()
        start = loop.time()
        state = {"j": 0}

        def tick() -> None:
            self.timer = None
            if self.transport is None:
                return
            j = state["j"]
            self.transport.write(frames[j])
            state["j"] = j = j + 1
            if j == len(frames):
                self.transport.write(tail)
                self._done()
                return
            self.timer = loop.call_at(start + script.ttft + j * script.itl, tick)

        self.timer = loop.call_at(start + script.ttft, tick)


async def _sleep_until(deadline: float, spin: float = 0.0) -> None:
    """Sleep until ``deadline``; the last ``spin`` seconds by yielding in a loop.

    The default event loop wakes timers up to ~1 ms late (epoll's millisecond timeout); spinning
    on ``sleep(0)`` for the last stretch lands within tens of microseconds, at some CPU cost.
    """
    delay = deadline - clock()
    if delay > spin:
        await asyncio.sleep(delay - spin)
    while clock() < deadline:
        await asyncio.sleep(0)


@contextlib.contextmanager
def upstream_process(*args: str, cpus: Sequence[int] = ()) -> Iterator[str]:
    """The synthetic upstream in a process of its own (``main``'s flags), as a real engine
    runs: timing tests must not share its event loop with the sidecar. ``cpus``: the cores it
    may run on (default: any). Yields its URL."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tests.upstream", "--port", str(port), *args],
                            cwd=Path(__file__).resolve().parent.parent,
                            stdout=subprocess.PIPE, text=True,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "synthetic upstream on" in line, line
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.upstream",
                                description="Run the synthetic OpenAI-shaped upstream.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--ttft", type=float, default=Script.ttft)
    p.add_argument("--itl", type=float, default=Script.itl)
    p.add_argument("--tokens", type=int, default=Script.tokens)
    p.add_argument("--tokens-per-chunk", type=int, default=Script.tokens_per_chunk)
    p.add_argument("--usage", choices=("auto", "never", "always"), default=Script.usage)
    p.add_argument("--ttft-per-active", type=float, default=0.0,
                   help="Seconds added to TTFT per other stream in flight (a server that "
                        "slows with load).")
    p.add_argument("--itl-per-active", type=float, default=0.0,
                   help="Seconds added to ITL per other stream in flight.")
    p.add_argument("--spin", type=float, default=0.0,
                   help="Seconds before each deadline to spin instead of sleep (precision).")
    p.add_argument("--raw", action="store_true",
                   help="Serve from a bare asyncio protocol (cheap; for the relay benchmark).")
    p.add_argument("--no-uvloop", action="store_true", help="Use the default asyncio loop.")
    a = p.parse_args(argv)
    default = Script(ttft=a.ttft, itl=a.itl, tokens=a.tokens,
                     tokens_per_chunk=a.tokens_per_chunk, usage=a.usage,
                     ttft_per_active=a.ttft_per_active, itl_per_active=a.itl_per_active)

    async def serve() -> None:
        if a.raw:
            server = await RawUpstream(default).serve(a.host, a.port)
            print(f"synthetic upstream (raw) on http://{a.host}:{a.port}", flush=True)
            async with server:
                await server.serve_forever()
            return
        up = SyntheticUpstream(default, a.host, a.port)
        up.record_events = False
        up.spin = a.spin
        await up.start()
        print(f"synthetic upstream on {up.url}", flush=True)
        try:
            while True:
                await asyncio.sleep(1)
                # Keep memory flat in long runs: the records are for in-process tests.
                up.requests.clear()
        finally:
            await up.close()

    runner: Callable[[Any], Any] = asyncio.run
    if not a.no_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            runner = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
