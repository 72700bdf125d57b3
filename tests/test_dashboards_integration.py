"""The dashboards against real servers: a real Prometheus (exemplar storage on, the generated
rules loaded) scrapes the real sidecar (`python -m exporter serve`) in front of the synthetic
upstream while mixed streaming traffic flows. Every query of every panel must return data,
except the few that need what this machine lacks, which are named below and still checked for
syntax by Prometheus itself.

LLM_EXPORTER_SCREENSHOTS=1 also drives a longer, more varied load and redraws the committed
screenshots (dashboards/*.png) from the same Prometheus.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from exporter import catalogue as c
from exporter import dashboards, rules
from exporter.dashboards import walk
from tests import promstack
from tests.upstream import script_header

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(promstack.PROMETHEUS is None,
                                 reason="needs Prometheus (scripts/setup.sh test)")]

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = os.environ.get("LLM_EXPORTER_SCREENSHOTS") == "1"
TRAFFIC_SECONDS = 30  # reaches the peak of the load wave: the sidecar's queue fills
SCREENSHOT_SECONDS = 180  # three waves and a slow spell, for pictures worth looking at
RATE_INTERVAL = "15s"  # $__rate_interval for a 1 s scrape interval
MODELS = {"llama-3.1-8b": (0.12, 0.018), "qwen2.5-7b": (0.07, 0.012)}  # median TTFT, ITL

# (dashboard uid, panel title, refId): why it cannot have data on this machine.
NO_GPU = "no GPU here (NVML absent)"
NO_ENGINE = "the synthetic upstream serves no /metrics and reports no engine timings"
NO_KSM = "no Kubernetes or kube-state-metrics here"
NOT_CHECKABLE: dict[tuple[str, str, str], str] = {
    **{("llm-exporter-gpu", title, ref): NO_GPU for title, refs in (
        ("GPU utilisation", "A"), ("Tensor cores and DRAM (GPM)", "AB"),
        ("GPU memory", "ABC"), ("GPU power", "A"), ("GPU temperature", "A"),
        ("GPU health", "ABC")) for ref in refs},
    **{("llm-exporter-capacity", title, "A"): NO_ENGINE for title in (
        "Engine queue", "Engine batch", "KV cache usage", "Prefix cache hit ratio",
        "Preemptions/s")},
    **{("llm-exporter-phases", title, ref): NO_ENGINE for title, ref in (
        ("Mean time per request by phase", "B"), ("Engine queue", "A"), ("Engine queue", "B"),
        ("Engine queue", "C"), ("Engine queue distribution", "A"))},
    ("llm-exporter-capacity", "Replicas", "C"): NO_KSM,
    ("llm-exporter-capacity", "Replicas", "D"): NO_KSM,
}


def _script(rng: random.Random, model: str, slow: bool) -> dict[str, Any]:
    ttft, itl = MODELS[model]
    fields: dict[str, Any] = {
        "ttft": min(3.0, rng.lognormvariate(math.log(ttft * (4 if slow else 1)), 0.5)),
        "itl": min(0.2, rng.lognormvariate(math.log(itl), 0.3)),
        "tokens": rng.randint(8, 64), "tokens_per_chunk": rng.choice((1, 1, 1, 2))}
    roll = rng.random()
    if roll < 0.01:
        fields.update(status=500)
    elif roll < 0.02:
        fields.update(status=429)
    elif roll < 0.03:
        fields.update(cut_after=3)  # the upstream dies mid-stream
    elif roll < 0.06:
        fields.update(finish_reason="length")
    return fields


async def _one(session: aiohttp.ClientSession, url: str, rng: random.Random, slow: bool
               ) -> None:
    model = rng.choice(list(MODELS))
    other = rng.random()
    try:
        if other < 0.03:  # unmatched: counted by method and status only
            async with session.get(url + "/v1/models") as r:
                await r.read()
            return
        if other < 0.08:  # a batch request: inputs per request
            inputs = [f"doc {i}" for i in range(rng.randint(1, 40))]
            async with session.post(url + "/v1/embeddings",
                                    json={"model": model, "input": inputs}) as r:
                await r.read()
            return
    except (TimeoutError, aiohttp.ClientError):
        return
    stream = rng.random() < 0.85
    chat = rng.random() < 0.8
    words = " ".join(f"w{i}" for i in range(rng.randint(5, 300)))
    body: dict[str, Any] = {"model": model, "stream": stream, "max_tokens": 64}
    if chat:
        body["messages"] = [{"role": "user", "content": words}]
    else:
        body["prompt"] = words
    path = "/v1/chat/completions" if chat else "/v1/completions"
    headers = script_header(**_script(rng, model, slow))
    hang_up = stream and rng.random() < 0.02  # the client goes away mid-stream
    try:
        async with session.post(url + path, json=body, headers=headers) as r:
            n = 0
            async for _ in r.content.iter_any():
                n += 1
                if hang_up and n >= 3:
                    r.close()
                    return
    except (TimeoutError, aiohttp.ClientError):
        pass


async def drive(url: str, seconds: float, seed: int = 7, peak: int = 8) -> int:
    """Mixed traffic for ``seconds``: two models, streaming and not, chat and text, a few
    errors, cut-offs and client hang-ups, with concurrency swelling and ebbing (period 60 s)
    so the sidecar's queue fills at the peaks. Returns the requests sent."""
    rng = random.Random(seed)
    start = time.monotonic()
    sent = 0

    async def worker(i: int) -> None:
        nonlocal sent
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            while (t := time.monotonic() - start) < seconds:
                level = 1 + (peak - 1) * (0.5 - 0.5 * math.cos(2 * math.pi * t / 60))
                if i >= level:
                    await asyncio.sleep(0.2)
                    continue
                slow = 40 < (t % 120) < 50  # a short slow spell: SLO misses, burn
                await _one(s, url, rng, slow)
                sent += 1
                await asyncio.sleep(rng.expovariate(4))

    await asyncio.gather(*(worker(i) for i in range(peak)))
    return sent


