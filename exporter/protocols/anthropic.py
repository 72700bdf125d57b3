"""Anthropic Messages (``/v1/messages``): Anthropic-style clients (coding agents among them)
pointed at a self-hosted model; vLLM, SGLang and LiteLLM-style gateways serve it.

Stream: SSE events named by their ``type``. A content event is a ``content_block_delta`` with a
non-empty ``text`` (text_delta), ``thinking`` (thinking_delta) or ``partial_json``
(input_json_delta); ``signature_delta`` and ``ping`` are not tokens. Decoded: ``message_start``
(input tokens), ``message_delta`` (output tokens, ``stop_reason``) and ``error``. Input tokens
are ``input_tokens`` plus the cache's ``cache_creation_input_tokens`` and
``cache_read_input_tokens`` (Anthropic counts those apart; every one was processed).
"""

from __future__ import annotations

import re
from typing import Any

from exporter.protocols.base import SSE, Dialect, Protocol, Reply, Request, count, sampling, text

_CONTENT = re.compile(rb'"(?:text|thinking|partial_json)" ?: ?"(?!")')
_SPECIAL = re.compile(rb'"type" ?: ?"(?:message_start|message_delta|error)"')
_HINTS = (b"message_start", b"message_delta", b'"error"')
STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                "tool_use": "tool_calls", "refusal": "content_filter",
                "model_context_window_exceeded": "length"}


def _usage(usage: Any, reply: Reply) -> None:
    if not isinstance(usage, dict):
        return
    parts = [count(usage.get(k)) for k in ("input_tokens", "cache_creation_input_tokens",
                                           "cache_read_input_tokens")]
    if parts[0] is not None:
        reply.input_tokens = sum(p for p in parts if p is not None)
    if count(usage.get("output_tokens")) is not None:
        reply.output_tokens = usage["output_tokens"]


def _stop(value: Any, reply: Reply) -> None:
    if isinstance(value, str):
        reply.finish_reason = STOP_REASONS.get(value, "other")


def _read(obj: Any, reply: Reply) -> bool:
    if not isinstance(obj, dict):
        return False
    kind = obj.get("type")
    if kind == "message_start" and isinstance(obj.get("message"), dict):
        msg = obj["message"]
        _usage(msg.get("usage"), reply)
        reply.model = text(msg.get("model"))
    elif kind == "message_delta":
        _usage(obj.get("usage"), reply)
        if isinstance(obj.get("delta"), dict):
            _stop(obj["delta"].get("stop_reason"), reply)
    elif kind == "error":
        reply.finish_reason = "error"
    return False


def _whole(obj: Any) -> Reply:
    reply = Reply()
    if not isinstance(obj, dict):
        return reply
    _usage(obj.get("usage"), reply)
    _stop(obj.get("stop_reason"), reply)
    reply.model = text(obj.get("model"))
    for block in obj.get("content") or ():
        if isinstance(block, dict):
            for key in ("text", "thinking"):
                if isinstance(block.get(key), str):
                    reply.texts.append(block[key])
    return reply


def _texts(obj: Any) -> list[str]:
    if not isinstance(obj, dict) or obj.get("type") != "content_block_delta":
        return []
    delta = obj.get("delta")
    if not isinstance(delta, dict):
        return []
    return [v for k in ("text", "thinking", "partial_json")
            if isinstance(v := delta.get(k), str)]


def _request(obj: dict[str, Any], path: str) -> Request:
    return Request(obj.get("model"), obj.get("stream") is True, None,
                   sampling(obj, "max_tokens"))


PROTOCOL = Protocol("anthropic_messages", "chat", _request, _whole,
                    Dialect(SSE, _CONTENT, _SPECIAL, _HINTS, _read, _texts))
