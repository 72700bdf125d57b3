"""Continuous batching in the engine: requests join a running batch, and joining is exact.

Exactness is pinned on float32 models, where padding and merging must not change a single greedy
token: the tiny Llama (full attention) and a tiny Gemma 3 with an 8-token sliding window, so the
sliding layers' truncated caches are merged and trimmed well past the window. Join points are
made deterministic by pausing the worker thread at a chosen token of a running request.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

torch = pytest.importorskip("torch")

from exporter.engine import model as model_mod  # noqa: E402
from exporter.engine.kvbatch import cache_argument, unmergeable  # noqa: E402
from exporter.engine.scheduler import Finished, GenRequest, Handle, Scheduler  # noqa: E402
from tests.test_engine_server import serving, wait_for  # noqa: E402


@pytest.fixture(scope="module")
def llama(tiny_model_dir: Path) -> model_mod.LoadedModel:
    return model_mod.load(str(tiny_model_dir), "cpu")


@pytest.fixture(scope="module")
def gemma_sliding(llama: model_mod.LoadedModel) -> model_mod.LoadedModel:
    """A random float32 Gemma 3 (sliding 8 / full layers) over the tiny tokenizer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = llama.tokenizer
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    lm = Gemma3ForCausalLM(cfg).eval()
    return model_mod.LoadedModel(lm, tok, "tiny-gemma3", "cpu", llama.stop_ids, 0.0)


class Probe(Scheduler):
    """Records every row's tokens and can hold the worker at a request's n-th token."""

    def __init__(self, lm: model_mod.LoadedModel, max_batch: int = 8) -> None:
        super().__init__(lm.model, lm.tokenizer, lm.stop_ids, lm.device, max_batch, 16)
        self.ids: dict[int, list[int]] = {}
        self.holds: list[tuple[GenRequest, int, threading.Event, threading.Event]] = []

    def hold(self, req: GenRequest, n: int) -> tuple[threading.Event, threading.Event]:
        reached, go = threading.Event(), threading.Event()
        self.holds.append((req, n, reached, go))
        return reached, go

    def _advance(self, row: Any) -> None:
        super()._advance(row)
        self.ids[row.handle.id] = list(row.ids)
        for req, n, reached, go in self.holds:
            if row.handle.req is req and len(row.ids) == n:
                reached.set()
                go.wait(10)


async def finish(h: Handle) -> Finished:
    while True:
        ev = await h.events.get()
        if isinstance(ev, Exception):
            raise ev
        if isinstance(ev, Finished):
            return ev


async def until(ev: threading.Event) -> None:
    await wait_for(ev.is_set)


def solo(lm: model_mod.LoadedModel, req: GenRequest) -> list[int]:
    """Greedy tokens from transformers' own generate() for the request alone."""
    ids = torch.tensor([req.prompt_ids])
    with torch.inference_mode():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=req.max_tokens, eos_token_id=sorted(lm.stop_ids),
                                pad_token_id=lm.tokenizer.pad_token_id)
    return [int(t) for t in out[0, ids.shape[1]:]]


def greedy(lm: model_mod.LoadedModel, text: str, max_tokens: int) -> GenRequest:
    return GenRequest(prompt_ids=lm.tokenizer(text).input_ids, max_tokens=max_tokens)


@pytest.mark.parametrize("which", ["llama", "gemma_sliding"])
async def test_requests_joining_mid_batch_decode_exactly_as_alone(
        which: str, request: pytest.FixtureRequest) -> None:
    lm: model_mod.LoadedModel = request.getfixturevalue(which)
    a = greedy(lm, "hello world", 24)  # short: the others are merged into it
    b = greedy(lm, "once upon a time there was a small language model that answered every "
                   "question politely while engines measure time to first token", 20)
    c = greedy(lm, "queue", 30)  # shorter than the batch: padded on joining
    d1 = greedy(lm, "the quick brown fox jumps", 12)  # d1 and d2 join as one prefill group
    d2 = greedy(lm, "prometheus metrics", 1)  # done at its prefill: never merged
    assert len(b.prompt_ids) > len(a.prompt_ids) + 8  # b re-pads the running batch
    sched = Probe(lm)
    sched.start()
    assert sched.continuous
    try:
        at8, go8 = sched.hold(a, 8)
        at14, go14 = sched.hold(a, 14)
        at18, go18 = sched.hold(a, 18)
        ha = sched.submit(a)
        await until(at8)
        hb = sched.submit(b)
        go8.set()
        await until(at14)
        hc = sched.submit(c)
        go14.set()
        await until(at18)
        hd1, hd2 = sched.submit(d1), sched.submit(d2)
        go18.set()
        handles = [ha, hb, hc, hd1, hd2]
        fins = await asyncio.gather(*(finish(h) for h in handles))
    finally:
        for _, _, _, go in sched.holds:
            go.set()
        sched.stop()
    for h, fin in zip(handles, fins, strict=True):
        assert sched.ids[h.id] == solo(lm, h.req), f"request {h.id} diverged from solo"
        assert fin.timings.predicted_n == len(sched.ids[h.id])
    # they did share the batch: each joiner was computed with the running rows
    assert [f.timings.batch_size for f in fins] == [4, 4, 4, 4, 2]
    assert fins[4].timings.predicted_n == 1
    stats = sched.stats()
    assert stats["batches"] == 4 and stats["running"] == 0 and stats["completed"] == 5


