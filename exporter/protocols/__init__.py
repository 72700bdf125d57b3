"""Every inference API the sidecar measures: one module per protocol, one row per protocol in
:data:`PROTOCOLS`, and the route table that maps a request to one.

Adding an API: write its module (a :class:`~exporter.protocols.base.Protocol`: how to read
the request, the complete response and the stream — a few patterns and field readers), add
its row below and its default paths to :data:`ROUTES`. The relay, the scanner, the metrics and
the spans are shared; the ``api`` label takes the protocol's name.

Routes are POST paths. A pattern is a path whose ``*`` stands for one path segment and
``**`` for any rest (``/openai/deployments/*/chat/completions``); the query string is not
part of it. ``--route PATTERN=PROTOCOL`` adds routes (for a path prefix, a gateway's paths)
and takes precedence over the defaults. A request no route matches is relayed all the same
and counted as unmatched (method, status class, duration), never per path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from exporter.protocols import anthropic, llamacpp, ollama, openai, pooling, responses, sglang, tgi
from exporter.protocols.base import Protocol, Reply, Request, StreamScanner, stream_texts

__all__ = ["PROTOCOLS", "ROUTES", "Protocol", "Reply", "Request", "RouteTable",
           "StreamScanner", "parse_route", "stream_texts"]


def _unknown(obj: object, path: str) -> Request:
    return Request()


# /generate is TGI's and SGLang's native route: the body says which (TGI's has "inputs").
GENERATE = Protocol("generate", "text_completion", _unknown,
                    pick=lambda body: tgi.PROTOCOL if "inputs" in body else sglang.PROTOCOL)

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    openai.CHAT,
    openai.COMPLETIONS,
    responses.PROTOCOL,
    anthropic.PROTOCOL,
    pooling.EMBEDDINGS,
    pooling.RERANK,
    pooling.SCORE,
    pooling.CLASSIFY,
    pooling.POOLING,
    tgi.PROTOCOL,
    llamacpp.PROTOCOL,
    ollama.CHAT,
    ollama.GENERATE,
    sglang.PROTOCOL,
    GENERATE,
)}

# Default routes: (pattern, protocol name), POST.
ROUTES: tuple[tuple[str, str], ...] = (
    ("/v1/chat/completions", "openai_chat"),
    ("/v1/completions", "openai_completions"),
    ("/v1/responses", "openai_responses"),
    ("/v1/messages", "anthropic_messages"),
    ("/v1/embeddings", "openai_embeddings"),
    ("/v1/rerank", "rerank"),
    ("/v2/rerank", "rerank"),
    ("/rerank", "rerank"),
    ("/v1/score", "score"),
    ("/score", "score"),
    ("/classify", "classify"),
    ("/pooling", "pooling"),
    ("/generate", "generate"),
    ("/generate_stream", "tgi"),
    ("/completion", "llamacpp"),
    ("/infill", "llamacpp"),
    ("/api/chat", "ollama_chat"),
    ("/api/generate", "ollama_generate"),
    # Azure OpenAI: deployments (api-version in the query) and the v1 paths.
    ("/openai/deployments/*/chat/completions", "openai_chat"),
    ("/openai/deployments/*/completions", "openai_completions"),
    ("/openai/deployments/*/embeddings", "openai_embeddings"),
    ("/openai/v1/chat/completions", "openai_chat"),
    ("/openai/v1/completions", "openai_completions"),
    ("/openai/v1/responses", "openai_responses"),
    ("/openai/v1/embeddings", "openai_embeddings"),
    ("/openai/responses", "openai_responses"),
)


def parse_route(text: str) -> tuple[str, str]:
    """``PATTERN=PROTOCOL`` as given to ``--route``; ValueError says what is wrong."""
    pattern, sep, name = text.strip().rpartition("=")
    if not sep or not pattern.startswith("/"):
        raise ValueError(f"{text!r}: expected PATTERN=PROTOCOL with a path pattern starting "
                         "with /, e.g. /openai/v1/chat/completions=openai_chat")
    if name not in PROTOCOLS:
        raise ValueError(f"{text!r}: unknown protocol {name!r}; one of "
                         f"{', '.join(sorted(PROTOCOLS))}")
    return pattern, name


def _compile(pattern: str) -> re.Pattern[str]:
    parts = (re.escape(p) for p in pattern.split("**"))
    return re.compile(".*".join(p.replace(r"\*", "[^/]+") for p in parts))


class RouteTable:
    """Which protocol a request speaks: consulted once per request, before its body is read.
    Exact paths are one dict lookup; patterns are tried in order, the user's first."""

    def __init__(self, extra: Iterable[tuple[str, str]] = ()) -> None:
        def split(routes: Iterable[tuple[str, str]]) -> tuple[
                dict[str, Protocol], list[tuple[re.Pattern[str], Protocol]]]:
            exact: dict[str, Protocol] = {}
            patterns: list[tuple[re.Pattern[str], Protocol]] = []
            for pattern, name in routes:
                key = pattern.rstrip("/") or "/"
                if "*" in key:
                    patterns.append((_compile(key), PROTOCOLS[name]))
                else:
                    exact[key] = PROTOCOLS[name]
            return exact, patterns

        # Precedence: the user's exact paths, the user's patterns, then the defaults.
        self._tables = [t for t in (split(extra), split(ROUTES)) if t[0] or t[1]]

    def match(self, method: str, path: str) -> Protocol | None:
        if method != "POST":
            return None
        key = path.rstrip("/") or "/"
        for exact, patterns in self._tables:
            proto = exact.get(key)
            if proto is not None:
                return proto
            for rx, p in patterns:
                if rx.fullmatch(key):
                    return p
        return None
