"""Ollama's native API: ``/api/chat`` and ``/api/generate``. Streams by default (``"stream"``
absent means true), as NDJSON: one JSON object per line, ``application/x-ndjson``.

A content event is a line with non-empty ``message.content`` / ``message.thinking`` (chat),
``response`` / ``thinking`` (generate), or tool calls. The last line (``"done":true``) carries
``done_reason``, ``prompt_eval_count``, ``eval_count`` and the engine's own durations in
nanoseconds (``prompt_eval_duration``, ``eval_duration``, ``load_duration``,
``total_duration``): read as engine timings, as llama.cpp's ``timings`` are — prefill is
``prompt_eval_duration``, decode ``eval_duration``; ``load_duration`` (loading the model) is
not a phase of the request's own and is left out. An error mid-stream is a line
``{"error": "..."}``.
"""

from __future__ import annotations

import re
from typing import Any

from exporter.protocols.base import (
    NDJSON,
    Dialect,
    Protocol,
    Reply,
    Request,
    count,
    number,
    sampling,
    text,
)
from exporter.timeline import EngineTimings

_CHAT_CONTENT = re.compile(rb'"(?:content|thinking)" ?: ?"(?!")|"tool_calls" ?: ?\[ ?\{')
_GENERATE_CONTENT = re.compile(rb'"(?:response|thinking)" ?: ?"(?!")')
_SPECIAL = re.compile(rb'"done" ?: ?true|"error" ?: ?"')
_HINTS = (b'"done":true', b'"done": true', b'"error"')
FINISH = {"stop": "stop", "length": "length"}


def _seconds(ns: Any) -> float | None:
    v = number(ns)
    return v / 1e9 if v is not None and v >= 0 else None


def _final(obj: dict[str, Any], reply: Reply) -> None:
    reply.input_tokens = count(obj.get("prompt_eval_count"))
    reply.output_tokens = count(obj.get("eval_count"))
    if isinstance(obj.get("done_reason"), str):
        reply.finish_reason = FINISH.get(obj["done_reason"], "other")
    prefill, decode = _seconds(obj.get("prompt_eval_duration")), _seconds(
        obj.get("eval_duration"))
    if prefill is not None or decode is not None:
        reply.timings = EngineTimings("engine_timings", prefill=prefill, decode=decode,
                                      input_tokens=reply.input_tokens,
                                      output_tokens=reply.output_tokens)
    reply.model = text(obj.get("model"))


def _read(obj: Any, reply: Reply) -> bool:
    if isinstance(obj, dict):
        if isinstance(obj.get("error"), str):
            reply.finish_reason = "error"
        elif obj.get("done") is True:
            _final(obj, reply)
    return False


def _chat_texts(obj: Any) -> list[str]:
    msg = obj.get("message") if isinstance(obj, dict) else None
    if not isinstance(msg, dict):
        return []
    return [v for k in ("thinking", "content") if isinstance(v := msg.get(k), str)]


def _generate_texts(obj: Any) -> list[str]:
    if not isinstance(obj, dict):
        return []
    return [v for k in ("thinking", "response") if isinstance(v := obj.get(k), str)]


def _whole(texts: Any) -> Any:
    def whole(obj: Any) -> Reply:
        reply = Reply()
        if isinstance(obj, dict):
            _final(obj, reply)
            reply.texts = texts(obj)
        return reply
    return whole


def _request(obj: dict[str, Any], path: str) -> Request:
    return Request(obj.get("model"), obj.get("stream") is not False, None,
                   sampling(obj.get("options"), "num_predict"))


CHAT = Protocol("ollama_chat", "chat", _request, _whole(_chat_texts),
                Dialect(NDJSON, _CHAT_CONTENT, _SPECIAL, _HINTS, _read, _chat_texts))
GENERATE = Protocol("ollama_generate", "text_completion", _request, _whole(_generate_texts),
                    Dialect(NDJSON, _GENERATE_CONTENT, _SPECIAL, _HINTS, _read,
                            _generate_texts))
