"""What every protocol module fills in, and the one incremental stream scanner they share.

A protocol is a row of data (:class:`Protocol`): its name (the ``api`` label and the name
``--route`` uses), its OpenTelemetry GenAI operation, how to read a request body, a complete
response and a stream. Streams are read by :class:`StreamScanner` with the protocol's
:class:`Dialect`: how events are framed (SSE or NDJSON), one compiled pattern that matches once
per content event (TTFT and ITL come from these, with no JSON decoding per chunk), and one
pattern for the rare events worth decoding (usage, the terminal event, errors), each decoded
once. Every module is a few patterns and field readers; the relay and the scanner are shared.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from exporter.timeline import EngineTimings

# An incomplete event held back longer than this is forwarded unscanned (and counted): a stream
# without event boundaries must not grow the sidecar's memory or delay the client.
MAX_HELD = 1024 * 1024


@dataclass(slots=True)
class Reply:
    """What a response said about itself, whatever its protocol: filled while it streams (by
    the dialect's ``read``) or from the complete body (by the protocol's ``whole``)."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    # One of exporter.labels.FINISH_REASONS when the protocol's word maps onto one.
    finish_reason: str | None = None
    timings: EngineTimings | None = None  # engine-reported phases (llama.cpp, Ollama)
    model: str | None = None  # the model the response names
    usage_seen: bool = False  # an OpenAI usage object came (the usage probe's evidence)
    texts: list[str] = field(default_factory=list)  # generated text, complete bodies only


@dataclass(slots=True)
class Request:
    """What the measurement reads from a request body."""

    model: Any = None
    stream: bool = False
    inputs: int | None = None  # items in a batch request (embeddings, rerank, score)
    attrs: dict[str, Any] = field(default_factory=dict)  # GenAI request attributes for spans


@dataclass(frozen=True, slots=True)
class Framing:
    """How a stream is cut into events."""

    name: str
    # A complete event ends where this matches (SSE: a blank line in any of the spec's line-end
    # forms; NDJSON: a line end).
    boundary: re.Pattern[bytes]
    # The same, tested on the end of a read (the common case: whole events per read).
    suffixes: tuple[bytes, ...]
    content_types: tuple[str, ...]

    def payload(self, raw: bytes) -> bytes | None:
        """The JSON text of one raw event."""
        if self.name == "ndjson":
            return raw.strip() or None
        lines = [ln[5:].lstrip(b" ") for ln in raw.splitlines() if ln.startswith(b"data:")]
        return b"\n".join(lines) if lines else None


SSE = Framing("sse", re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)"),
              (b"\n\n", b"\r\r", b"\n\r", b"\n\r\n", b"\r\r\n"), ("text/event-stream",))
NDJSON = Framing("ndjson", re.compile(rb"\r?\n"), (b"\n",),
                 ("application/x-ndjson", "application/jsonl", "application/json-seq"))


@dataclass(frozen=True, slots=True)
class Dialect:
    """A protocol's stream, as the scanner reads it."""

    framing: Framing
    content: re.Pattern[bytes]  # one match per content event (generated text, non-empty)
    special: re.Pattern[bytes]  # matches inside the events to decode
    hints: tuple[bytes, ...]  # substrings one of which a block holds if ``special`` may match
    # Reads one decoded special event into the reply; True when it is a usage-only event the
    # sidecar may strip (it asked for it itself).
    read: Callable[[Any, Reply], bool]
    # The generated text of one decoded event (for --tokenizer and --capture-content).
    texts: Callable[[Any], list[str]] = lambda obj: []


def _never(obj: Any) -> Request:
    return Request()


def _nothing(obj: Any) -> Reply:
    return Reply()


@dataclass(frozen=True)
class Protocol:
    """One inference API. ``request(body, path)`` reads a parsed request body (a dict);
    ``whole(body)`` a complete JSON response; ``dialect`` its stream (None: never streams)."""

    name: str  # the api label; --route PATTERN=NAME
    operation: str  # OpenTelemetry GenAI operation name (chat, text_completion, embeddings)
    request: Callable[[dict[str, Any], str], Request]
    whole: Callable[[Any], Reply] = _nothing
    dialect: Dialect | None = None
    inject_usage: bool = False  # stream_options.include_usage applies (OpenAI streams)
    # For a route two servers share (``/generate``: TGI and SGLang): the protocol a body is.
    pick: Callable[[dict[str, Any]], Protocol] | None = None


# --- field readers the modules share ----------------------------------------------------------

