"""The series budget: what one replica costs Prometheus.

A replica serving 10 models with one operation each, a concurrency limit (so the queue histogram
is exported) and every collector on (one GPU through the fake NVML, the engine's real vLLM
/metrics capture, host and processes, saturation, cost), driven through the real sidecar with
streaming and non-streaming requests, must expose at most BUDGET series. The count is printed
in every run, so a change that grows it shows how much.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aiohttp
import pytest

from exporter.collectors import register_collectors
from exporter.collectors.nvml import GPM_SM_ACTIVE
from exporter.collectors.nvml_fake import FakeGpu, FakeNvml
from tests.harness import running_sidecar
from tests.upstream import Script, SyntheticUpstream

BUDGET = 1500  # series per replica, 10 models x 1 operation (README "Series budget")
MODELS = 10
VLLM_METRICS = (Path(__file__).parent / "data" / "engine_metrics" / "vllm.txt").read_bytes()
SUFFIXES = re.compile(r"_(bucket|count|sum|total|created)$")


@pytest.fixture
def engine_metrics() -> Iterator[str]:
    """A real vLLM /metrics capture served over HTTP, as the engine collector scrapes it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(VLLM_METRICS)))
            self.end_headers()
            self.wfile.write(VLLM_METRICS)

        def log_message(self, *args: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/metrics"
    srv.shutdown()
    srv.server_close()


def count(text: str) -> tuple[int, Counter[str]]:
    series = [line for line in text.splitlines() if line and not line.startswith("#")]
    families: Counter[str] = Counter(SUFFIXES.sub("", s.split("{")[0].split(" ")[0])
                                     for s in series)
    return len(series), families


async def scrape_after(models: int, engine_metrics: str) -> str:
    gpu = FakeGpu(gpm={GPM_SM_ACTIVE: 40.0})
    async with SyntheticUpstream(Script(ttft=0.002, itl=0.001, tokens=4)) as up, \
            running_sidecar(up.url, engine_metrics_url=engine_metrics, max_concurrency=64,
                            slo_ttft=0.5,
                            slo_tpot=0.05, slo_e2e=5.0) as sc, aiohttp.ClientSession() as s:
        register_collectors(sc.registry, sc.sidecar.settings, sc.sidecar.state,
                            nvml=FakeNvml([gpu]))
        for m in range(models):
            for stream in (True, False):
                async with s.post(sc.url + "/v1/chat/completions", json={
                        "model": f"model-{m}", "stream": stream,
                        "messages": [{"role": "user", "content": "how many series"}]}) as r:
                    assert r.status == 200
                    await r.read()
        await asyncio.to_thread(sc.scrape)  # GPM figures need a previous sample
        return await asyncio.to_thread(sc.scrape)


async def test_ten_models_fit_the_series_budget(engine_metrics: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    one, _ = count(await scrape_after(1, engine_metrics))
    text = await scrape_after(MODELS, engine_metrics)
    total, families = count(text)
    per_model = (total - one) / (MODELS - 1)
    with capsys.disabled():  # printed in every run, CI's included
        print(f"\nseries: {total} for {MODELS} models (budget {BUDGET}); {one} for one model; "
              f"{per_model:.0f} per further (model, operation); fixed {one - per_model:.0f}")
        for name, n in families.most_common(12):
            print(f"  {n:5d}  {name}")
    assert "_created" not in text
    assert 'llm_exporter_engine_metrics_up{engine="vllm"} 1.0' in text  # all collectors on
    assert "llm_exporter_hardware_utilization_ratio" in text
    assert total <= BUDGET, f"{total} series for {MODELS} models: over the budget of {BUDGET}"
