"""A streaming client in a process of its own, for timing tests: the client's clock must not
wait behind the sidecar's and the upstream's work in one shared event loop (16 streams through
one loop made the test's own client lag the sidecar by up to 6 ms on 2 cores).

    python -m tests.streamclient URL --streams 16 --spread 0.015

Warms ``--streams`` pooled connections with one round of requests (and leaves the sidecar a
moment to record it), then sends ``--streams``
staggered streams (starts spread over ``--spread`` seconds, as independent clients are), each
with its own ``traceparent`` (trace id ``i + 1``), and prints one JSON line: per stream its
trace id, send time, content-chunk arrival times and end, on ``time.monotonic()`` (the same
CLOCK_MONOTONIC the sidecar's and the upstream's test clocks read).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import aiohttp

BODY = {"model": "m", "stream": True,
        "messages": [{"role": "user", "content": "w w w w w"}]}


async def stream_once(s: aiohttp.ClientSession, url: str,
                      headers: dict[str, str] | None = None) -> dict[str, Any]:
    t0 = time.monotonic()
    chunks: list[float] = []
    async with s.post(url, json=BODY, headers=headers) as r:
        async for data in r.content.iter_any():
            if b'"content":"t' in data:
                chunks.append(time.monotonic())
        end = time.monotonic()
    return {"t0": t0, "chunks": chunks, "end": end}


async def main(url: str, streams: int, spread: float) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(stream_once(s, url) for _ in range(streams)))
        await asyncio.sleep(0.25)  # let the sidecar record the warm-up round first

        async def staggered(i: int) -> dict[str, Any]:
            await asyncio.sleep(i * spread / streams)
            tid = f"{i + 1:032x}"
            view = await stream_once(s, url, {"traceparent": f"00-{tid}-{i + 1:016x}-01"})
            return {"trace_id": tid, **view}

        return list(await asyncio.gather(*(staggered(i) for i in range(streams))))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--spread", type=float, default=0.015)
    a = p.parse_args()
    print(json.dumps(asyncio.run(main(a.url, a.streams, a.spread))))
