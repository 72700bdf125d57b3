"""The pure timing model: each definition on hand-made timelines."""

from __future__ import annotations

import pytest

from exporter.timeline import EngineTimings, Timeline, derive, spread


def tl(**kw: object) -> Timeline:
    t = Timeline(arrival=10.0, admitted=10.5, dispatched=10.6)
    for at, n in kw.get("chunks", [(11.0, 1), (11.1, 1), (11.3, 1), (11.4, 1)]):  # type: ignore[attr-defined]
        t.content(at, n)
    t.end = 11.5
    return t


def test_definitions() -> None:
    iv = derive(tl(), output_tokens=4)
    assert iv.queue == pytest.approx(0.5)
    assert iv.ttft == pytest.approx(1.0)
    assert iv.prefill == pytest.approx(0.4)
    assert iv.decode == pytest.approx(0.4)
    assert iv.e2e == pytest.approx(1.5)
    assert iv.tpot == pytest.approx((1.5 - 1.0) / 3)
    assert [(round(v, 6), n) for v, n in iv.itl] == [(0.1, 1), (0.2, 1), (0.1, 1)]
    assert iv.phase_source == "sidecar"


def test_itl_spreads_exact_tokens_over_multi_token_chunks() -> None:
    t = tl(chunks=[(11.0, 1), (11.3, 1), (11.9, 2)])  # the last read held two events
    iv = derive(t, output_tokens=8)  # 8 tokens over 4 events: 2 each
    assert [(round(v, 6), n) for v, n in iv.itl] == [(0.15, 2), (0.15, 4)]
    assert spread(10, 4) == [3, 3, 2, 2] and sum(spread(7, 3)) == 7 and spread(3, 0) == []


def test_single_token_and_missing_points() -> None:
    iv = derive(tl(chunks=[(11.0, 1)]), output_tokens=1)
    assert iv.tpot is None and iv.itl == () and iv.decode == 0.0
    empty = Timeline(arrival=1.0)
    empty.end = 2.0
    iv = derive(empty, None)
    assert iv.ttft is None and iv.prefill is None and iv.e2e == 1.0 and iv.queue is None


def test_engine_timings_replace_the_outside_split() -> None:
    eng = EngineTimings(source="engine_span", queue=0.1, prefill=0.2, decode=0.35)
    iv = derive(tl(), 4, eng)
    assert (iv.engine_queue, iv.prefill, iv.decode) == (0.1, 0.2, 0.35)
    assert iv.ttft == pytest.approx(1.0)  # TTFT stays the client's view
    assert iv.phase_source == "engine_span"
    only_queue = derive(tl(), 4, EngineTimings(source="engine_timings", queue=0.1))
    assert only_queue.prefill == pytest.approx(0.3)  # outside prefill minus the engine's queue
