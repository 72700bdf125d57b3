"""The main job as a user runs it: `llm-exporter serve` with no --upstream starts the embedded
engine and the sidecar in front of it; real tokens flow through, the engine's own timings
reach the sidecar's metrics, and Ctrl-C stops both."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.engine_procs import free_port


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def run_serve(model: str, timeout: float) -> tuple[subprocess.Popen[str], str, str]:
    port, mport = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--metrics-host", "127.0.0.1", "--metrics-port", str(mport), "--model", model,
         "--max-batch", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{mport}"
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.5)
    proc.kill()
    raise AssertionError("serve did not become ready")


def post(url: str, body: dict[str, object]) -> bytes:
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return bytes(r.read())


def exercise(url: str, murl: str, proc: subprocess.Popen[str]) -> str:
    msg = [{"role": "user", "content": "Write one sentence about the sea."}]
    streamed = post(url, {"model": "m", "stream": True, "max_tokens": 12, "temperature": 0,
                          "messages": msg})
    assert streamed.endswith(b"data: [DONE]\n\n") and b'"usage"' not in streamed
    text = "".join(
        (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
        for line in streamed.decode().splitlines()
        if line.startswith("data: {"))
    whole = json.loads(post(url, {"model": "m", "max_tokens": 12, "temperature": 0,
                                  "messages": msg}))
    assert whole["choices"][0]["message"]["content"] == text  # greedy: same tokens
    with urllib.request.urlopen(murl + "/metrics", timeout=10) as r:
        metrics = r.read().decode()
    out = samples(metrics, "llm_exporter_output_tokens_total")
    assert sum(out.values()) == 2 * whole["usage"]["completion_tokens"]
    src = samples(metrics, "llm_exporter_phase_source_total")
    assert src[(("phase", "prefill"), ("source", "engine_timings"))] == 2
    assert sum(samples(metrics, "gen_ai_server_time_to_first_token_seconds_count").values()) == 1
    engine = samples(metrics, "llm_exporter_process_up")
    assert engine[(("process", "engine"),)] == 1
    child = [p for p in psutil.Process(proc.pid).children(recursive=True)]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    assert not [p for p in child if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    return text


def test_serve_without_upstream_runs_the_embedded_engine(tiny_model_dir: Path) -> None:
    proc, url, murl = run_serve(str(tiny_model_dir), timeout=180)
    try:
        exercise(url, murl, proc)
    finally:
        proc.kill()


@pytest.mark.gemma
def test_gemma_end_to_end_through_the_sidecar() -> None:
    proc, url, murl = run_serve("", timeout=600)  # "" = the packaged Gemma 3 270M
    try:
        text = exercise(url, murl, proc)
        words = text.split()
        assert len(words) >= 3 and sum(w.isalpha() for w in words) >= len(words) // 2, text
    finally:
        proc.kill()
