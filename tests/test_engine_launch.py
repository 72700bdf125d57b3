"""The engine as the sidecar starts it: a subprocess, healthy before start_engine returns."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from exporter.engine.launch import EngineStartError, start_engine


def post(url: str, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read()), dict(r.headers)


def test_start_and_stop_subprocess(tiny_model_dir: Path) -> None:
    eng = start_engine(str(tiny_model_dir), max_batch=2, max_queue=4, device="cpu", quiet=True)
    try:
        body, headers = post(eng.url + "/v1/completions", {"prompt": "hello", "max_tokens": 4})
        assert body["usage"]["completion_tokens"] == int(headers["x-generated-tokens"])
        with urllib.request.urlopen(eng.url + "/engine/stats") as r:
            assert json.loads(r.read())["pid"] == eng.pid
    finally:
        eng.stop()
    assert eng.proc.poll() is not None


def test_bad_model_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(EngineStartError, match="no such file"):
        start_engine(str(tmp_path / "missing"), quiet=True)


@pytest.mark.gemma
def greedy_reference(model_dir: Path, prompt: str, tokens: int) -> str:
    """What transformers' own generate() gives greedily, on the installed release (its output
    moved between releases: 5.24 continues this prompt differently from 5.17)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=tokens, do_sample=False)
    return str(tok.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True))


def test_gemma_greedy_is_coherent() -> None:
    from exporter.engine.gemma import default_model_dir

    prompt = "Once upon a time there was a little"
    want = greedy_reference(default_model_dir(), prompt, 8)  # converts Gemma the first time
    t0 = time.monotonic()
    eng = start_engine("", max_batch=4, quiet=True)
    try:
        start = time.monotonic() - t0
        body, _headers = post(eng.url + "/v1/completions", {
            "prompt": prompt, "max_tokens": 8, "temperature": 0})
        text = body["choices"][0]["text"]
        assert text == want, (text, want)
        assert sum(ch.isalpha() for ch in text) > 10, text
        chat, _ = post(eng.url + "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Write one sentence about the sea."}],
            "max_tokens": 24, "temperature": 0})
        reply = chat["choices"][0]["message"]["content"]
        assert sum(c.isalpha() for c in reply) > 10, reply
        assert "<start_of_turn>" not in reply and "<end_of_turn>" not in reply
        t = body["timings"]
        print(f"\ngemma: start {start:.1f} s, prefill {t['prompt_ms']:.0f} ms, "
              f"{t['predicted_per_second']:.1f} tok/s, text {text!r}, chat {reply!r}")
    finally:
        eng.stop()
