"""Text Generation Inference's native API: ``/generate`` and ``/generate_stream`` (and ``/``
with ``"stream"``). Its OpenAI-compatible ``/v1/chat/completions`` is the openai module's.

Stream: SSE, one event per generated token (``"token":{...}``, special tokens included, as
``generated_tokens`` counts them); the last carries ``generated_text`` and ``details``
(``finish_reason``, ``generated_tokens``, ``input_length``). An error mid-stream is an event
``{"error": ..., "error_type": ...}``. TGI's ``x-*-time`` response headers are read as
engine timings elsewhere (exporter.engine_timings).
"""

from __future__ import annotations

import re
from typing import Any

from exporter.protocols.base import SSE, Dialect, Protocol, Reply, Request, count, sampling

_CONTENT = re.compile(rb'"token" ?: ?\{')
_SPECIAL = re.compile(rb'"details" ?: ?\{|"error" ?: ?"')
_HINTS = (b'"details"', b'"error"')
FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


def _details(details: Any, reply: Reply) -> None:
    if not isinstance(details, dict):
        return
    reply.output_tokens = count(details.get("generated_tokens"))
    if count(details.get("input_length")) is not None:
        reply.input_tokens = details["input_length"]
    elif isinstance(details.get("prefill"), list) and details["prefill"]:
        reply.input_tokens = len(details["prefill"])  # decoder_input_details: one per token
    if isinstance(details.get("finish_reason"), str):
        reply.finish_reason = FINISH.get(details["finish_reason"], "other")


def _read(obj: Any, reply: Reply) -> bool:
    if isinstance(obj, dict):
        if "error" in obj and "token" not in obj:
            reply.finish_reason = "error"
        else:
            _details(obj.get("details"), reply)
    return False


def _whole(obj: Any) -> Reply:
    reply = Reply()
    if isinstance(obj, list) and obj:  # a batch of inputs answers a list
        obj = obj[0]
    if isinstance(obj, dict):
        _details(obj.get("details"), reply)
        if isinstance(obj.get("generated_text"), str):
            reply.texts.append(obj["generated_text"])
    return reply


def _texts(obj: Any) -> list[str]:
    tok = obj.get("token") if isinstance(obj, dict) else None
    if isinstance(tok, dict) and isinstance(tok.get("text"), str) and not tok.get("special"):
        return [tok["text"]]
    return []


def _request(obj: dict[str, Any], path: str) -> Request:
    stream = path.rstrip("/").endswith("generate_stream") or obj.get("stream") is True
    return Request(obj.get("model"), stream, None,
                   sampling(obj.get("parameters"), "max_new_tokens"))


PROTOCOL = Protocol("tgi", "text_completion", _request, _whole,
                    Dialect(SSE, _CONTENT, _SPECIAL, _HINTS, _read, _texts))
