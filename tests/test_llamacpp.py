"""The sidecar in front of llama.cpp's servers with the real Gemma 3 270M GGUF.

llama-cpp-python's OpenAI server streams no ``usage`` (it ignores ``stream_options``) and,
unlike the native ``llama-server``, sends no ``timings``: output tokens must still come out exact
through the sidecar's tokenizer (``--tokenizer`` pointing at the GGUF itself), and the phases come
from the outside view. The separate count is llama.cpp's own: the same greedy request sent
straight to the server without streaming, whose ``usage.completion_tokens`` is what llama.cpp
generated.

llama.cpp's native ``llama-server`` and its ``/completion`` route: the last event of each stream
(and the whole non-streamed body) carries ``tokens_predicted``, ``tokens_evaluated`` and
``timings``, so counts and phases must come out exactly as llama.cpp reported them.

Needs ``.venv-llamacpp`` and ``.llama-server/bin/llama-server`` (``scripts/setup-llamacpp.sh``;
~8 min and ~13 min of builds the first time): ``make test-llamacpp``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter import catalogue
from tests.engine_procs import free_port, get, scrape, stop, wait_until

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-llamacpp"
LLAMA_SERVER_DIR = ROOT / ".llama-server"
LLAMA_SERVER = LLAMA_SERVER_DIR / "bin" / "llama-server"
CAPTURED = ROOT / "tests" / "data" / "protocols" / "llamacpp_completion_stream_captured.sse"

pytestmark = [pytest.mark.llamacpp, pytest.mark.timeout(420)]
needs_venv = pytest.mark.skipif(
    not any(VENV.glob(".synced-llamacpp-*")),
    reason=".venv-llamacpp absent: run scripts/setup-llamacpp.sh (make test-llamacpp)")
needs_llama_server = pytest.mark.skipif(
    not (any(LLAMA_SERVER_DIR.glob(".built-*")) and os.access(LLAMA_SERVER, os.X_OK)),
    reason=".llama-server/bin/llama-server absent: run scripts/setup-llamacpp.sh "
           "(make test-llamacpp)")

# (prompt, max_tokens): different lengths so each count is its own.
PROMPTS = [("What is the capital of France?", 24), ("Write one sentence about the sea.", 17),
           ("List three colours.", 40)]


@pytest.fixture(scope="module")
def gguf() -> Path:
    from exporter.engine.gemma import assemble_gguf
    return assemble_gguf()


@pytest.fixture(scope="module")
def stack(gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    logs = tmp_path_factory.mktemp("logs")
    lport, pport, mport = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    llama_cmd = [str(VENV / "bin" / "python"), "-m", "llama_cpp.server", "--model", str(gguf),
                 "--chat_format", "gemma", "--interrupt_requests", "False",
                 "--n_ctx", "1024", "--host", "127.0.0.1", "--port", str(lport)]
    sidecar_cmd = [sys.executable, "-m", "exporter", "serve",
                   "--upstream", f"http://127.0.0.1:{lport}", "--host", "127.0.0.1",
                   "--port", str(pport), "--metrics-host", "127.0.0.1",
                   "--metrics-port", str(mport), "--tokenizer", str(gguf), "--no-gpu"]
    llog, slog = logs / "llama.log", logs / "sidecar.log"
    t0 = time.monotonic()
    with llog.open("wb") as lf, slog.open("wb") as sf:
        llama = subprocess.Popen(llama_cmd, stdout=lf, stderr=subprocess.STDOUT, env=env,
                                 cwd=logs, start_new_session=True)
        sidecar = subprocess.Popen(sidecar_cmd, stdout=sf, stderr=subprocess.STDOUT, cwd=ROOT,
                                   start_new_session=True)
    procs, plogs = [llama, sidecar], [llog, slog]
    try:
        wait_until("llama_cpp.server /v1/models",
                   lambda: get(f"http://127.0.0.1:{lport}/v1/models"), t0 + 180, procs, plogs)
        wait_until("sidecar /readyz", lambda: get(f"http://127.0.0.1:{mport}/readyz"),
                   time.monotonic() + 180, procs, plogs)
        yield {"llama": f"http://127.0.0.1:{lport}", "proxy": f"http://127.0.0.1:{pport}",
               "metrics": f"http://127.0.0.1:{mport}/metrics",
               "start_s": f"{time.monotonic() - t0:.1f}"}
    finally:
        stop(sidecar)
        stop(llama)


def by_labels(url: str, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    """A counter's values by label set."""
    for fam in text_string_to_metric_families(get(url)):
        if fam.name == family:
            return {tuple(sorted(s.labels.items())): s.value for s in fam.samples
                    if s.name.endswith("_total")}
    return {}