def _proxies(url: str) -> bool:
    body = json.dumps({"model": next(iter(MODELS)), "messages": []}).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", method="POST", data=body,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return bool(r.status == 200)


@dataclass
class Stack:
    prometheus: str
    sidecar: str
    evaluated_at: float  # when traffic had run: queries are evaluated here
    seconds: float  # how long traffic ran
    sent: int


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("dashboards-stack")
    up_port, port, metrics_port = (promstack.free_port() for _ in range(3))
    py = sys.executable
    procs: list[subprocess.Popen[bytes]] = []
    try:
        upstream = subprocess.Popen(
            [py, "-m", "tests.upstream", "--port", str(up_port)], cwd=ROOT,
            stdout=(tmp / "upstream.log").open("wb"), stderr=subprocess.STDOUT)
        procs.append(upstream)
        # The upstream's process stands in for the engine's (process CPU and memory panels).
        sidecar = subprocess.Popen(
            [py, "-m", "exporter", "serve", "--upstream", f"http://127.0.0.1:{up_port}",
             "--host", "127.0.0.1", "--port", str(port), "--metrics-host", "127.0.0.1",
             "--metrics-port", str(metrics_port), "--slo", str(ROOT / rules.DEFAULT_SLO),
             "--engine-pid", str(upstream.pid), "--max-concurrency", "4", "--capacity-rps", "5",
             "--gpu-hourly-cost", "2.5", "--replica-hourly-cost", "0.5",
             "--log-level", "warning"],
            cwd=ROOT, stdout=(tmp / "sidecar.log").open("wb"), stderr=subprocess.STDOUT)
        procs.append(sidecar)
        url = f"http://127.0.0.1:{port}"
        promstack.wait_until("the sidecar to relay a request", lambda: _proxies(url), 60)
        with promstack.prometheus(tmp, [f"127.0.0.1:{metrics_port}"]) as prom:
            promstack.wait_until("Prometheus to scrape the sidecar",
                                 lambda: promstack.query(prom, c.IN_FLIGHT.exposed))
            seconds = SCREENSHOT_SECONDS if SCREENSHOTS else TRAFFIC_SECONDS
            sent = asyncio.run(drive(url, seconds))
            time.sleep(3)  # the last scrapes and rule evaluations
            yield Stack(prom, url, time.time(), seconds, sent)
    finally:
        promstack.stop_processes(procs)


