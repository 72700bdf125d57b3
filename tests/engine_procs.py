"""Running third-party engines and the real sidecar as processes, for the engine
compatibility tests (``test_vllm_agreement``, ``test_llamacpp``)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return str(r.read().decode())


def wait_until(what: str, ok: Callable[[], object], deadline: float,
               procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
    """Poll ``ok`` until it is truthy; fail early (with the logs) when a process exits."""
    while time.monotonic() < deadline:
        for p, log in zip(procs, logs, strict=True):
            if p.poll() is not None:
                pytest.fail(f"{what}: process exited {p.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if ok():
                return
        except OSError:
            pass
        time.sleep(1.0)
    tails = "\n".join(log.read_text()[-2000:] for log in logs)
    pytest.fail(f"{what}: not ready in time\n{tails}")


def scrape(url: str) -> dict[str, tuple[float, float]]:
    """Histogram (count, sum) per family, summed over label sets; counters' totals."""
    out: dict[str, tuple[float, float]] = {}
    for fam in text_string_to_metric_families(get(url)):
        count = total = 0.0
        for s in fam.samples:
            if s.name.endswith("_count"):
                count += s.value
            elif s.name.endswith("_sum") or (fam.type == "counter"
                                              and s.name.endswith("_total")):
                total += s.value
        out[fam.name] = (count, total)
    return out


def stop(p: subprocess.Popen[bytes]) -> None:
    """TERM, then KILL, the process group a test started (start_new_session=True)."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
