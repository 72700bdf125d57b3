"""The sidecar's own event-loop lag: how late a timer due every ``INTERVAL`` runs.

The sidecar stamps a request's arrival when its loop reads the request's bytes; while the loop
is busy (a burst of requests on a small CPU, a stolen vCPU) the bytes wait in the kernel and
that wait is in no figure. This is the measure of it, exported beside the figures it bounds
(``llm_exporter_event_loop_lag_seconds``), as Node.js exporters export theirs.

A timer falls due at moments unrelated to the traffic, so its lateness is a sample of how long
an event arriving at a random moment waits for the loop: the interval sets how many samples
(10 a second, 3,000 in a 5-minute p99), not what they estimate. Each wake costs a few
microseconds on bare metal and ~250 us on a 2-vCPU microVM (measured), so 10 a second is
0.25% of a core there; 50 a second was 1.2%.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

INTERVAL = 0.1


class LoopLag:
    """Runs on the sidecar's loop from ``start`` to ``stop``; each lateness goes to
    ``observe`` (the catalogue's histogram, owned by ``SidecarMetrics``)."""

    def __init__(self, observe: Callable[[float], None], clock: Callable[[], float],
                 interval: float = INTERVAL) -> None:
        self._observe = observe
        self._clock = clock
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        observe, clock, interval = self._observe, self._clock, self._interval
        while True:
            due = clock() + interval
            await asyncio.sleep(interval)
            observe(max(clock() - due, 0.0))
