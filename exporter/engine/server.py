"""The engine's OpenAI-compatible HTTP face (aiohttp), over :class:`Scheduler`.

Per-request phase figures (definitions in :mod:`exporter.engine.scheduler`) leave the engine
in the two shapes real engines use, so the sidecar's parsers are exercised by our own engine:

- a llama.cpp-shaped ``timings`` object (plus ``queue_ms``) on non-streamed responses and on
  the streamed chunk that carries ``finish_reason`` (and on the usage chunk when one is asked);
- TGI-style headers on non-streamed responses, integers in milliseconds:
  ``x-queue-time`` = queue_ms, ``x-inference-time`` = prompt_ms + predicted_ms,
  ``x-time-per-token`` = inference time / generated tokens, ``x-prompt-tokens``,
  ``x-generated-tokens``. Streams cannot carry them: headers leave before the first token.

A client that goes away is noticed within ``_POLL_S`` even before its first token and its
request is cancelled in the engine (dropped from the queue or from its batch).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from exporter.engine.scheduler import Finished, GenRequest, Handle, QueueFull, Scheduler

_POLL_S = 0.2
SCHEDULER = web.AppKey("scheduler", Scheduler)
INFO = web.AppKey("info", dict)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status)


@web.middleware
async def _errors(request: web.Request,
                  handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPException as e:  # 404 / 405 in the OpenAI shape too
        if e.status < 400:
            raise
        return error_response(e.status, e.reason, "invalid_request_error",
                              code="not_found" if e.status == 404 else None)


def build_app(scheduler: Scheduler, model_name: str, context_len: int,
              device: str) -> web.Application:
    app = web.Application(middlewares=[_errors])
    app[SCHEDULER] = scheduler
    app[INFO] = {"model": model_name, "context_len": context_len, "device": device,
                 "created": int(time.time())}
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/engine/stats", _stats)
    return app


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _stats(request: web.Request) -> web.Response:
    info = request.app[INFO]
    return web.json_response({**request.app[SCHEDULER].stats(), "pid": os.getpid(),
                              "model": info["model"], "device": info["device"]})


async def _models(request: web.Request) -> web.Response:
    info = request.app[INFO]
    return web.json_response({"object": "list", "data": [
        {"id": info["model"], "object": "model", "created": info["created"],
         "owned_by": "llm-exporter"}]})


# --- request parsing ---
async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise ApiError(400, f"'{name}' must be a number between {lo} and {hi}", param=name)
    return float(v)


def _gen_request(body: dict[str, Any], prompt_ids: list[int], default_max: int,
                 context_len: int) -> GenRequest:
    if body.get("n", 1) not in (1, None):
        raise ApiError(400, "only n=1 is supported", param="n")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    room = context_len - len(prompt_ids)
    max_tokens = body.get(name)
    if max_tokens is None:
        max_tokens = max(1, min(default_max, room))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, f"'{name}' must be a positive integer", param=name)
    if len(prompt_ids) + max_tokens > context_len:
        raise ApiError(400, f"prompt ({len(prompt_ids)} tokens) plus {name} ({max_tokens}) "
                       f"exceeds the context length {context_len}", param=name,
                       code="context_length_exceeded")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = tuple(stop)
    else:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings",
                       param="stop")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, "'ignore_eos' must be a boolean", param="ignore_eos")
    return GenRequest(prompt_ids=prompt_ids, max_tokens=max_tokens,
                      temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                      top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
                      stop=tuple(s for s in stops if s), ignore_eos=ignore_eos)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and p.get("type") == "text")
    if content is None:
        return ""
    raise ApiError(400, "message content must be a string or a list of text parts",
                   param="messages")


async def _completions(request: web.Request) -> web.StreamResponse:
    body = await _json(request)
    prompt = body.get("prompt")
    tok = request.app[SCHEDULER].tok
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tok(prompt).input_ids
    elif isinstance(prompt, list) and prompt and all(isinstance(i, int) for i in prompt):
        ids = list(prompt)
    else:
        raise ApiError(400, "'prompt' must be a string or a list of token ids", param="prompt")
    if not ids:
        raise ApiError(400, "'prompt' is empty", param="prompt")
    req = _gen_request(body, ids, 16, request.app[INFO]["context_len"])
    return await _serve(request, body, req, chat=False)


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await _json(request)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise ApiError(400, "'messages' must be a non-empty list of {role, content}",
                       param="messages")
    msgs = [{"role": m["role"], "content": _text(m.get("content"))} for m in messages]
    tok = request.app[SCHEDULER].tok
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False).input_ids
    req = _gen_request(body, ids, 512, request.app[INFO]["context_len"])
    return await _serve(request, body, req, chat=True)


# --- running and answering ---
async def _next(h: Handle, request: web.Request) -> str | Finished | Exception | None:
    """The next event, or None when the client has gone away."""
    while True:
        try:
            return await asyncio.wait_for(h.events.get(), _POLL_S)
        except TimeoutError:
            t = request.transport
            if t is None or t.is_closing():
                return None


async def _serve(request: web.Request, body: dict[str, Any], req: GenRequest,
                 chat: bool) -> web.StreamResponse:
    sched = request.app[SCHEDULER]
    try:
        h = sched.submit(req)
    except QueueFull as e:
        raise ApiError(429, str(e), "rate_limit_error", code="queue_full") from e
    try:
        if body.get("stream"):
            return await _stream(request, body, req, h, chat)
        return await _whole(request, req, h, chat)
    finally:
        sched.cancel(h)  # no-op when finished; frees the slot when the client left


def _usage(req: GenRequest, fin: Finished) -> dict[str, int]:
    n, g = len(req.prompt_ids), fin.timings.predicted_n
    return {"prompt_tokens": n, "completion_tokens": g, "total_tokens": n + g}


def _reason(fin: Finished) -> str:
    return "length" if fin.finish_reason == "length" else "stop"


def _base(request: web.Request, chat: bool) -> dict[str, Any]:
    return {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": request.app[INFO]["model"]}


async def _whole(request: web.Request, req: GenRequest, h: Handle,
                 chat: bool) -> web.StreamResponse:
    while True:
        ev = await _next(h, request)
        if ev is None:
            return web.Response(status=499)
        if isinstance(ev, Exception):
            raise ApiError(500, f"engine error: {ev}", "server_error")
        if isinstance(ev, Finished):
            break
    fin, t = ev, ev.timings
    choice: dict[str, Any] = {"index": 0, "finish_reason": _reason(fin), "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": fin.text}
    else:
        choice["text"] = fin.text
    out = {**_base(request, chat), "choices": [choice], "usage": _usage(req, fin),
           "timings": t.as_dict()}
    inference = t.prompt_ms + t.predicted_ms
    headers = {
        "x-queue-time": str(round(t.queue_ms)),
        "x-inference-time": str(round(inference)),
        "x-time-per-token": str(round(inference / t.predicted_n)) if t.predicted_n else "0",
        "x-prompt-tokens": str(t.prompt_n),
        "x-generated-tokens": str(t.predicted_n),
    }
    return web.json_response(out, headers=headers)


async def _stream(request: web.Request, body: dict[str, Any], req: GenRequest, h: Handle,
                  chat: bool) -> web.StreamResponse:
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    base = _base(request, chat)
    if chat:
        base["object"] = "chat.completion.chunk"

    def chunk(delta: str | None, reason: str | None = None,
              first: bool = False) -> dict[str, Any]:
        c: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if chat:
            d: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if delta is not None:
                d["content"] = delta
            c["delta"] = d
        else:
            c["text"] = delta or ""
        return {**base, "choices": [c]}

    async def send(obj: dict[str, Any] | str) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
        await resp.write(f"data: {data}\n\n".encode())

    await resp.prepare(request)
    try:
        if chat:
            await send(chunk("", first=True))
        while True:
            ev = await _next(h, request)
            if ev is None:
                return resp
            if isinstance(ev, Exception):
                await send({"error": {"message": f"engine error: {ev}", "type": "server_error",
                                      "param": None, "code": None}})
                break
            if isinstance(ev, str):
                await send(chunk(ev))
                continue
            final = chunk(None if chat else "", _reason(ev))
            final["timings"] = ev.timings.as_dict()
            await send(final)
            if include_usage:
                await send({**base, "choices": [], "usage": _usage(req, ev),
                            "timings": ev.timings.as_dict()})
            break
        await send("[DONE]")
        await resp.write_eof()
    except (ConnectionResetError, ConnectionError):
        pass  # client went away mid-stream; _serve's finally cancels the request
    return resp