def count(value: Any) -> int | None:
    """A token count: a non-negative int (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


def text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


# The GenAI request attributes every API carries under its own names.
_SAMPLING = (("temperature", "gen_ai.request.temperature"), ("top_p", "gen_ai.request.top_p"),
             ("top_k", "gen_ai.request.top_k"))


def sampling(params: Any, max_tokens: str) -> dict[str, Any]:
    """``gen_ai.request.*`` attributes from ``params`` (the body, or its parameters object),
    whose output limit is named ``max_tokens``."""
    if not isinstance(params, dict):
        return {}
    attrs: dict[str, Any] = {}
    for key, attr in (*_SAMPLING, (max_tokens, "gen_ai.request.max_tokens")):
        if number(params.get(key)) is not None:
            attrs[attr] = params[key]
    return attrs


def items(value: Any) -> int | None:
    """How many inputs a batch field holds: a string or a list of token ids is one."""
    if isinstance(value, str):
        return 1
    if isinstance(value, list):
        if value and all(isinstance(x, int) for x in value):
            return 1
        return len(value)
    return None


def decode(payload: bytes | None) -> Any:
    if payload is None:
        return None
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):
        return None


# --- the scanner ----------------------------------------------------------------------------

class StreamScanner:
    """Per-request scanner. ``feed`` returns the content events seen in this read and the
    bytes to forward (the input itself unless the sidecar's own usage event must go).

    Linear in the bytes it sees: each byte is searched for a boundary once and scanned once,
    as part of the complete events it belongs to; an incomplete event is held in a buffer that
    grows by appending, up to :data:`MAX_HELD`. ``on_error(what)`` is told when an event
    overflows that bound (it is then forwarded unscanned)."""

    __slots__ = ("_boundary", "_content", "_dialect", "_held", "_hints", "_on_error",
                 "_skipping", "_special", "_suffixes", "reply", "strip_usage")

    def __init__(self, dialect: Dialect, strip_usage: bool = False,
                 on_error: Callable[[str], None] | None = None) -> None:
        self._dialect = dialect
        self._boundary = dialect.framing.boundary
        self._suffixes = dialect.framing.suffixes
        self._content = dialect.content
        self._special = dialect.special
        self._hints = dialect.hints
        self._held = bytearray()  # bytes after the last complete event
        self._skipping = False  # inside an oversized event: nothing to scan until it ends
        self._on_error = on_error
        self.strip_usage = strip_usage
        self.reply = Reply()

    def feed(self, data: bytes) -> tuple[int, bytes]:
        held = self._held
        if not held and not self._skipping and data.endswith(self._suffixes):
            complete: bytes = data  # whole events only: no copy, nothing held
        else:
            searched = max(0, len(held) - 3)  # a boundary may straddle two reads
            held += data
            if self._skipping:  # the first boundary ends the oversized event
                m = self._boundary.search(held, searched)
                return self._skip(m.end() if m else 0, data)
            end = self._last_boundary_end(held, searched)
            if not end:
                if len(held) > MAX_HELD:
                    return 0, self._overflow(data)
                return 0, (b"" if self.strip_usage else data)
            complete = bytes(held[:end])
            del held[:end]
        events = len(self._content.findall(complete))
        kept = self._specials(complete)
        return events, (kept if self.strip_usage else data)

    def _last_boundary_end(self, buf: bytearray, start: int) -> int:
        end = 0
        for m in self._boundary.finditer(buf, start):
            end = m.end()
        return end

    def _specials(self, complete: bytes) -> bytes:
        """Reads the events ``special`` matches (each once); returns ``complete`` less the
        usage-only event when the sidecar asked for that event itself."""
        for hint in self._hints:
            if hint in complete:
                break
        else:
            return complete
        drop: tuple[int, int] | None = None
        done_to = -1
        for m in self._special.finditer(complete):
            if m.start() < done_to:
                continue  # the event already read
            start, end = self._event_bounds(complete, m.start())
            done_to = end
            obj = decode(self._dialect.framing.payload(complete[start:end]))
            if obj is not None and self._dialect.read(obj, self.reply):
                drop = (start, end)
        if drop is not None and self.strip_usage:
            return complete[:drop[0]] + complete[drop[1]:]
        return complete

    def _event_bounds(self, buf: bytes, pos: int) -> tuple[int, int]:
        """Start and end of the event holding ``pos`` (``buf`` holds only complete events)."""
        start, end = 0, len(buf)
        for m in self._boundary.finditer(buf):
            if m.end() <= pos:
                start = m.end()
            elif m.start() >= pos:
                end = m.end()
                break
        return start, end

    def _overflow(self, data: bytes) -> bytes:
        """An event larger than MAX_HELD: forward what is held, scan nothing until it ends."""
        if self._on_error is not None:
            self._on_error(f"stream event over {MAX_HELD} bytes: forwarded unscanned")
        out = bytes(self._held) if self.strip_usage else data
        del self._held[:-3]  # kept (already forwarded) only to see a boundary straddle reads
        self._skipping = True
        return out

    def _skip(self, end: int, data: bytes) -> tuple[int, bytes]:
        """While skipping an oversized event, ``_held`` holds this read after the previous
        read's last 3 bytes (forwarded already: kept only to find a boundary across reads)."""
        held = self._held
        if not end:
            del held[:-3]
            return 0, data
        self._skipping = False
        rest = bytes(held[end:])
        head = data[:len(data) - len(rest)]
        held.clear()
        if not rest:
            return 0, data
        n, out = self.feed(rest)
        return n, (head + out) if self.strip_usage else data

    def abandon(self, data: bytes) -> bytes:
        """Stop scanning (after an error in it): the bytes to forward now, held ones included;
        later reads are relayed as they come."""
        out = bytes(self._held) if self.strip_usage and self._held else data
        self._held.clear()
        self.strip_usage = False
        return out

    def flush(self) -> tuple[int, bytes]:
        """At the end of the stream: the content events in an unterminated last event, and
        the bytes still held to forward."""
        tail = bytes(self._held)
        self._held.clear()
        n = 0
        if tail and not self._skipping:
            n = len(self._content.findall(tail))
            obj = decode(self._dialect.framing.payload(tail))
            if obj is not None and self._special.search(tail):
                self._dialect.read(obj, self.reply)
        return n, (tail if self.strip_usage else b"")


def stream_texts(dialect: Dialect, stream: bytes) -> list[str]:
    """All generated text of a recorded stream (for tokenizer counting; off the hot path)."""
    out: list[str] = []
    for raw in dialect.framing.boundary.split(stream):
        obj = decode(dialect.framing.payload(raw))
        if obj is not None:
            out.extend(dialect.texts(obj))
    return out
