"""Live figures the proxy keeps and scrape-time collectors read (no locks: one event loop
writes, readers tolerate a value one request old)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ProxyState:
    in_flight: int = 0
    queued: int = 0
    # PID of the engine the sidecar fronts, when known (embedded engine or --engine-pid).
    engine_pid: int = 0
    # Engine detected from the upstream (vllm, sglang, tgi, trtllm, llamacpp, embedded, unknown).
    engine: str = "unknown"
    # Monotonic seconds the embedded engine spent computing (a batch in flight), when known.
    engine_busy_seconds: float = 0.0
