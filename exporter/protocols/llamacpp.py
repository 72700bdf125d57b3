"""llama.cpp server's native completion API: ``/completion`` (and its aliases
``/completions``, ``/infill``). Its OpenAI-compatible routes are the openai module's.

Stream: SSE, one event per token (``"content":"..."``, ``"stop":false``); the last has
``"stop":true``, ``tokens_predicted``, ``tokens_evaluated``, ``stop_type`` and ``timings``
(exact prompt and generation times, read as engine timings as for its chat stream). The last
event also quotes the prompt and settings: it is decoded for its counts, and its text never
leaves the scanner.
"""

from __future__ import annotations

import re
from typing import Any

from exporter import engine_timings
from exporter.protocols.base import SSE, Dialect, Protocol, Reply, Request, count, sampling, text

_CONTENT = re.compile(rb'"content" ?: ?"(?!")')
_SPECIAL = re.compile(rb'"stop" ?: ?true|"error" ?: ?\{')
_HINTS = (b'"stop":true', b'"stop": true', b'"error"')
FINISH = {"eos": "stop", "word": "stop", "limit": "length"}


def _final(obj: dict[str, Any], reply: Reply) -> None:
    reply.output_tokens = count(obj.get("tokens_predicted"))
    reply.input_tokens = count(obj.get("tokens_evaluated"))
    if isinstance(obj.get("stop_type"), str):
        reply.finish_reason = FINISH.get(obj["stop_type"], "other")
    if isinstance(obj.get("timings"), dict):
        reply.timings = engine_timings.from_timings(obj["timings"])
    reply.model = text(obj.get("model"))


def _read(obj: Any, reply: Reply) -> bool:
    if isinstance(obj, dict):
        if isinstance(obj.get("error"), dict):
            reply.finish_reason = "error"
        elif obj.get("stop") is True:
            _final(obj, reply)
    return False


def _whole(obj: Any) -> Reply:
    reply = Reply()
    if isinstance(obj, dict):
        _final(obj, reply)
        if isinstance(obj.get("content"), str):
            reply.texts.append(obj["content"])
    return reply


def _texts(obj: Any) -> list[str]:
    return [obj["content"]] if isinstance(obj, dict) and isinstance(obj.get("content"), str) \
        else []


def _request(obj: dict[str, Any], path: str) -> Request:
    return Request(obj.get("model"), obj.get("stream") is True, None,
                   sampling(obj, "n_predict"))


PROTOCOL = Protocol("llamacpp", "text_completion", _request, _whole,
                    Dialect(SSE, _CONTENT, _SPECIAL, _HINTS, _read, _texts))