async def test_request_arriving_mid_batch_gets_its_tokens_before_the_batch_ends(
        llama: model_mod.LoadedModel) -> None:
    """Over HTTP: a long stream runs; a short request sent meanwhile is answered at once."""
    async with serving(llama, max_batch=4) as (url, sched), aiohttp.ClientSession() as s:
        long = await s.post(url + "/v1/completions", json={
            "prompt": "hi", "max_tokens": 1500, "temperature": 0, "stream": True})
        for _ in range(3):  # the long request is decoding
            await long.content.readline()
        assert sched.stats()["running"] == 1
        t0 = time.perf_counter()
        r = await s.post(url + "/v1/completions",
                         json={"prompt": "the quick brown fox", "max_tokens": 8,
                               "temperature": 0})
        short = await r.json()
        wall_ms = (time.perf_counter() - t0) * 1000
        assert sched.stats()["running"] == 1  # the long one is still going
        t = short["timings"]
        assert t["batch_size"] == 2
        assert t["queue_ms"] < wall_ms and t["queue_ms"] < 1000
        long.close()
        await wait_for(lambda: sched.stats()["running"] == 0)
        alone = await (await s.post(url + "/v1/completions", json={
            "prompt": "the quick brown fox", "max_tokens": 8, "temperature": 0})).json()
    assert short["choices"][0]["text"] == alone["choices"][0]["text"]


async def test_static_fallback_makes_late_requests_wait(llama: model_mod.LoadedModel) -> None:
    """With merging off (what an unmergeable cache selects), a late request waits its turn."""
    async with serving(llama, max_batch=4) as (url, sched), aiohttp.ClientSession() as s:
        sched.continuous = False
        first = await s.post(url + "/v1/completions", json={
            "prompt": "hi", "max_tokens": 60, "temperature": 0, "stream": True})
        await first.content.readline()
        second = await (await s.post(url + "/v1/completions", json={
            "prompt": "hello", "max_tokens": 4, "temperature": 0})).json()
        rest = (await first.read()).decode().split("data: ")
    final = json.loads(rest[-2])  # the chunk before [DONE] carries the timings
    t = second["timings"]
    assert t["batch_size"] == 1
    # it was admitted only after the first request's last token
    assert t["queue_ms"] >= final["timings"]["predicted_ms"] * 0.5


def test_unmergeable_names_caches_it_cannot_merge(llama: model_mod.LoadedModel) -> None:
    from transformers import DynamicCache, StaticCache

    dyn = DynamicCache(config=llama.model.config)
    static = StaticCache(config=llama.model.config, max_cache_len=16)
    ids = torch.tensor([[5, 6, 7]])
    kw = cache_argument(llama.model)
    with torch.inference_mode():
        llama.model(input_ids=ids, use_cache=True, **{kw: dyn})
        llama.model(input_ids=ids, use_cache=True, **{kw: static})
    assert unmergeable(dyn) is None
    assert "StaticCache" in (unmergeable(static) or "")


def test_cache_argument_follows_the_installed_transformers(llama: model_mod.LoadedModel) -> None:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    # 5.24 renamed the forward's KV-cache argument; passing the old name warns (an error here).
    want = "cache" if (major, minor) >= (5, 24) else "past_key_values"
    assert cache_argument(llama.model) == want

    class Old(torch.nn.Module):
        def forward(self, input_ids: Any = None, past_key_values: Any = None) -> None: ...

    class Odd(torch.nn.Module):
        def forward(self, input_ids: Any = None) -> None: ...

    assert cache_argument(Old()) == "past_key_values"
    with pytest.raises(TypeError, match="neither 'cache' nor 'past_key_values'"):
        cache_argument(Odd())
