"""The sidecar's own event-loop lag: how late a timer due every ``INTERVAL`` runs.

The sidecar stamps a request's arrival when its loop reads the request's bytes; while the loop
is busy (a burst of requests on a small CPU, a stolen vCPU) the bytes wait in the kernel and
that wait is in no figure. This is the measure of it, exported beside the figures it bounds
(``llm_exporter_event_loop_lag_seconds``), as Node.js exporters export theirs. One sleep-wake
every 20 ms: tens of microseconds of CPU a second.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

INTERVAL = 0.02


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
