"""Pooling APIs, never streamed: OpenAI embeddings (``/v1/embeddings``) and the rerank, score,
classify and pooling routes vLLM serves (``/v1/rerank`` as Jina and Cohere shape it,
``/v1/score``, ``/classify``, ``/pooling``). Measured: duration, input tokens from ``usage``
(``prompt_tokens``, else ``total_tokens``), and the batch size: how many inputs one request
carried (``input``, ``documents``, ``text_2``…; a string or one list of token ids is one).
The GenAI operation is ``embeddings`` for all of them (an encoder pass over inputs, no
generated tokens); the ``api`` label tells them apart.
"""

from __future__ import annotations

from typing import Any

from exporter.protocols.base import Protocol, Reply, Request, count, items, text


def _whole(obj: Any) -> Reply:
    reply = Reply()
    if not isinstance(obj, dict):
        return reply
    usage = obj.get("usage")
    if isinstance(usage, dict):
        reply.input_tokens = count(usage.get("prompt_tokens"))
        if reply.input_tokens is None:
            reply.input_tokens = count(usage.get("total_tokens"))
    reply.model = text(obj.get("model"))
    return reply


def _reader(*fields: str) -> Any:
    def request(obj: dict[str, Any], path: str) -> Request:
        inputs = None
        for name in fields:
            inputs = items(obj.get(name))
            if inputs is not None:
                break
        if inputs is None and isinstance(obj.get("messages"), list):
            inputs = 1  # chat-style embeddings: one conversation
        return Request(obj.get("model"), False, inputs)
    return request


EMBEDDINGS = Protocol("openai_embeddings", "embeddings", _reader("input"), _whole)
RERANK = Protocol("rerank", "embeddings", _reader("documents"), _whole)
SCORE = Protocol("score", "embeddings", _reader("text_2", "data_2", "documents", "items"),
                 _whole)
CLASSIFY = Protocol("classify", "embeddings", _reader("input"), _whole)
POOLING = Protocol("pooling", "embeddings", _reader("input"), _whole)
