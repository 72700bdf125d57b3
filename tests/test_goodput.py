"""Goodput counters on the synthetic upstream, with programmed latencies straddling each
objective: a request is good only when it succeeded and met every objective of its model at
once (good on TTFT but bad on TPOT is bad); cancelled requests are neither; 4xx not judged,
except a 429 (the server refusing for load), which is bad."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.harness import running_sidecar
from tests.upstream import Script, SyntheticUpstream

CHAT = "/v1/chat/completions"
BODY = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}

# name -> (script, result): objectives TTFT 0.2 s, TPOT 0.05 s
CASES: dict[str, tuple[Script, str]] = {
    "fast": (Script(ttft=0.02, itl=0.005, tokens=6), "good"),
    "slow first token": (Script(ttft=0.3, itl=0.005, tokens=6), "bad"),
    "good TTFT, slow after it": (Script(ttft=0.02, itl=0.1, tokens=4), "bad"),
    "5xx": (Script(status=500), "bad"),
    "cut off": (Script(ttft=0.02, itl=0.005, tokens=20, cut_after=3), "bad"),
    "4xx": (Script(status=404), "none"),
    "429, refused for load": (Script(status=429), "bad"),
}


async def test_goodput_counts_requests_that_met_every_objective() -> None:
    async with SyntheticUpstream() as up, running_sidecar(up.url, slo_ttft=0.2, slo_tpot=0.05,
                                                          slo_e2e=0) as sc, \
            aiohttp.ClientSession() as s:
        for script, _ in CASES.values():
            try:
                async with s.post(sc.url + CHAT, json=BODY, headers=script.header()) as r:
                    await r.read()
            except aiohttp.ClientPayloadError:
                pass  # the cut-off one

        # the client goes away after the first chunk
        async with s.post(sc.url + CHAT, json=BODY,
                          headers=Script(ttft=0.02, itl=0.05, tokens=40).header()) as r:
            await r.content.readany()
            r.close()
        await asyncio.sleep(0.3)

        def count(result: str) -> float:
            return sc.value("llm_exporter_goodput_requests_total",
                            {"model": "m", "result": result})

        want: dict[str, Any] = {"good": 0, "bad": 0}
        for _, result in CASES.values():
            if result != "none":
                want[result] += 1
        assert (count("good"), count("bad"), count("cancelled")) == (
            want["good"], want["bad"], 1)
        assert sc.value("llm_exporter_goodput_output_tokens_total", {"model": "m"}) == 6
        # each objective alone: the TPOT-only miss is good on TTFT
        assert sc.value("llm_exporter_slo_requests_total",
                        {"model": "m", "slo": "ttft", "result": "good"}) == 2


def test_slo_load_is_the_worse_p90_over_the_window() -> None:
    from exporter.metrics import SloLoad

    now = [100.0]
    load = SloLoad(window=30, clock=lambda: now[0])
    assert load.value() == 0.0  # nothing in the window: no load
    for i in range(10):  # TTFT ratios 0.1 .. 1.0
        load.observe("ttft", (i + 1) / 10)
    load.observe("tpot", 0.5)
    assert load.value() == 0.9  # nearest-rank p90 of the TTFT ratios
    load.observe("tpot", 3.0)
    assert load.value() == 3.0  # p90 of two TPOT ratios is the larger
    now[0] += 31  # all of it leaves the window
    assert load.value() == 0.0
    load.observe("e2e", 5.0)  # only TTFT and TPOT count
    assert load.value() == 0.0
    idle = SloLoad(window=30, clock=lambda: now[0], arrivals=False)  # no capacity configured
    for _ in range(5):
        idle.arrived()
        load.arrived()
    assert (idle.arrival_rate(), load.arrival_rate()) == (0.0, 5 / 30)


async def test_slo_load_crosses_one_when_requests_miss_their_objective() -> None:
    async with SyntheticUpstream() as up, running_sidecar(up.url, slo_ttft=0.1, slo_tpot=0.05,
                                                          slo_load_window=60) as sc, \
            aiohttp.ClientSession() as s:
        async def go(ttft: float) -> None:
            async with s.post(sc.url + CHAT, json=BODY,
                              headers=Script(ttft=ttft, itl=0.002, tokens=4).header()) as r:
                await r.read()

        for _ in range(5):
            await go(0.02)
        assert 0.1 < sc.value("llm_exporter_slo_load_ratio") < 0.5  # TTFT ~0.02 / 0.1
        for _ in range(5):
            await go(0.15)
        assert 1.4 < sc.value("llm_exporter_slo_load_ratio") < 2.0  # TTFT ~0.15 / 0.1


async def test_capacity_load_is_arrivals_over_the_calibrated_capacity() -> None:
    async with SyntheticUpstream() as up, running_sidecar(up.url, capacity_rps=10,
                                                          slo_load_window=2) as sc, \
            aiohttp.ClientSession() as s:
        assert sc.value("llm_exporter_capacity_requests_per_second") == 10
        for _ in range(6):
            async with s.post(sc.url + CHAT, json=BODY,
                              headers=Script(ttft=0, itl=0, tokens=1).header()) as r:
                await r.read()
            async with s.get(sc.url + "/v1/models") as r:  # unmatched: not demand
                await r.read()
        assert sc.value("llm_exporter_capacity_load_ratio") == pytest.approx(6 / 2 / 10)
        await asyncio.sleep(2.1)  # the window moves on
        assert sc.value("llm_exporter_capacity_load_ratio") == 0
