"""OpenAI Responses (``/v1/responses``): what OpenAI's SDKs and agent frameworks now default to.

Stream: SSE events named by their ``type``. A content event is a non-empty string ``delta``:
``response.output_text.delta``, ``response.reasoning_text.delta`` (and the summary's),
``response.function_call_arguments.delta``, ``response.refusal.delta``… (the other events carry
no string ``delta``). Decoded: the terminal event (``response.completed``, ``.incomplete``,
``.failed``: the response object with ``usage`` and ``status``) and ``error`` events. vLLM
sends ``response.completed`` with ``"status":"incomplete"`` when the output limit cut it: the
status, not the event name, gives the finish reason.
"""

from __future__ import annotations

import re
from typing import Any

from exporter.protocols.base import SSE, Dialect, Protocol, Reply, Request, count, sampling, text

_CONTENT = re.compile(rb'"delta" ?: ?"(?!")')
_SPECIAL = re.compile(rb'"type" ?: ?"(?:response\.(?:completed|incomplete|failed)|error)"')
_HINTS = (b"response.completed", b"response.incomplete", b"response.failed", b'"error"')
_INCOMPLETE = {"max_output_tokens": "length", "content_filter": "content_filter"}


def _response(resp: Any, reply: Reply) -> None:
    if not isinstance(resp, dict):
        return
    usage = resp.get("usage")
    if isinstance(usage, dict):
        reply.input_tokens = count(usage.get("input_tokens"))
        reply.output_tokens = count(usage.get("output_tokens"))
    status = resp.get("status")
    if status == "completed":
        calls = any(isinstance(o, dict) and o.get("type") == "function_call"
                    for o in resp.get("output") or ())
        reply.finish_reason = "tool_calls" if calls else "stop"
    elif status == "incomplete":
        details = resp.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        reply.finish_reason = _INCOMPLETE.get(reason, "other") if isinstance(reason, str) \
            else "other"
    elif status in ("failed", "cancelled"):
        reply.finish_reason = "error" if status == "failed" else "cancelled"
    reply.model = text(resp.get("model"))


def _read(obj: Any, reply: Reply) -> bool:
    if isinstance(obj, dict):
        if obj.get("type") == "error":
            reply.finish_reason = "error"
        else:
            _response(obj.get("response"), reply)
    return False


def _output_texts(resp: Any) -> list[str]:
    out: list[str] = []
    for item in (resp.get("output") or ()) if isinstance(resp, dict) else ():
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("arguments"), str):
            out.append(item["arguments"])
        for part in item.get("content") or ():
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
    return out


def _whole(obj: Any) -> Reply:
    reply = Reply()
    _response(obj, reply)
    reply.texts = _output_texts(obj)
    return reply


def _texts(obj: Any) -> list[str]:
    delta = obj.get("delta") if isinstance(obj, dict) else None
    return [delta] if isinstance(delta, str) else []


def _request(obj: dict[str, Any], path: str) -> Request:
    return Request(obj.get("model"), obj.get("stream") is True, None,
                   sampling(obj, "max_output_tokens"))


PROTOCOL = Protocol("openai_responses", "chat", _request, _whole,
                    Dialect(SSE, _CONTENT, _SPECIAL, _HINTS, _read, _texts))