def body(prompt: str, max_tokens: int, stream: bool) -> dict[str, object]:
    return {"model": "gemma", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0.0, "seed": 1, "stream": stream}


async def stream_through(proxy: str) -> list[tuple[str, bool]]:
    """Streams every prompt through the sidecar, two at a time; (text, saw usage) each."""
    sem = asyncio.Semaphore(2)

    async def one(s: aiohttp.ClientSession, prompt: str, n: int) -> tuple[str, bool]:
        async with sem, s.post(f"{proxy}/v1/chat/completions", json=body(prompt, n, True)) as r:
            assert r.status == 200, await r.text()
            text, usage = [], False
            async for line in r.content:
                if line.startswith(b"data: {"):
                    obj = json.loads(line[6:])
                    usage = usage or bool(obj.get("usage"))
                    for ch in obj.get("choices") or []:
                        text.append((ch.get("delta") or {}).get("content") or "")
            return "".join(text), usage

    async with aiohttp.ClientSession() as s:
        return list(await asyncio.gather(*(one(s, p, n) for p, n in PROMPTS)))


async def direct_counts(llama: str) -> list[tuple[str, int]]:
    """The same requests, not streamed, straight to llama.cpp: its text and its own count."""
    out = []
    async with aiohttp.ClientSession() as s:
        for p, n in PROMPTS:
            async with s.post(f"{llama}/v1/chat/completions", json=body(p, n, False)) as r:
                obj = await r.json()
                out.append((obj["choices"][0]["message"]["content"],
                            obj["usage"]["completion_tokens"]))
    return out


@needs_venv
def test_exact_output_tokens_and_outside_phases(stack: dict[str, str]) -> None:
    streamed = asyncio.run(stream_through(stack["proxy"]))
    assert not any(usage for _, usage in streamed)  # llama-cpp-python really sends none
    truth = asyncio.run(direct_counts(stack["llama"]))
    assert [t for t, _ in streamed] == [t for t, _ in truth]  # greedy: same generations
    expected_tokens = sum(n for _, n in truth)

    deadline = time.monotonic() + 60  # counting runs after the stream, in a worker thread
    while time.monotonic() < deadline:
        m = scrape(stack["metrics"])
        if m.get(catalogue.TTFT.name, (0, 0))[0] >= len(PROMPTS) and \
                m.get(catalogue.OUTPUT_TOKENS.name, (0, 0))[1] >= expected_tokens:
            break
        time.sleep(0.5)
    print(f"llama.cpp + sidecar start {stack['start_s']} s; llama.cpp counts "
          f"{[n for _, n in truth]}; sidecar output tokens "
          f"{m.get(catalogue.OUTPUT_TOKENS.name)}; sources {m.get(catalogue.TOKEN_SOURCE.name)}")

    assert m[catalogue.OUTPUT_TOKENS.name][1] == expected_tokens
    for spec in (catalogue.TTFT, catalogue.PREFILL, catalogue.DECODE,
                 catalogue.REQUEST_DURATION):
        count, total = m[spec.name]
        assert count == len(PROMPTS), spec.name
        assert total > 0, spec.name
    assert catalogue.ENGINE_QUEUE.name not in m or m[catalogue.ENGINE_QUEUE.name][0] == 0
    n = len(PROMPTS)
    phases = by_labels(stack["metrics"], catalogue.PHASE_SOURCE.name)
    assert phases.get((("phase", "prefill"), ("source", "sidecar"))) == n, phases
    assert phases.get((("phase", "decode"), ("source", "sidecar"))) == n, phases
    tokens = by_labels(stack["metrics"], catalogue.TOKEN_SOURCE.name)
    assert tokens.get((("source", "tokenizer"), ("token_type", "output"))) == n, tokens
    ttft, e2e = m[catalogue.TTFT.name][1], m[catalogue.REQUEST_DURATION.name][1]
    assert ttft + m[catalogue.DECODE.name][1] <= e2e + 1e-6


