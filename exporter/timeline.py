"""A request's timeline as data, and the one function that derives every interval from it.

Timestamps are seconds from an injected monotonic clock; nothing here knows HTTP, Prometheus
or OpenTelemetry. Definitions (the README repeats them):

- queue    = arrival -> admitted          (waiting for a sidecar concurrency slot)
- ttft     = arrival -> first content token
- prefill  = dispatched -> first content token   (includes the engine's queue unless the
             engine reports it, in which case engine_queue is split out)
- decode   = first content token -> last content token
- e2e      = arrival -> end (last byte relayed, or the client went away)
- itl      = gap between consecutive content chunks / tokens that chunk carried, one
             observation per token
- tpot     = (e2e - ttft) / (output tokens - 1)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

Clock = Callable[[], float]


@dataclass(slots=True)
class Timeline:
    arrival: float
    admitted: float | None = None
    dispatched: float | None = None
    # One entry per upstream read that carried content events, with how many it carried.
    chunk_times: list[float] = field(default_factory=list)
    chunk_events: list[int] = field(default_factory=list)
    end: float | None = None

    def content(self, t: float, events: int) -> None:
        self.chunk_times.append(t)
        self.chunk_events.append(events)

    @property
    def first_token(self) -> float | None:
        return self.chunk_times[0] if self.chunk_times else None

    @property
    def last_token(self) -> float | None:
        return self.chunk_times[-1] if self.chunk_times else None

    @property
    def content_events(self) -> int:
        return sum(self.chunk_events)


@dataclass(frozen=True, slots=True)
class EngineTimings:
    """Phase figures an engine reported for one request (seconds), any of them optional."""

    source: str  # "engine_timings" | "engine_span"
    queue: float | None = None
    prefill: float | None = None
    decode: float | None = None
    ttft: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Intervals:
    queue: float | None
    ttft: float | None
    prefill: float | None
    decode: float | None
    e2e: float | None
    tpot: float | None
    engine_queue: float | None
    # (seconds per token, number of tokens) pairs: one histogram observation per token.
    itl: tuple[tuple[float, int], ...]
    # Where the prefill/decode/queue figures came from.
    phase_source: str


def spread(total: int, parts: int) -> list[int]:
    """Split ``total`` tokens over ``parts`` chunks as evenly as integers allow."""
    if parts <= 0:
        return []
    base, extra = divmod(max(total, 0), parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else max(a - b, 0.0)


def derive(tl: Timeline, output_tokens: int | None,
           engine: EngineTimings | None = None) -> Intervals:
    """Every interval of one request. ``output_tokens`` is the exact count when known."""
    queue = _sub(tl.admitted, tl.arrival)
    ttft = _sub(tl.first_token, tl.arrival)
    prefill = _sub(tl.first_token, tl.dispatched)
    decode = _sub(tl.last_token, tl.first_token)
    e2e = _sub(tl.end, tl.arrival)
    engine_queue: float | None = None
    source = "sidecar"
    if engine is not None:
        # The engine's own split is exact; the sidecar's queue stays its own.
        source = engine.source
        engine_queue = engine.queue
        if engine.prefill is not None:
            prefill = engine.prefill
        elif engine.queue is not None and prefill is not None:
            prefill = max(prefill - engine.queue, 0.0)
        if engine.decode is not None:
            decode = engine.decode

    tpot: float | None = None
    if output_tokens is not None and output_tokens > 1 and ttft is not None and e2e is not None:
        tpot = (e2e - ttft) / (output_tokens - 1)

    itl: list[tuple[float, int]] = []
    times = tl.chunk_times
    if len(times) > 1:
        # Tokens per read: exact when every content event is one token (the common case),
        # else the exact total spread evenly over events.
        n_events = tl.content_events
        tokens = output_tokens if output_tokens is not None else n_events
        if tokens == n_events:
            counts = tl.chunk_events
        else:
            per_event = spread(tokens, n_events)
            counts, pos = [], 0
            for k in tl.chunk_events:
                counts.append(sum(per_event[pos:pos + k]))
                pos += k
        itl = [((t - prev) / n, n)
               for prev, t, n in zip(times, times[1:], counts[1:], strict=False) if n > 0]
    return Intervals(queue, ttft, prefill, decode, e2e, tpot, engine_queue, tuple(itl), source)
