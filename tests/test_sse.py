"""The stream scanner with the OpenAI dialect on recorded streams, fed whole and cut at every
byte boundary (tests/test_protocols.py does the same for every other protocol)."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.protocols.base import MAX_HELD, StreamScanner, stream_texts
from exporter.protocols.openai import DIALECT
from tests import harness

STREAMS = Path(__file__).parent / "data" / "streams"

# file -> (content events, finish_reason, usage completion tokens or None, has timings)
EXPECTED = {
    "vllm_chat_usage.sse": (3, "length", 3, False),
    "llamacpp_server_timings.sse": (2, "stop", 2, True),
    "crlf_reasoning_tools.sse": (2, "tool_calls", None, False),
    "spaced_text_completion.sse": (2, "stop", None, False),
}


def content_text(data: bytes) -> str:
    return "".join(stream_texts(DIALECT, data))


def scan(data: bytes, cuts: list[int], strip: bool = False) -> tuple[StreamScanner, int, bytes]:
    return harness.scan(DIALECT, data, cuts, strip)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recorded_streams_whole_and_split_everywhere(name: str) -> None:
    data = (STREAMS / name).read_bytes()
    events, finish, usage, timings = EXPECTED[name]
    for cuts in ([], *([i] for i in range(1, len(data))), list(range(1, len(data)))):
        sc, n, out = scan(data, cuts)
        assert n == events, (name, cuts[:3])
        assert out == data
        assert sc.reply.finish_reason == finish
        assert sc.reply.output_tokens == usage
        assert (sc.reply.timings is not None) == timings


def test_strip_removes_only_the_usage_only_event_at_any_split() -> None:
    data = (STREAMS / "vllm_chat_usage.sse").read_bytes()
    events = data.split(b"\n\n")
    expected = b"\n\n".join(e for e in events if b'"choices":[]' not in e)
    for i in range(0, len(data), 7):
        sc, n, out = scan(data, [i] if i else [], strip=True)
        assert out == expected
        assert n == 3
        assert (sc.reply.input_tokens, sc.reply.output_tokens) == (7, 3)


def test_strip_keeps_usage_that_rides_on_a_content_chunk() -> None:
    # llama-server puts usage on the final chunk that also has choices: not ours to remove.
    data = (STREAMS / "llamacpp_server_timings.sse").read_bytes()
    sc, _, out = scan(data, [], strip=True)
    assert out == data
    assert sc.reply.usage_seen


def test_role_only_and_null_content_are_not_tokens() -> None:
    sc = StreamScanner(DIALECT)
    n, _ = sc.feed(b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
                   b'data: {"choices":[{"delta":{"content":null}}]}\n\n')
    assert n == 0
    n, _ = sc.feed(b'data: {"choices":[{"delta":{"content":"\\"quoted\\" x"}}]}\n\n')
    assert n == 1


def test_content_that_looks_like_a_key_is_not_double_counted() -> None:
    sc = StreamScanner(DIALECT)
    n, _ = sc.feed(b'data: {"choices":[{"delta":{"content":"say \\"content\\":\\"x\\""}}]}\n\n')
    assert n == 1


def test_content_text_joins_generated_text_of_a_stream() -> None:
    data = (STREAMS / "crlf_reasoning_tools.sse").read_bytes()
    assert content_text(data) == 'Think{"x": 1}'
    assert content_text((STREAMS / "spaced_text_completion.sse").read_bytes()) == 'A b"c'


def _line_ends(data: bytes, form: bytes) -> bytes:
    """``data`` (LF line ends) with every line end replaced by ``form``; ``mixed`` cycles
    through CRLF, LF and a lone CR, so blank lines come out as every pair the spec allows."""
    if form != b"mixed":
        return data.replace(b"\n", form)
    forms = [b"\r\n", b"\n", b"\r"]
    parts = data.split(b"\n")
    return b"".join(p + forms[i % 3] for i, p in enumerate(parts[:-1])) + parts[-1]


@pytest.mark.parametrize("form", [b"\r", b"\r\n", b"mixed"])
def test_every_line_end_form_at_every_split(form: bytes) -> None:
    """CR-only line ends (valid SSE) were never seen as event ends: with usage stripped, the
    whole stream was held until it ended. Every form is an event end now."""
    lf = (STREAMS / "vllm_chat_usage.sse").read_bytes()
    data = _line_ends(lf, form)
    for cuts in ([], *([i] for i in range(1, len(data))), list(range(1, len(data)))):
        sc, n, out = scan(data, cuts)
        assert (n, out, sc.reply.finish_reason) == (3, data, "length")
        assert sc.reply.output_tokens == 3
    sc = StreamScanner(DIALECT, strip_usage=True)
    n, out = sc.feed(data)
    assert n == 3 and b'"choices":[]' not in out and out  # forwarded at once, usage cut
    assert b'"finish_reason":"length"' in out


def test_a_stream_without_event_ends_is_forwarded_and_memory_stays_bounded() -> None:
    errors: list[str] = []
    sc = StreamScanner(DIALECT, strip_usage=True, on_error=errors.append)
    junk = b"data: " + b"x" * 9000 + b"\n"  # line ends, never a blank line
    sent, out = b"", b""
    for _ in range(300):  # 2.7 MB
        sent += junk
        out += sc.feed(junk)[1]
        assert len(sc._held) <= MAX_HELD + len(junk)
    assert errors and len(errors) == 1  # counted once per oversized event
    tail = b'\ndata: {"choices":[{"delta":{"content":"a"}}]}\n\n'
    n, last = sc.feed(tail)
    out += last + sc.flush()[1]
    assert out == sent + tail  # nothing lost, nothing reordered
    assert n == 1  # scanning resumes after the oversized event
