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
Events split across reads are handled by keeping the incomplete tail of the last read.
"""

from __future__ import annotations

import json
import re
from typing import Any

# One pass per read for content; the rare keys are looked for only when a cheap substring
# test says they are there (every OpenAI chunk carries "finish_reason":null).
_CONTENT = re.compile(rb'"(?:content|text|reasoning_content|reasoning|arguments)" ?: ?"(?!")')
_FINISH = re.compile(rb'"finish_reason" ?: ?"([A-Za-z_]{1,32})"')
_SPECIAL = re.compile(rb'"(usage|timings)" ?: ?\{')
_EMPTY_CHOICES = re.compile(rb'"choices" ?: ?\[ ?\]')


def _event_end(buf: bytes) -> int:
    """Index just past the last complete event (0 when there is none)."""
    a = buf.rfind(b"\n\n")
    b = buf.rfind(b"\r\n\r\n")
    return max(a + 2 if a >= 0 else 0, b + 4 if b >= 0 else 0)


def _event_bounds(buf: bytes, pos: int) -> tuple[int, int]:
    a, b = buf.rfind(b"\n\n", 0, pos), buf.rfind(b"\r\n\r\n", 0, pos)
    start = max(a + 2 if a >= 0 else 0, b + 4 if b >= 0 else 0)
    e1, e2 = buf.find(b"\n\n", pos), buf.find(b"\r\n\r\n", pos)
    ends = [e + n for e, n in ((e1, 2), (e2, 4)) if e >= 0]
    return start, (min(ends) if ends else len(buf))


def decode_event(raw: bytes) -> Any:
    """JSON payload of one SSE event (its ``data:`` lines joined), or None."""
    lines = [ln[5:].lstrip(b" ") for ln in raw.splitlines() if ln.startswith(b"data:")]
    if not lines:
        return None
    try:
        return json.loads(b"\n".join(lines))
    except ValueError:
        return None


class StreamScanner:
    """Per-request scanner. ``feed`` returns the content events seen in this read and the
    bytes to forward (the input itself unless the sidecar's own usage chunk must go)."""

    __slots__ = ("_tail", "finish_reason", "strip_usage", "timings", "usage")

    def __init__(self, strip_usage: bool = False) -> None:
        self._tail = b""
        self.strip_usage = strip_usage
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.timings: dict[str, Any] | None = None

    def feed(self, data: bytes) -> tuple[int, bytes]:
        buf = self._tail + data if self._tail else data
        end = _event_end(buf)
        if end == len(buf):
            self._tail = b""
            complete = buf
        else:
            self._tail = buf[end:]
            complete = buf[:end]
        events = len(_CONTENT.findall(complete))
        if b'"finish_reason":"' in complete or b'"finish_reason": "' in complete:
            reasons = _FINISH.findall(complete)
            if reasons:
                self.finish_reason = reasons[-1].decode()
        drop: tuple[int, int] | None = None
        if b'"usage"' in complete or b'"timings"' in complete:
            for m in _SPECIAL.finditer(complete):
                found = self._special(complete, m.start(), m.group(1))
                if found is not None:
                    drop = found
        if not self.strip_usage:
            return events, data
        # Forward only complete events so the usage-only event can be cut out whole.
        if drop is not None:
            complete = complete[:drop[0]] + complete[drop[1]:]
        return events, complete

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
        tail, self._tail = self._tail, b""
        if tail:
            self._scan_tail(tail)
        return tail if self.strip_usage else b""

    def _scan_tail(self, tail: bytes) -> None:
        reasons = _FINISH.findall(tail)
        if reasons:
            self.finish_reason = reasons[-1].decode()


def content_text(stream: bytes) -> str:
    """All generated text of a recorded stream (for tokenizer counting; off the hot path)."""
    parts: list[str] = []
    for raw in re.split(rb"\r?\n\r?\n", stream):
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
