"""The recorder's shortcuts must be exact: many observations in one step equal as many
``observe()`` calls, bucket by bucket, boundaries included."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram

from exporter.metrics import _observe_many, _observe_one, _observe_pairs

BOUNDS = (0.001, 0.01, 0.1, 1.0)


def exposition(registry: CollectorRegistry) -> dict[tuple[str, str | None], float]:
    return {(s.name, s.labels.get("le")): s.value for m in registry.collect()
            for s in m.samples if not s.name.endswith("_created")}


@pytest.mark.parametrize("value", [0.0005, 0.001, 0.0011, 0.01, 0.05, 1.0, 2.5])
@pytest.mark.parametrize("count", [0, 1, 7])
def test_observe_many_equals_repeated_observe(value: float, count: int) -> None:
    one, many = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("x_seconds", "x", registry=one, buckets=BOUNDS)
    h2 = Histogram("x_seconds", "x", registry=many, buckets=BOUNDS)
    for _ in range(count):
        h1.observe(value)
    _observe_many(h2, value, count)
    assert exposition(one) == pytest.approx(exposition(many))


@pytest.mark.parametrize("value", [0.0005, 0.001, 0.0011, 0.01, 0.05, 1.0, 2.5])
def test_observe_one_equals_observe_with_the_exemplar_on_the_same_bucket(value: float) -> None:
    one, fast = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("x_seconds", "x", registry=one, buckets=BOUNDS)
    h2 = Histogram("x_seconds", "x", registry=fast, buckets=BOUNDS)
    ex = {"trace_id": "0af7651916cd43dd8448eb211c80319c"}
    h1.observe(value, ex)
    _observe_one(h2, value, ex)
    assert exposition(one) == pytest.approx(exposition(fast))

    def exemplars(r: CollectorRegistry) -> list[tuple[str | None, dict[str, str], float]]:
        return [(s.labels.get("le"), s.exemplar.labels, s.exemplar.value)
                for m in r.collect() for s in m.samples if s.exemplar is not None]

    assert exemplars(one) == exemplars(fast) and len(exemplars(fast)) == 1


@pytest.mark.parametrize("pairs", [
    [(0.0005, 3), (0.001, 1), (0.05, 0), (0.0011, 2), (2.5, 1), (0.0005, 4)],
    [(0.01, 1)],
    [(0.2, 5), (0.0, 0)],
])
def test_observe_pairs_equals_one_observe_per_token_with_the_exemplar_on_the_last(
        pairs: list[tuple[float, int]]) -> None:
    one, fast = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("x_seconds", "x", registry=one, buckets=BOUNDS)
    h2 = Histogram("x_seconds", "x", registry=fast, buckets=BOUNDS)
    ex = {"trace_id": "0af7651916cd43dd8448eb211c80319c"}
    tokens = [v for v, n in pairs for _ in range(n)]
    for v in tokens[:-1]:
        h1.observe(v)
    h1.observe(tokens[-1], ex)
    _observe_pairs(h2, pairs, ex)
    assert exposition(one) == pytest.approx(exposition(fast))
    assert [(s.labels.get("le"), s.exemplar.value) for m in fast.collect() for s in m.samples
            if s.exemplar is not None] == [(s.labels.get("le"), s.exemplar.value)
                                           for m in one.collect() for s in m.samples
                                           if s.exemplar is not None]
