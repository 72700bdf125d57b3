"""PromQL built from the metric catalogue, so a dashboard can only name series that exist.

Every selector carries the dashboard's target variables (namespace, job, pod) and, for families
labelled by model, the model variable. Grafana substitutes ``.*`` for "All", which also matches
series without the label (a Prometheus outside Kubernetes has no namespace or pod).
"""

from __future__ import annotations

from collections.abc import Iterable

from exporter.catalogue import MODEL, Kind, MetricSpec

TARGET_LABELS = ("namespace", "job", "pod")
RATE = "$__rate_interval"
RANGE = "$__range"
QUANTILES = (0.5, 0.9, 0.99)


def matchers(spec: MetricSpec | None, *extra: str, targets: Iterable[str] = TARGET_LABELS
             ) -> str:
    parts = [f'{label}=~"${label}"' for label in targets]
    if spec is not None and MODEL in spec.labels:
        parts.append(f'{MODEL}=~"${MODEL}"')
    parts.extend(extra)
    return "{" + ", ".join(parts) + "}"


def series(spec: MetricSpec, *extra: str, suffix: str = "") -> str:
    """``name{selectors}``; ``suffix`` is ``_bucket``, ``_sum`` or ``_count`` for histograms."""
    if suffix and spec.kind is not Kind.HISTOGRAM:
        raise ValueError(f"{spec.name} is not a histogram")
    return spec.exposed + suffix + matchers(spec, *extra)


def _by(labels: Iterable[str]) -> str:
    labels = tuple(labels)
    return f" by ({', '.join(labels)})" if labels else ""


def rate(spec: MetricSpec, *extra: str, by: Iterable[str] = (), suffix: str = "",
         window: str = RATE) -> str:
    """Per-second rate of a counter (or a histogram's ``_count``/``_sum``), summed."""
    if spec.kind is not Kind.COUNTER and not suffix:
        raise ValueError(f"rate() of the {spec.kind.value} {spec.name}")
    return f"sum{_by(by)} (rate({series(spec, *extra, suffix=suffix)}[{window}]))"


def increase(spec: MetricSpec, *extra: str, by: Iterable[str] = (), window: str = RANGE
             ) -> str:
    return f"sum{_by(by)} (increase({series(spec, *extra)}[{window}]))"


def gauge(spec: MetricSpec, *extra: str, agg: str = "sum", by: Iterable[str] = ()) -> str:
    if spec.kind is not Kind.GAUGE:
        raise ValueError(f"{spec.name} is a {spec.kind.value}, not a gauge")
    return f"{agg}{_by(by)} ({series(spec, *extra)})"


def quantile(q: float, spec: MetricSpec, *extra: str, by: Iterable[str] = (MODEL,)) -> str:
    """The q-quantile of a histogram over the rate window, estimated from its buckets."""
    return (f"histogram_quantile({q:g}, sum{_by(('le', *by))} "
            f"(rate({series(spec, *extra, suffix='_bucket')}[{RATE}])))")


def mean(spec: MetricSpec, *extra: str, by: Iterable[str] = ()) -> str:
    """Mean of a histogram's observations over the rate window."""
    return (f"{rate(spec, *extra, by=by, suffix='_sum')} / "
            f"{rate(spec, *extra, by=by, suffix='_count')}")


def heatmap(spec: MetricSpec, *extra: str) -> str:
    """Observations per bucket per interval, for a heatmap panel (format=heatmap)."""
    return f"sum by (le) (increase({series(spec, *extra, suffix='_bucket')}[{RATE}]))"


def ratio(numerator: str, denominator: str) -> str:
    return f"({numerator}) / ({denominator})"
