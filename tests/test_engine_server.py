"""The embedded engine over real HTTP on 127.0.0.1, with the tiny model (in-process server)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

pytest.importorskip("torch")

from exporter.engine import model as model_mod
from exporter.engine.scheduler import Scheduler
from exporter.engine.server import build_app


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> model_mod.LoadedModel:
    return model_mod.load(str(tiny_model_dir), "cpu")


@asynccontextmanager
async def serving(lm: model_mod.LoadedModel, max_batch: int = 8, max_queue: int = 16,
                  start: bool = True) -> AsyncIterator[tuple[str, Scheduler]]:
    """An engine on a free port. ``start=False`` leaves the worker idle so requests queue."""
    sched = Scheduler(lm.model, lm.tokenizer, lm.stop_ids, lm.device, max_batch, max_queue)
    if start:
        sched.start()
    server = TestServer(build_app(sched, "tiny", 2048, "cpu"), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), sched
    finally:
        await server.close()
        if sched._thread.is_alive():
            sched.stop()


async def sse(resp: aiohttp.ClientResponse) -> list[Any]:
    """Parse an SSE body into JSON objects, with the literal '[DONE]' kept as a string."""
    raw = (await resp.read()).decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [e[6:] if e[6:] == "[DONE]" else json.loads(e[6:]) for e in events]


async def wait_for(pred: Any, timeout: float = 10.0) -> None:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, "condition not reached"
        await asyncio.sleep(0.02)


async def test_completion_shape_usage_timings_headers(loaded: model_mod.LoadedModel) -> None:
    prompt = "the quick brown fox"
    async with serving(loaded) as (url, _), aiohttp.ClientSession() as s:
        t0 = time.perf_counter()
        r = await s.post(url + "/v1/completions",
                         json={"prompt": prompt, "max_tokens": 12, "temperature": 0})
        body = await r.json()
        wall_ms = (time.perf_counter() - t0) * 1000
        assert r.status == 200
    assert body["object"] == "text_completion"
    (choice,) = body["choices"]
    assert choice["finish_reason"] in ("stop", "length")
    assert isinstance(choice["text"], str)
    n_prompt = len(loaded.tokenizer(prompt).input_ids)
    u, t = body["usage"], body["timings"]
    assert u["prompt_tokens"] == n_prompt == t["prompt_n"]
    assert u["completion_tokens"] == t["predicted_n"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert u["completion_tokens"] == 12
    for k in ("prompt_ms", "prompt_per_token_ms", "prompt_per_second", "predicted_ms",
              "predicted_per_token_ms", "predicted_per_second", "queue_ms"):
        assert t[k] >= 0
    assert t["queue_ms"] + t["prompt_ms"] + t["predicted_ms"] <= wall_ms + 5
    assert int(r.headers["x-prompt-tokens"]) == n_prompt
    assert int(r.headers["x-generated-tokens"]) == u["completion_tokens"]
    assert abs(int(r.headers["x-queue-time"]) - t["queue_ms"]) <= 1
    assert abs(int(r.headers["x-inference-time"]) - (t["prompt_ms"] + t["predicted_ms"])) <= 1


async def test_chat_stream_with_usage(loaded: model_mod.LoadedModel) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    async with serving(loaded) as (url, _), aiohttp.ClientSession() as s:
        t0 = time.perf_counter()
        r = await s.post(url + "/v1/chat/completions", json={
            "messages": msgs, "max_completion_tokens": 9, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}})
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = await sse(r)
        wall_ms = (time.perf_counter() - t0) * 1000
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage_chunk, final = chunks[-1], chunks[-2]
    assert usage_chunk["choices"] == []
    assert final["choices"][0]["finish_reason"] in ("stop", "length")
    assert all("usage" not in c for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    templated = loaded.tokenizer.apply_chat_template(msgs, tokenize=False,
                                                     add_generation_prompt=True)
    n_prompt = len(loaded.tokenizer(templated, add_special_tokens=False).input_ids)
    u, t = usage_chunk["usage"], final["timings"]
    assert u["prompt_tokens"] == n_prompt
    assert u["completion_tokens"] == t["predicted_n"] <= 9
    assert t["queue_ms"] + t["prompt_ms"] + t["predicted_ms"] <= wall_ms + 5
    assert isinstance(text, str)


async def test_stream_without_include_usage_has_no_usage(loaded: model_mod.LoadedModel) -> None:
    async with serving(loaded) as (url, _), aiohttp.ClientSession() as s:
        r = await s.post(url + "/v1/completions", json={
            "prompt": "hello world", "max_tokens": 5, "temperature": 0, "stream": True})
        events = await sse(r)
    chunks = events[:-1]
    assert all("usage" not in c and c["choices"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["timings"]["predicted_n"] <= 5


async def test_stream_text_equals_whole_text_and_stop_string(
        loaded: model_mod.LoadedModel) -> None:
    body = {"prompt": "once upon a time", "max_tokens": 24, "temperature": 0}
    async with serving(loaded) as (url, _), aiohttp.ClientSession() as s:
        whole = await (await s.post(url + "/v1/completions", json=body)).json()
        events = await sse(await s.post(url + "/v1/completions", json={**body, "stream": True}))
        text = whole["choices"][0]["text"]
        streamed = "".join(c["choices"][0]["text"] for c in events[:-1] if c["choices"])
        assert streamed == text
        if len(text) < 8 or whole["choices"][0]["finish_reason"] != "length":
            pytest.skip("greedy output too short to pick a stop string")
        stop = text[4:7]
        cut = await (await s.post(url + "/v1/completions",
                                  json={**body, "stop": [stop]})).json()
    assert cut["choices"][0]["text"] == text[:text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


async def test_concurrent_requests_are_batched_with_same_greedy_output(
        loaded: model_mod.LoadedModel) -> None:
    prompts = ["the quick brown fox", "hello", "a small language model that answered", "queue"]
    async with serving(loaded, max_batch=4, start=False) as (url, sched), \
            aiohttp.ClientSession() as s:
        async def one(p: str) -> dict[str, Any]:
            r = await s.post(url + "/v1/completions",
                             json={"prompt": p, "max_tokens": 10, "temperature": 0})
            return dict(await r.json())

        tasks = [asyncio.create_task(one(p)) for p in prompts]
        await wait_for(lambda: sched.stats()["waiting"] == 4)
        sched.start()
        batched = await asyncio.gather(*tasks)
        stats = await (await s.get(url + "/engine/stats")).json()
        alone = [await one(p) for p in prompts]
    assert stats["max_batch_seen"] == 4 and stats["batches"] == 1
    assert stats["busy_seconds"] > 0 and stats["waiting"] == 0 and stats["running"] == 0
    assert isinstance(stats["pid"], int)
    assert [b["timings"]["batch_size"] for b in batched] == [4] * 4
    assert all(b["timings"]["queue_ms"] > 0 for b in batched)
    # left padding must not change what greedy decoding produces
    assert [b["choices"][0]["text"] for b in batched] == [a["choices"][0]["text"] for a in alone]


async def test_full_queue_answers_429(loaded: model_mod.LoadedModel) -> None:
    async with serving(loaded, max_batch=1, max_queue=1, start=False) as (url, sched), \
            aiohttp.ClientSession() as s:
        first = asyncio.create_task(s.post(url + "/v1/completions",
                                           json={"prompt": "hi", "max_tokens": 3}))
        await wait_for(lambda: sched.stats()["waiting"] == 1)
        r = await s.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3})
        assert r.status == 429
        err = (await r.json())["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["code"] == "queue_full"
        sched.start()
        assert (await first).status == 200


async def test_disconnect_frees_queued_and_running_requests(
        loaded: model_mod.LoadedModel) -> None:
    async with serving(loaded, max_batch=2, start=False) as (url, sched):
        async with aiohttp.ClientSession() as s:  # gone while still queued
            task = asyncio.create_task(s.post(url + "/v1/completions",
                                              json={"prompt": "hi", "max_tokens": 5}))
            await wait_for(lambda: sched.stats()["waiting"] == 1)
            task.cancel()
        await wait_for(lambda: sched.stats()["waiting"] == 0, timeout=5)
        sched.start()
        async with aiohttp.ClientSession() as s:  # gone mid-stream
            r = await s.post(url + "/v1/completions", json={
                "prompt": "hi", "max_tokens": 2000, "temperature": 0, "stream": True})
            await r.content.readline()
            r.close()
        t0 = time.monotonic()
        await wait_for(lambda: sched.stats()["running"] == 0, timeout=10)
        assert time.monotonic() - t0 < 10
        assert sched.stats()["completed"] == 1  # the queued one never ran


async def test_errors_are_openai_shaped(loaded: model_mod.LoadedModel) -> None:
    async with serving(loaded) as (url, _), aiohttp.ClientSession() as s:
        r = await s.post(url + "/v1/completions", data=b"{not json")
        assert r.status == 400
        assert set((await r.json())["error"]) == {"message", "type", "param", "code"}
        r = await s.post(url + "/v1/chat/completions", json={"messages": "nope"})
        assert r.status == 400 and (await r.json())["error"]["param"] == "messages"
        r = await s.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 0})
        assert r.status == 400
        r = await s.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 4000})
        assert (await r.json())["error"]["code"] == "context_length_exceeded"
        r = await s.get(url + "/nowhere")
        assert r.status == 404 and "error" in await r.json()
        models = await (await s.get(url + "/v1/models")).json()
        assert models["data"][0]["id"] == "tiny"
        assert (await (await s.get(url + "/health")).json()) == {"status": "ok"}


async def test_sixteen_first_streams_through_the_sidecar_all_count_exact_input_tokens(
        loaded: model_mod.LoadedModel) -> None:
    """The H200 run's start-up burst: 48 first streams, all relayed as usage probes, all with
    unknown input tokens. Now one probe at a time (its count from the engine's timings: prompt_n
    + cache_n) and the rest injected: every count exact, none unknown."""
    from tests.harness import running_sidecar

    prompt = "count every token of this prompt"
    want = len(loaded.tokenizer(prompt)["input_ids"])
    async with serving(loaded, max_batch=16, max_queue=32) as (url, _), \
            running_sidecar(url) as sc, aiohttp.ClientSession() as s:

        async def one() -> None:
            async with s.post(sc.url + "/v1/completions", json={
                    "model": "tiny", "prompt": prompt, "max_tokens": 4, "stream": True}) as r:
                assert r.status == 200
                assert (await r.read()).endswith(b"data: [DONE]\n\n")

        await asyncio.gather(*(one() for _ in range(16)))
        src = "llm_exporter_token_count_source_total"
        assert sc.value(src, {"token_type": "input", "source": "none"}) == 0
        assert sc.value(src, {"token_type": "input", "source": "usage"}) == 15
        assert sc.value(src, {"token_type": "input", "source": "engine"}) == 1  # the probe
        assert sc.value("llm_exporter_input_tokens_total", {"model": "tiny"}) == 16 * want


async def test_ignore_eos_generates_max_tokens(loaded: model_mod.LoadedModel) -> None:
    """vLLM's ``ignore_eos``: with every token a stop token, a request ends at once unless it
    asks to ignore them (calibrate's fixed-length runs)."""
    stops = frozenset(range(len(loaded.tokenizer)))
    sched = Scheduler(loaded.model, loaded.tokenizer, stops, loaded.device, 4, 8)
    sched.start()
    server = TestServer(build_app(sched, "tiny", 2048, "cpu"), host="127.0.0.1")
    await server.start_server()
    try:
        url = str(server.make_url("")).rstrip("/")
        async with aiohttp.ClientSession() as s:
            got = []
            for extra in ({}, {"ignore_eos": True}):
                r = await s.post(url + "/v1/completions", json={
                    "prompt": "the quick brown fox", "max_tokens": 9, "temperature": 0, **extra})
                got.append((await r.json())["usage"]["completion_tokens"])
            r = await s.post(url + "/v1/completions", json={"prompt": "x", "ignore_eos": "yes"})
            assert r.status == 400 and "ignore_eos" in (await r.json())["error"]["message"]
        assert got[0] <= 1 and got[1] == 9
    finally:
        await server.close()
        sched.stop()
