"""SGLang's native ``/generate``. Its OpenAI-compatible routes are the openai module's.

Stream (``"stream": true``): SSE ``data:`` events, each with ``text`` (cumulative by
default), ``output_ids`` and ``meta_info`` (``prompt_tokens``, ``completion_tokens``,
``finish_reason``: null until the last, then an object whose ``type`` is ``stop``,
``length`` or ``abort``), then ``data: [DONE]``. Every event is a content event (SGLang sends
one per ``stream_interval`` tokens); the one whose ``finish_reason`` is an object is decoded.
"""

from __future__ import annotations

import re
from typing import Any

from exporter.protocols.base import SSE, Dialect, Protocol, Reply, Request, count, sampling

_CONTENT = re.compile(rb'"meta_info" ?: ?\{')
_SPECIAL = re.compile(rb'"finish_reason" ?: ?\{|"error" ?: ?\{')
_HINTS = (b'"finish_reason":{', b'"finish_reason": {', b'"error"')
FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


def _meta(obj: Any, reply: Reply) -> None:
    meta = obj.get("meta_info") if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        return
    reply.input_tokens = count(meta.get("prompt_tokens"))
    reply.output_tokens = count(meta.get("completion_tokens"))
    fin = meta.get("finish_reason")
    if isinstance(fin, dict) and isinstance(fin.get("type"), str):
        reply.finish_reason = FINISH.get(fin["type"], "other")


def _read(obj: Any, reply: Reply) -> bool:
    if isinstance(obj, dict):
        if isinstance(obj.get("error"), dict):
            reply.finish_reason = "error"
        else:
            _meta(obj, reply)
    return False


def _whole(obj: Any) -> Reply:
    reply = Reply()
    if isinstance(obj, list) and obj:
        obj = obj[0]
    _meta(obj, reply)
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        reply.texts.append(obj["text"])
    return reply


def _request(obj: dict[str, Any], path: str) -> Request:
    return Request(obj.get("model"), obj.get("stream") is True, None,
                   sampling(obj.get("sampling_params"), "max_new_tokens"))


# Streamed text is cumulative: the stream's text is the last event's, not the sum (see
# exporter.instrument, which only needs it for --tokenizer when no usage came).
PROTOCOL = Protocol("sglang", "text_completion", _request, _whole,
                    Dialect(SSE, _CONTENT, _SPECIAL, _HINTS, _read))
