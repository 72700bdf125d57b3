"""Per-request phase figures that engines put in their own responses, parsed into
:class:`~exporter.timeline.EngineTimings` (seconds).

Pure parsing: no I/O, never raises. Anything missing, negative, non-finite or not a number is
left out; a response that yields no figure at all gives ``None`` so the sidecar falls back to
the next source (spans, then the outside view).

Two shapes are understood:

- **TGI response headers** (``x-queue-time``, ``x-inference-time``, ``x-time-per-token``,
  ``x-prompt-tokens``, ``x-generated-tokens``), which TGI sets on non-streaming responses only,
  as whole milliseconds (``Duration::as_millis``). TGI defines
  ``queue = start - queued`` and ``inference = now - start``: inference covers prefill *and*
  decode together, and ``x-time-per-token = inference / generated`` (truncated to whole ms)
  includes the prefill too, so neither splits them. Exact, and therefore reported: the engine
  queue and the token counts. Prefill, decode and TTFT stay ``None``;
  :func:`exporter.timeline.derive` then takes prefill from the outside view minus this queue.
  Our embedded engine sends the same headers (fractional milliseconds are accepted).
- **llama.cpp's ``timings`` object** (native ``llama-server``: the non-streaming body and the
  final streamed chunk; also our embedded engine, which adds ``queue_ms``). llama-server sets
  ``prompt_ms = first token sampled - prompt processing started`` and
  ``predicted_ms = last token sampled - first token sampled``; ``predicted_n`` counts every
  generated token *including* the first, whose cost is in ``prompt_ms``. So ``prompt_ms`` is
  prefill and ``predicted_ms`` is decode exactly as :mod:`exporter.timeline` defines them
  (first token -> last token). ``prompt_n`` is only the tokens evaluated in this request; the
  prompt length is ``prompt_n + cache_n``, reported only when ``cache_n`` is present (older
  servers omit it and then ``prompt_n`` may exclude a reused prefix). llama-server has no
  queue figure (the wait for a free slot is not timed); with ``timings_per_token`` it also
  sends partial ``timings`` on every chunk: only the final chunk's are complete.
  ``ttft`` here is the engine's own (``queue_ms + prompt_ms``), so only when ``queue_ms`` is
  there; the client's TTFT also holds the network hop and is the sidecar's to measure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from exporter.timeline import EngineTimings

SOURCE = "engine_timings"

# TGI header names (lower case; lookups are case-insensitive).
QUEUE_TIME = "x-queue-time"
INFERENCE_TIME = "x-inference-time"
TIME_PER_TOKEN = "x-time-per-token"
PROMPT_TOKENS = "x-prompt-tokens"
GENERATED_TOKENS = "x-generated-tokens"
TGI_HEADERS = (QUEUE_TIME, INFERENCE_TIME, TIME_PER_TOKEN, PROMPT_TOKENS, GENERATED_TOKENS)


def number(value: Any) -> float | None:
    """A finite, non-negative number from a JSON value or header text, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        f = float(value)
    elif isinstance(value, str | bytes):
        try:
            f = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return f if math.isfinite(f) and f >= 0 else None


def _count(value: Any) -> int | None:
    f = number(value)
    return int(f) if f is not None and f == int(f) else None


def _ms(value: Any) -> float | None:
    f = number(value)
    return None if f is None else f / 1000.0


def _header(headers: Mapping[str, str], name: str) -> Any:
    try:
        # Case-insensitive mappings (aiohttp's CIMultiDict) answer directly, absent or not;
        # plain dicts may carry any case. This runs on every response: keep it cheap.
        if isinstance(headers, CIMultiDictProxy | CIMultiDict):
            return headers.get(name)
        if name in headers:
            return headers[name]
        for key, value in headers.items():
            if isinstance(key, str) and key.lower() == name:
                return value
    except Exception:
        return None
    return None


def from_headers(headers: Mapping[str, str]) -> EngineTimings | None:
    """TGI's timing headers (as our embedded engine also sends them), or None."""
    try:
        queue = _ms(_header(headers, QUEUE_TIME))
        prompt = _count(_header(headers, PROMPT_TOKENS))
        generated = _count(_header(headers, GENERATED_TOKENS))
    except Exception:
        return None
    if queue is None and prompt is None and generated is None:
        return None
    return EngineTimings(SOURCE, queue=queue, input_tokens=prompt, output_tokens=generated)


def from_timings(obj: Mapping[str, Any]) -> EngineTimings | None:
    """A llama.cpp-style ``timings`` object (plus the embedded engine's ``queue_ms``), or None."""
    if not isinstance(obj, Mapping):
        return None
    try:
        prefill = _ms(obj.get("prompt_ms"))
        decode = _ms(obj.get("predicted_ms"))
        queue = _ms(obj.get("queue_ms"))
        output = _count(obj.get("predicted_n"))
        prompt_n = _count(obj.get("prompt_n"))
        cache_n = _count(obj.get("cache_n"))
    except Exception:
        return None
    if prefill is None and decode is None and queue is None:
        return None
    inputs = prompt_n + cache_n if prompt_n is not None and cache_n is not None else None
    ttft = queue + prefill if queue is not None and prefill is not None else None
    return EngineTimings(SOURCE, queue=queue, prefill=prefill, decode=decode, ttft=ttft,
                         input_tokens=inputs, output_tokens=output)
