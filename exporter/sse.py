"""Incremental scan of an OpenAI-style SSE byte stream: just enough to measure, nothing more.

The relay forwards the upstream's bytes as they arrive; this scanner looks at them with one
compiled regular expression per read (C speed, no JSON decoding) to find:

- content events: a delta that carries generated text (``content``, ``text``,
  ``reasoning_content``/``reasoning`` or tool-call ``arguments``) that is not empty — the
  role-only first chunk of a chat stream carries ``"content":""`` and is not a token;
- the last ``finish_reason``;
- the one event carrying ``usage`` or ``timings`` (decoded, once per stream);

and, when the sidecar itself asked for the usage chunk, removes that usage-only event
(``"choices":[]``) so the client receives exactly the bytes it would have received.
Events split across reads are handled by holding the incomplete tail (bounded), with every
line-end form the SSE spec allows (CRLF, LF, lone CR).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

# One pass per read for content; the rare keys are looked for only when a cheap substring
# test says they are there (every OpenAI chunk carries "finish_reason":null).
_CONTENT = re.compile(rb'"(?:content|text|reasoning_content|reasoning|arguments)" ?: ?"(?!")')
_FINISH = re.compile(rb'"finish_reason" ?: ?"([A-Za-z_]{1,32})"')
_SPECIAL = re.compile(rb'"(usage|timings)" ?: ?\{')
_EMPTY_CHOICES = re.compile(rb'"choices" ?: ?\[ ?\]')


# An event ends at a blank line: a line terminator (CRLF, LF or a lone CR: the SSE spec allows
# all three) directly followed by another.
_BOUNDARY = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
# The same, tested on the end of a read (the common case: one or more whole events per read).
_BOUNDARY_SUFFIXES = (b"\n\n", b"\r\r", b"\n\r", b"\n\r\n", b"\r\r\n")
# An incomplete event held back longer than this is forwarded unscanned (and counted): a stream
# without event boundaries must not grow the sidecar's memory or delay the client.
MAX_HELD = 1024 * 1024


def _last_boundary_end(buf: bytes | bytearray, start: int = 0) -> int:
    """Index just past the last blank line at or after ``start`` (0 when there is none)."""
    end = 0
    for m in _BOUNDARY.finditer(buf, start):
        end = m.end()
    return end


def _event_bounds(buf: bytes, pos: int) -> tuple[int, int]:
    """Start and end of the event holding ``pos`` (``buf`` holds only complete events)."""
    start, end = 0, len(buf)
    for m in _BOUNDARY.finditer(buf):
        if m.end() <= pos:
            start = m.end()
        elif m.start() >= pos:
            end = m.end()
            break
    return start, end


def decode_event(raw: bytes) -> Any:
    """JSON payload of one SSE event (its ``data:`` lines joined), or None."""
    lines = [ln[5:].lstrip(b" ") for ln in raw.splitlines() if ln.startswith(b"data:")]
    if not lines:
        return None
    try:
        return json.loads(b"\n".join(lines))
    except (ValueError, RecursionError):
        return None


class StreamScanner:
    """Per-request scanner. ``feed`` returns the content events seen in this read and the
    bytes to forward (the input itself unless the sidecar's own usage chunk must go).

    Linear in the bytes it sees: each byte is searched for a boundary once and scanned once,
    as part of the complete events it belongs to; an incomplete event is held in a buffer that
    grows by appending, up to :data:`MAX_HELD`. ``on_error(what)`` is told when an event
    overflows that bound (it is then forwarded unscanned)."""

    __slots__ = ("_held", "_on_error", "_skipping", "finish_reason", "strip_usage", "timings",
                 "usage")

    def __init__(self, strip_usage: bool = False,
                 on_error: Callable[[str], None] | None = None) -> None:
        self._held = bytearray()  # bytes after the last complete event
        self._skipping = False  # inside an oversized event: nothing to scan until it ends
        self._on_error = on_error
        self.strip_usage = strip_usage
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.timings: dict[str, Any] | None = None

    def feed(self, data: bytes) -> tuple[int, bytes]:
        held = self._held
        if not held and not self._skipping and data.endswith(_BOUNDARY_SUFFIXES):
            complete: bytes = data  # whole events only: no copy, nothing held
        else:
            searched = max(0, len(held) - 3)  # a blank line may straddle two reads
            held += data
            if self._skipping:  # the first blank line ends the oversized event
                m = _BOUNDARY.search(held, searched)
                return self._skip(m.end() if m else 0, data)
            end = _last_boundary_end(held, searched)
            if not end:
                if len(held) > MAX_HELD:
                    return 0, self._overflow(data)
                return 0, (b"" if self.strip_usage else data)
            complete = bytes(held[:end])
            del held[:end]
        events = self._scan(complete)
        kept = self._specials(complete)
        return events, (kept if self.strip_usage else data)

    def _scan(self, complete: bytes) -> int:
        events = len(_CONTENT.findall(complete))
        if b'"finish_reason":"' in complete or b'"finish_reason": "' in complete:
            reasons = _FINISH.findall(complete)
            if reasons:
                self.finish_reason = reasons[-1].decode()
        return events

    def _specials(self, complete: bytes) -> bytes:
        """Records the usage and timings ``complete`` carries; returns it less the usage-only
        event when the sidecar asked for that event itself."""
        drop: tuple[int, int] | None = None
        if b'"usage"' in complete or b'"timings"' in complete:
            for m in _SPECIAL.finditer(complete):
                found = self._special(complete, m.start(), m.group(1))
                if found is not None:
                    drop = found
        return complete[:drop[0]] + complete[drop[1]:] if drop is not None else complete

    def _overflow(self, data: bytes) -> bytes:
        """An event larger than MAX_HELD: forward what is held, scan nothing until it ends."""
        if self._on_error is not None:
            self._on_error(f"SSE event over {MAX_HELD} bytes: forwarded unscanned")
        out = bytes(self._held) if self.strip_usage else data
        del self._held[:-3]  # kept (already forwarded) only to see a blank line straddle reads
        self._skipping = True
        return out

    def _skip(self, end: int, data: bytes) -> tuple[int, bytes]:
        """While skipping an oversized event, ``_held`` holds this read after the previous
        read's last 3 bytes (forwarded already: kept only to find a blank line across reads)."""
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

    def _special(self, buf: bytes, pos: int, kind: bytes) -> tuple[int, int] | None:
        start, end = _event_bounds(buf, pos)
        obj = decode_event(buf[start:end])
        if not isinstance(obj, dict):
            return None
        value = obj.get(kind.decode())
        if kind == b"timings":
            if isinstance(value, dict):
                self.timings = value
            return None
        if isinstance(value, dict):
            self.usage = value
            if self.strip_usage and not obj.get("choices") and _EMPTY_CHOICES.search(
                    buf, start, end):
                return start, end
        return None

    def flush(self) -> bytes:
        """Bytes still held at the end of the stream (an unterminated last event)."""
        tail = bytes(self._held)
        self._held.clear()
        if tail and not self._skipping:
            self._scan_tail(tail)
        return tail if self.strip_usage else b""

    def _scan_tail(self, tail: bytes) -> None:
        reasons = _FINISH.findall(tail)
        if reasons:
            self.finish_reason = reasons[-1].decode()


def content_text(stream: bytes) -> str:
    """All generated text of a recorded stream (for tokenizer counting; off the hot path)."""
    parts: list[str] = []
    for raw in _BOUNDARY.split(stream):
        obj = decode_event(raw)
        if isinstance(obj, dict):
            parts.extend(choice_texts(obj, delta=True))
    return "".join(parts)


def choice_texts(obj: dict[str, Any], delta: bool) -> list[str]:
    """Generated text in a chunk (``delta``) or a complete response (``message``/``text``)."""
    out: list[str] = []
    choices = obj.get("choices")
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
