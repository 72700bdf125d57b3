"""Goodput counters on the synthetic upstream, with programmed latencies straddling each
objective: a request is good only when it succeeded and met every objective of its model at
once (good on TTFT but bad on TPOT is bad); cancelled requests are neither; 4xx not judged."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

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