# --- llama.cpp's native llama-server, /completion --------------------------------------------

# (prompt, stream): three streams and one whole response, each its own length.
COMPLETIONS = [("The capital of France is", True), ("Once upon a time, in a small village,", True),
               ("List three colours:", True), ("The sea is", False)]
N_PREDICT = 12
# The request the captured sample was recorded with (tests/data/protocols/README.md).
CAPTURE_BODY = {"prompt": "The capital of France is", "n_predict": 12, "temperature": 0,
                "stream": True}


@pytest.fixture(scope="module")
def native(gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    logs = tmp_path_factory.mktemp("native-logs")
    lport, pport, mport = free_port(), free_port(), free_port()
    llama_cmd = [str(LLAMA_SERVER), "-m", str(gguf), "-c", "1024", "-np", "1",
                 "--host", "127.0.0.1", "--port", str(lport)]
    sidecar_cmd = [sys.executable, "-m", "exporter", "serve",
                   "--upstream", f"http://127.0.0.1:{lport}", "--host", "127.0.0.1",
                   "--port", str(pport), "--metrics-host", "127.0.0.1",
                   "--metrics-port", str(mport), "--no-gpu"]
    llog, slog = logs / "llama-server.log", logs / "sidecar.log"
    t0 = time.monotonic()
    with llog.open("wb") as lf, slog.open("wb") as sf:
        llama = subprocess.Popen(llama_cmd, stdout=lf, stderr=subprocess.STDOUT, cwd=logs,
                                 start_new_session=True)
        sidecar = subprocess.Popen(sidecar_cmd, stdout=sf, stderr=subprocess.STDOUT, cwd=ROOT,
                                   start_new_session=True)
    procs, plogs = [llama, sidecar], [llog, slog]
    try:
        # /health answers 503 while the model loads (an HTTPError, an OSError: retried).
        wait_until("llama-server /health", lambda: get(f"http://127.0.0.1:{lport}/health"),
                   t0 + 120, procs, plogs)
        wait_until("sidecar /readyz", lambda: get(f"http://127.0.0.1:{mport}/readyz"),
                   time.monotonic() + 180, procs, plogs)
        yield {"llama": f"http://127.0.0.1:{lport}", "proxy": f"http://127.0.0.1:{pport}",
               "metrics": f"http://127.0.0.1:{mport}/metrics",
               "start_s": f"{time.monotonic() - t0:.1f}"}
    finally:
        stop(sidecar)
        stop(llama)


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    """Every event of an SSE body, each checked to be one ``data:`` line of JSON."""
    assert raw.endswith(b"\n\n"), raw[-200:]
    events = []
    for block in raw.decode().split("\n\n")[:-1]:
        assert block.startswith("data: ") and "\n" not in block, block[:200]
        events.append(json.loads(block[len("data: "):]))
    return events


def check_stream(events: list[dict[str, Any]]) -> dict[str, Any]:
    """A complete stream: partial events with ``"stop":false``, then one final; the final."""
    assert len(events) >= 2
    *partials, final = events
    assert all(e["stop"] is False and isinstance(e["content"], str) for e in partials), partials
    assert final["stop"] is True, final
    assert final["tokens_predicted"] == partials[-1]["tokens_predicted"] <= N_PREDICT
    assert isinstance(final["timings"], dict), final
    return final


async def completion(url: str, prompt: str, stream: bool) -> dict[str, Any]:
    """One ``/completion`` request to ``url``: its final event, or its whole body."""
    req = {"prompt": prompt, "n_predict": N_PREDICT, "stream": stream}
    async with aiohttp.ClientSession() as s, s.post(f"{url}/completion", json=req) as r:
        assert r.status == 200, await r.text()
        if stream:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            return check_stream(sse_events(await r.read()))
        obj: dict[str, Any] = await r.json()
        assert obj["stop"] is True and isinstance(obj["timings"], dict), obj
        return obj


async def post_raw(url: str, body: dict[str, Any]) -> bytes:
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        return await r.read()


def label_sum(values: dict[tuple[tuple[str, str], ...], float], **want: str) -> float:
    return sum(v for k, v in values.items() if want.items() <= dict(k).items())


def shape(events: list[dict[str, Any]]) -> tuple[list[str], list[str], list[str]]:
    """Key order of the partial events (all alike), of the final event and of its timings."""
    *partials, final = events
    keys = {tuple(e) for e in partials}
    assert len(keys) == 1, keys
    return list(keys.pop()), list(final), list(final["timings"])


@needs_llama_server
def test_llama_server_completion_counts_and_engine_timings(native: dict[str, str]) -> None:
    # The live server streams what the committed capture holds (same build, same request).
    live = sse_events(asyncio.run(post_raw(f"{native['llama']}/completion", CAPTURE_BODY)))
    check_stream(live)
    assert shape(live) == shape(sse_events(CAPTURED.read_bytes()))

    # One request at a time; each is recorded, with llama.cpp's phases, before the next.
    finals: list[dict[str, Any]] = []
    for i, (prompt, stream) in enumerate(COMPLETIONS, 1):
        finals.append(asyncio.run(completion(native["proxy"], prompt, stream)))
        deadline = time.monotonic() + 30  # recording follows the last byte relayed
        while time.monotonic() < deadline:
            requests = by_labels(native["metrics"], catalogue.REQUESTS.name)
            if label_sum(requests, api="llamacpp") >= i:
                break
            time.sleep(0.2)
        phases = by_labels(native["metrics"], catalogue.PHASE_SOURCE.name)
        assert phases.get((("phase", "prefill"), ("source", "engine_timings"))) == i, phases
        assert phases.get((("phase", "decode"), ("source", "engine_timings"))) == i, phases
    n = len(COMPLETIONS)
    m = scrape(native["metrics"])
    phases = by_labels(native["metrics"], catalogue.PHASE_SOURCE.name)
    tokens = by_labels(native["metrics"], catalogue.TOKEN_SOURCE.name)
    predicted = [f["tokens_predicted"] for f in finals]
    evaluated = [f["tokens_evaluated"] for f in finals]
    prompt_s = [f["timings"]["prompt_ms"] / 1000 for f in finals]
    decode_s = [f["timings"]["predicted_ms"] / 1000 for f in finals]
    cached = [(f["timings"]["prompt_n"], f["timings"]["cache_n"]) for f in finals]
    print(f"llama-server + sidecar start {native['start_s']} s; tokens_predicted {predicted}; "
          f"tokens_evaluated {evaluated}; (prompt_n, cache_n) {cached}; "
          f"prompt_ms/1000 {prompt_s}; "
          f"sidecar prefill {m.get(catalogue.PREFILL.name)}, decode "
          f"{m.get(catalogue.DECODE.name)}; phase sources {phases}")

    # tokens_evaluated is the whole prompt: the tokens evaluated now plus the reused prefix.
    assert evaluated == [p + c for p, c in cached]
    assert label_sum(requests, api="llamacpp", operation="text_completion") == n, requests
    streams = sum(stream for _, stream in COMPLETIONS)
    assert label_sum(requests, api="llamacpp", stream="true") == streams, requests
    assert label_sum(requests, api="llamacpp", status_class="2xx") == n, requests
    limits = sum(f["stop_type"] == "limit" for f in finals)  # n_predict reached
    assert label_sum(requests, api="llamacpp", finish_reason="length") == limits, requests
    assert m[catalogue.OUTPUT_TOKENS.name][1] == sum(predicted)
    assert m[catalogue.INPUT_TOKENS.name][1] == sum(evaluated)
    assert tokens.get((("source", "usage"), ("token_type", "output"))) == n, tokens
    assert tokens.get((("source", "usage"), ("token_type", "input"))) == n, tokens
    # The phases are llama.cpp's own: prompt_ms is the prefill, predicted_ms the decode.
    assert label_sum(phases, source="sidecar") == 0, phases
    assert m[catalogue.PREFILL.name][0] == n
    assert m[catalogue.PREFILL.name][1] == pytest.approx(sum(prompt_s), abs=1e-6)
    assert m[catalogue.DECODE.name][1] == pytest.approx(sum(decode_s), abs=1e-6)
