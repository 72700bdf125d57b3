"""The sidecar in front of llama-cpp-python's OpenAI server with the real Gemma 3 270M GGUF.

llama-cpp-python streams no ``usage`` (it ignores ``stream_options``) and, unlike the native
``llama-server``, sends no ``timings``: output tokens must still come out exact through the
sidecar's tokenizer (``--tokenizer`` pointing at the GGUF itself), and the phases come from the
outside view. The separate count is llama.cpp's own: the same greedy request sent straight to
the server without streaming, whose ``usage.completion_tokens`` is what llama.cpp generated.

Needs ``.venv-llamacpp`` (``scripts/setup-llamacpp.sh``; ~8 min build the first time):
``make test-llamacpp``.
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

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter import catalogue
from tests.engine_procs import free_port, get, scrape, stop, wait_until

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-llamacpp"

pytestmark = [
    pytest.mark.llamacpp,
    pytest.mark.timeout(420),
    pytest.mark.skipif(not any(VENV.glob(".synced-llamacpp-*")),
                       reason=".venv-llamacpp absent: run scripts/setup-llamacpp.sh "
                              "(make test-llamacpp)"),
]

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
