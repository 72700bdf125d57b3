"""What every scrape-time collector shares: failsafe collection and fixed ``describe()``.

A collector builds fresh metric families on each scrape. When building fails, the families
finished before the failure are still exported, the failure is counted through ``on_error``
(the caller counts it as ``llm_exporter_errors_total{type="instrumentation"}``) and logged
with its traceback the first time only. The scrape itself always succeeds.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter.catalogue import Kind, MetricSpec

log = logging.getLogger(__name__)

OnError = Callable[[str], None]
Family = GaugeMetricFamily | CounterMetricFamily


def family(spec: MetricSpec, labels: Iterable[str] | None = None) -> Family:
    """A fresh, empty family for ``spec`` (labels default to the catalogue's)."""
    names = list(spec.labels if labels is None else labels)
    if spec.kind is Kind.COUNTER:
        return CounterMetricFamily(spec.name, spec.help, labels=names)
    if spec.kind is Kind.GAUGE:
        return GaugeMetricFamily(spec.name, spec.help, labels=names)
    raise ValueError(f"{spec.name}: scrape-time collectors export gauges and counters only")


class FailsafeCollector(Collector):
    """Subclasses implement :meth:`_collect`, appending finished families to ``out``.

    ``describe()`` returns the fixed families (``SPECS``) without collecting, so registering a
    collector never touches NVML, psutil or the network, and duplicate names are still caught.
    A lock serialises collection: two concurrent scrapes must not race on previous samples.
    """

    NAME = "collector"
    SPECS: tuple[MetricSpec, ...] = ()

    def __init__(self, on_error: OnError | None = None) -> None:
        self._on_error = on_error
        self._logged = False
        self._lock = threading.Lock()

    def describe(self) -> Iterator[Metric]:
        for spec in self.SPECS:
            yield family(spec)

    def collect(self) -> Iterator[Metric]:
        out: list[Metric] = []
        with self._lock:
            try:
                self._collect(out)
            except Exception as e:  # the scrape must survive anything a collector does
                self._failed(e)
        yield from out

    def _collect(self, out: list[Metric]) -> None:
        raise NotImplementedError

    def _failed(self, exc: BaseException) -> None:
        where = f"collector:{self.NAME}"
        if not self._logged:
            self._logged = True
            log.error("%s failed; the rest of the scrape is served (logged once, counted in "
                      "llm_exporter_errors_total{type=\"instrumentation\"})", where,
                      exc_info=exc)
        else:
            log.debug("%s failed again: %s", where, exc)
        if self._on_error is not None:
            try:
                self._on_error(where)
            except Exception:  # a broken hook must not break the scrape either
                log.debug("on_error hook raised", exc_info=True)
