"""A streaming client in a process of its own, for timing tests: the client's clock must not
wait behind the sidecar's and the upstream's work in one shared event loop (16 streams through
one loop made the test's own client lag the sidecar by up to 6 ms on 2 cores).

    python -m tests.streamclient URL --streams 16 --spread 0.015

Warms ``--streams`` pooled connections with one round of requests (and leaves the sidecar a
moment to record it), then sends ``--streams`` staggered streams (starts spread over
``--spread`` seconds, as independent clients are), each with its own ``traceparent`` (trace id
``i + 1``), and prints one JSON object, on ``time.monotonic()`` (the same CLOCK_MONOTONIC the
sidecar's and the upstream's test clocks read):

- ``views``: per stream its trace id, ``sent`` (when the request's last bytes were handed to
  the kernel: aiohttp builds a request and writes its body in a task of its own, so the time a
  request is *started* runs ahead of the wire by this process's backlog, which no server can
  see), the content-chunk read times and ``end``;
- ``stalls``: ``[woke, late]`` for each time this process's event loop ran more than
  ``STALL`` late (a 1 ms ticker's overshoot): a read at ``woke`` may have waited ``late`` in
  the kernel for this process to run, which is the reference clock's error, not the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from types import SimpleNamespace
from typing import Any

import aiohttp

BODY = {"model": "m", "stream": True,
        "messages": [{"role": "user", "content": "w w w w w"}]}
TICK = 0.001
STALL = 0.0002


async def _body_sent(_: aiohttp.ClientSession, ctx: SimpleNamespace,
                     __: aiohttp.TraceRequestChunkSentParams) -> None:
    if isinstance(ctx.trace_request_ctx, dict):
        ctx.trace_request_ctx["sent"] = time.monotonic()  # the last chunk's write wins


async def stream_once(s: aiohttp.ClientSession, url: str,
                      headers: dict[str, str] | None = None) -> dict[str, Any]:
    view: dict[str, Any] = {"chunks": []}
    async with s.post(url, json=BODY, headers=headers, trace_request_ctx=view) as r:
        async for data in r.content.iter_any():
            if b'"content":"t' in data:
                view["chunks"].append(time.monotonic())
        view["end"] = time.monotonic()
    return view


async def ticker(stalls: list[list[float]]) -> None:
    """Note when this loop ran late: a ``TICK`` sleep that overshot by more than ``STALL``."""
    while True:
        due = time.monotonic() + TICK
        await asyncio.sleep(TICK)
        woke = time.monotonic()
        if woke - due > STALL:
            stalls.append([woke, woke - due])


def lateness(stalls: list[list[float]], at: float) -> float:
    """How late a loop whose ``ticker`` noted ``stalls`` may have handled an event at ``at``:
    the largest overshoot it measured on waking within two ticks of that moment (a stall
    delays the event and the tick alike). Zero when the loop kept time."""
    near = 2 * TICK
    return max((late for woke, late in stalls if abs(woke - at) <= near), default=0.0)


async def main(url: str, streams: int, spread: float) -> dict[str, Any]:
    trace = aiohttp.TraceConfig()
    trace.on_request_chunk_sent.append(_body_sent)
    async with aiohttp.ClientSession(trace_configs=[trace]) as s:
        await asyncio.gather(*(stream_once(s, url) for _ in range(streams)))
        await asyncio.sleep(0.25)  # let the sidecar record the warm-up round first

        async def staggered(i: int) -> dict[str, Any]:
            await asyncio.sleep(i * spread / streams)
            tid = f"{i + 1:032x}"
            view = await stream_once(s, url, {"traceparent": f"00-{tid}-{i + 1:016x}-01"})
            return {"trace_id": tid, **view}

        stalls: list[list[float]] = []
        watch = asyncio.ensure_future(ticker(stalls))
        try:
            views = list(await asyncio.gather(*(staggered(i) for i in range(streams))))
        finally:
            watch.cancel()
        return {"views": views, "stalls": stalls}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--spread", type=float, default=0.015)
    a = p.parse_args()
    print(json.dumps(asyncio.run(main(a.url, a.streams, a.spread))))