def _intervals(st: Stack) -> dict[str, str]:
    return {**walk.INTERVALS, "__rate_interval": RATE_INTERVAL,
            "__range": f"{int(st.seconds) + 30}s"}


def test_every_panel_query_returns_data(stack: Stack) -> None:
    assert stack.sent > 50
    empty, unexpected = [], []
    queries = [q for b in dashboards.build_all().values() for q in walk.panel_queries(b)]
    for q in queries:
        # Prometheus is the authority on syntax: query() fails on one it rejects.
        result = promstack.query(stack.prometheus,
                                 walk.substitute(q.expr, intervals=_intervals(stack)),
                                 stack.evaluated_at)
        key = (q.board, q.panel, q.ref)
        if key in NOT_CHECKABLE:
            if result:
                unexpected.append(key)
        elif not result:
            empty.append(key)
    assert empty == [], "panels without data"
    assert unexpected == [], "these have data now: remove them from NOT_CHECKABLE"
    names = {(q.board, q.panel, q.ref) for q in queries}
    assert set(NOT_CHECKABLE) <= names, "NOT_CHECKABLE names a query that no longer exists"


def test_variables_offer_values(stack: Stack) -> None:
    for board in dashboards.build_all().values():
        for name, query in walk.variable_queries(board):
            selector, _ = walk.label_values(query)
            body = promstack.get_json(f"{stack.prometheus}/api/v1/series", **{
                "match[]": walk.substitute(selector), "start": stack.evaluated_at - 60,
                "end": stack.evaluated_at})
            assert body["status"] == "success" and body["data"], (board["uid"], name)
    models = promstack.get_json(f"{stack.prometheus}/api/v1/label/{c.MODEL}/values")["data"]
    assert set(MODELS) <= set(models)


def test_ttft_exemplars_carry_trace_ids(stack: Stack) -> None:
    body = promstack.get_json(f"{stack.prometheus}/api/v1/query_exemplars",
                query=f"{c.TTFT.exposed}_bucket", start=stack.evaluated_at - 600,
                end=stack.evaluated_at)
    assert body["status"] == "success"
    trace_ids = {e["labels"].get("trace_id") for g in body["data"] for e in g["exemplars"]}
    assert len(trace_ids) > 10
    assert all(t and len(t) == 32 and int(t, 16) for t in trace_ids)


@pytest.mark.skipif(not SCREENSHOTS or shutil.which("chromium") is None,
                    reason="set LLM_EXPORTER_SCREENSHOTS=1 (and install chromium) to redraw "
                           "dashboards/*.png")
def test_redraw_screenshots(stack: Stack) -> None:
    spec = importlib.util.spec_from_file_location("render_dashboards",
                                                  ROOT / "scripts" / "render_dashboards.py")
    assert spec and spec.loader
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    pngs = render.render(stack.prometheus, ROOT / "dashboards", range_s=stack.seconds + 20,
                         rate_interval=RATE_INTERVAL)
    assert [p.name for p in pngs] == [f"{s}.png" for s in dashboards.BOARDS]
    assert all(p.stat().st_size > 50_000 for p in pngs)


if __name__ == "__main__":  # dev: drive traffic at a running sidecar
    import sys

    print(asyncio.run(drive(sys.argv[1], float(sys.argv[2]))))
