"""Engine-reported timings: TGI headers and llama.cpp ``timings``, on recorded server output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from multidict import CIMultiDict

from exporter.engine_timings import SOURCE, from_headers, from_timings
from exporter.timeline import EngineTimings, Timeline, derive

DATA = Path(__file__).parent / "data" / "engine_output"


def load_http(name: str) -> tuple[CIMultiDict[str], bytes]:
    """A recorded HTTP response: '#' provenance lines, status line, headers, blank, body."""
    lines = (DATA / name).read_bytes().split(b"\n")
    while lines and lines[0].startswith(b"#"):
        lines.pop(0)
    assert lines.pop(0).startswith(b"HTTP/1.1 ")
    headers: CIMultiDict[str] = CIMultiDict()
    while lines[0].strip():
        k, v = lines.pop(0).decode().split(":", 1)
        headers.add(k.strip(), v.strip())
    body = b"\n".join(lines[1:])
    assert len(body.rstrip(b"\n")) == int(headers["content-length"])
    return headers, body


def sse_events(name: str) -> list[dict[str, object]]:
    """JSON payloads of the ``data:`` lines of a recorded stream (SSE comments skipped)."""
    out = []
    for line in (DATA / name).read_text().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


# --- TGI headers ------------------------------------------------------------------------------

def test_tgi_headers_recorded_response() -> None:
    headers, body = load_http("tgi_chat_nonstream.http")
    t = from_headers(headers)
    assert t == EngineTimings(SOURCE, queue=0.212, input_tokens=23, output_tokens=64)
    # The counts agree with the body's usage; inference (prefill + decode) is not split.
    usage = json.loads(body)["usage"]
    assert (t.input_tokens, t.output_tokens) == (usage["prompt_tokens"],
                                                 usage["completion_tokens"])
    assert t.prefill is None and t.decode is None and t.ttft is None


def test_tgi_headers_any_case_plain_dict_and_fractional_ms() -> None:
    t = from_headers({"X-Queue-Time": "12.5", "X-Generated-Tokens": "7"})
    assert t == EngineTimings(SOURCE, queue=0.0125, output_tokens=7)


@pytest.mark.parametrize("headers", [
    {},
    {"content-type": "application/json"},
    {"x-queue-time": "soon", "x-prompt-tokens": "-3", "x-generated-tokens": "1.5"},
    {"x-queue-time": "nan"},
    {"x-queue-time": "inf"},
    {"x-inference-time": "100", "x-time-per-token": "10"},  # nothing exact without the rest
])
def test_tgi_headers_without_usable_figures(headers: dict[str, str]) -> None:
    assert from_headers(headers) is None


def test_tgi_headers_partial() -> None:
    t = from_headers({"x-queue-time": "0", "x-prompt-tokens": "oops"})
    assert t == EngineTimings(SOURCE, queue=0.0)


def test_tgi_headers_never_raise_on_a_hostile_mapping() -> None:
    class Broken(dict[str, str]):
        def __contains__(self, key: object) -> bool:
            raise RuntimeError("boom")

    assert from_headers(Broken(a="b")) is None


def test_tgi_queue_is_split_out_of_the_outside_prefill() -> None:
    tl = Timeline(arrival=0.0, admitted=0.0, dispatched=0.01)
    tl.content(1.0, 1)
    tl.content(2.0, 1)
    tl.end = 2.0
    iv = derive(tl, 2, from_headers({"x-queue-time": "200"}))
    assert iv.engine_queue == pytest.approx(0.2)
    assert iv.prefill == pytest.approx(1.0 - 0.01 - 0.2)
    assert iv.phase_source == SOURCE


# --- llama.cpp timings ------------------------------------------------------------------------

def test_llama_server_stream_final_chunk() -> None:
    events = sse_events("llama_server_chat_stream.sse")
    with_timings = [e for e in events if "timings" in e]
    assert with_timings and with_timings[-1] is events[-1]  # only on the last chunk
    final = events[-1]
    raw = final["timings"]
    assert isinstance(raw, dict)
    t = from_timings(raw)
    assert t is not None and t.source == SOURCE
    assert t.prefill == pytest.approx(raw["prompt_ms"] / 1000)
    assert t.decode == pytest.approx(raw["predicted_ms"] / 1000)
    assert t.output_tokens == raw["predicted_n"]
    assert t.input_tokens == raw["prompt_n"] + raw["cache_n"]
    assert t.queue is None and t.ttft is None  # llama-server does not time its slot wait
    assert raw["cache_n"] > 0 and raw["prompt_n"] < t.input_tokens  # a reused prefix counts
    usage = final.get("usage")
    if isinstance(usage, dict):
        assert t.output_tokens == usage["completion_tokens"]
        assert t.input_tokens == usage["prompt_tokens"]


def test_llama_server_nonstream_body() -> None:
    _, body = load_http("llama_server_chat_nonstream.http")
    obj = json.loads(body)
    t = from_timings(obj["timings"])
    assert t is not None
    assert t.prefill == pytest.approx(obj["timings"]["prompt_ms"] / 1000)
    assert t.decode == pytest.approx(obj["timings"]["predicted_ms"] / 1000)
    assert t.output_tokens == obj["usage"]["completion_tokens"]
    assert t.input_tokens == obj["usage"]["prompt_tokens"]


def test_embedded_engine_queue_ms_extension() -> None:
    t = from_timings({"queue_ms": 30.0, "prompt_n": 5, "prompt_ms": 20.0, "predicted_n": 8,
                      "predicted_ms": 70.0, "cache_n": 0})
    assert t == EngineTimings(SOURCE, queue=0.03, prefill=0.02, decode=0.07, ttft=0.05,
                              input_tokens=5, output_tokens=8)


def test_older_llama_server_without_cache_n_gives_no_prompt_length() -> None:
    t = from_timings({"prompt_n": 6, "prompt_ms": 201.665, "prompt_per_token_ms": 33.6,
                      "prompt_per_second": 29.75, "predicted_n": 600,
                      "predicted_ms": 47212.818, "predicted_per_token_ms": 78.68,
                      "predicted_per_second": 12.7})
    assert t is not None and t.input_tokens is None and t.output_tokens == 600


@pytest.mark.parametrize("obj", [
    {}, {"prompt_n": 3}, {"prompt_ms": "x", "predicted_ms": None}, {"prompt_ms": -1.0},
    {"prompt_ms": True}, {"prompt_ms": float("nan")}, [], "timings", None, 42,
])
def test_timings_garbage_is_none(obj: object) -> None:
    assert from_timings(obj) is None  # type: ignore[arg-type]


def test_timings_partial_fields() -> None:
    t = from_timings({"predicted_ms": 12.0, "predicted_n": "many"})
    assert t == EngineTimings(SOURCE, decode=0.012)


def test_engine_timings_override_the_outside_phases() -> None:
    tl = Timeline(arrival=0.0, admitted=0.0, dispatched=0.0)
    tl.content(0.5, 1)
    tl.content(1.5, 1)
    tl.end = 1.5
    iv = derive(tl, 2, from_timings({"prompt_ms": 400.0, "predicted_ms": 990.0}))
    assert iv.prefill == pytest.approx(0.4)
    assert iv.decode == pytest.approx(0.99)
    assert iv.ttft == pytest.approx(0.5)  # TTFT stays the sidecar's own
