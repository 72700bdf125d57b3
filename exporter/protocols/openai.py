"""OpenAI chat completions (``/v1/chat/completions``) and completions (``/v1/completions``),
as vLLM, SGLang, TGI's Messages API, llama.cpp's server and most gateways serve them.

Stream: SSE ``data:`` chunks. A content event is a delta carrying generated text (``content``,
``text``, ``reasoning_content``/``reasoning`` or tool-call ``arguments``) that is not empty —
the role-only first chunk of a chat stream carries ``"content":""`` and is not a token.
Decoded: the events holding ``usage`` (the usage-only chunk ``"choices":[]`` the sidecar may
have asked for, then stripped), ``timings`` (llama.cpp's server) and a ``finish_reason``.
"""

from __future__ import annotations

import re
from typing import Any

from exporter import engine_timings
from exporter.protocols.base import SSE, Dialect, Protocol, Reply, Request, count, sampling, text

_CONTENT = re.compile(rb'"(?:content|text|reasoning_content|reasoning|arguments)" ?: ?"(?!")')
_SPECIAL = re.compile(rb'"(?:usage|timings)" ?: ?\{|"finish_reason" ?: ?"')
_HINTS = (b'"usage"', b'"timings"', b'"finish_reason":"', b'"finish_reason": "')


def _read(obj: Any, reply: Reply) -> bool:
    """One decoded chunk; True when it is a usage-only chunk (no choices)."""
    if not isinstance(obj, dict):
        return False
    usage_only = False
    usage = obj.get("usage")
    if isinstance(usage, dict):
        _usage(usage, reply)
        usage_only = obj.get("choices") == []
    if isinstance(obj.get("timings"), dict):
        reply.timings = engine_timings.from_timings(obj["timings"]) or reply.timings
    choices = obj.get("choices")
    if isinstance(choices, list):
        for ch in choices:
            if isinstance(ch, dict) and isinstance(ch.get("finish_reason"), str):
                reply.finish_reason = ch["finish_reason"]
    return usage_only


def _usage(usage: dict[str, Any], reply: Reply) -> None:
    reply.usage_seen = True
    if count(usage.get("prompt_tokens")) is not None:
        reply.input_tokens = usage["prompt_tokens"]
    if count(usage.get("completion_tokens")) is not None:
        reply.output_tokens = usage["completion_tokens"]


def choice_texts(obj: Any, delta: bool) -> list[str]:
    """Generated text in a chunk (``delta``) or a complete response (``message``/``text``)."""
    out: list[str] = []
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list):
        return out
    for ch in choices:
        if not isinstance(ch, dict):
            continue
        if isinstance(ch.get("text"), str):
            out.append(ch["text"])
        msg = ch.get("delta" if delta else "message")
        if isinstance(msg, dict):
            for key in ("reasoning_content", "reasoning", "content"):
                if isinstance(msg.get(key), str):
                    out.append(msg[key])
            for call in msg.get("tool_calls") or ():
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    out.append(fn["arguments"])
    return out


def _whole(obj: Any) -> Reply:
    reply = Reply()
    if not isinstance(obj, dict):
        return reply
    if isinstance(obj.get("usage"), dict):
        _usage(obj["usage"], reply)
    choices = obj.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        reply.finish_reason = text(choices[0].get("finish_reason"))
    if isinstance(obj.get("timings"), dict):
        reply.timings = engine_timings.from_timings(obj["timings"])
    reply.model = text(obj.get("model"))
    reply.texts = choice_texts(obj, delta=False)
    return reply


def _request(obj: dict[str, Any], path: str) -> Request:
    limit = "max_completion_tokens" if "max_completion_tokens" in obj else "max_tokens"
    return Request(obj.get("model"), obj.get("stream") is True, None, sampling(obj, limit))


DIALECT = Dialect(SSE, _CONTENT, _SPECIAL, _HINTS, _read,
                  lambda obj: choice_texts(obj, delta=True))
CHAT = Protocol("openai_chat", "chat", _request, _whole, DIALECT, inject_usage=True)
COMPLETIONS = Protocol("openai_completions", "text_completion", _request, _whole, DIALECT,
                       inject_usage=True)
