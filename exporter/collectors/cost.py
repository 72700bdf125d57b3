"""What this replica costs, as the seeds' cost model defines it.

- ``llm_exporter_hourly_cost_dollars`` = ``--gpu-hourly-cost`` × GPUs + ``--replica-hourly-cost``
  (GPUs: the devices NVML sees on this scrape; 0 without NVML).
- ``llm_exporter_cost_dollars_total``: that hourly cost integrated over the exporter's uptime
  (each scrape adds the hours since the previous one at the current hourly cost, so a GPU
  count that changes is followed).
- Cost per million output tokens is a query, not a metric, so it can be taken over any
  window and grouping: :data:`COST_PER_MILLION_OUTPUT_TOKENS` (dashboards and rules import it).
  Only tokens generated through the sidecar count; idle time costs too, which is the point.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client.core import Metric

from exporter import catalogue as c
from exporter.collectors.base import FailsafeCollector, OnError, family


def cost_per_million_output_tokens(window: str = "5m", by: str = "") -> str:
    """PromQL: dollars per million output tokens over ``window``, optionally ``by`` labels."""
    grouping = f" by ({by})" if by else ""
    return (f"sum{grouping}(rate({c.COST.exposed}[{window}])) / "
            f"sum{grouping}(rate({c.OUTPUT_TOKENS.exposed}[{window}])) * 1e6")


COST_PER_MILLION_OUTPUT_TOKENS = cost_per_million_output_tokens()


class CostCollector(FailsafeCollector):
    NAME = "cost"
    SPECS = (c.COST, c.HOURLY_COST)

    def __init__(self, *, gpu_hourly_cost: float, replica_hourly_cost: float,
                 gpu_count: Callable[[], int] = lambda: 0,
                 clock: Callable[[], float] = time.monotonic,
                 on_error: OnError | None = None) -> None:
        super().__init__(on_error)
        self._gpu_cost = gpu_hourly_cost
        self._replica_cost = replica_hourly_cost
        self._gpu_count = gpu_count
        self._clock = clock
        self._since = clock()
        self._total = 0.0

    def hourly(self) -> float:
        return self._gpu_cost * self._gpu_count() + self._replica_cost

    def _collect(self, out: list[Metric]) -> None:
        now = self._clock()
        hourly = self.hourly()
        self._total += max(now - self._since, 0.0) / 3600.0 * hourly
        self._since = now
        total = family(c.COST)
        total.add_metric([], self._total)
        rate = family(c.HOURLY_COST)
        rate.add_metric([], hourly)
        out.extend((total, rate))
