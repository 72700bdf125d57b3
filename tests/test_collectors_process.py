"""Host and process figures from a real child process that allocates memory, burns CPU, holds
files and threads, listens on a port and has a child of its own."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest
from prometheus_client import CollectorRegistry

from exporter import catalogue as c
from exporter.collectors.process import EngineLocator, ProcessCollector
from exporter.settings import Settings
from exporter.state import ProxyState

MiB = 2**20

# A stand-in engine: peaks at ~300 MiB then drops to ~100 MiB, holds 20 files and 3 extra
# threads, listens on a port, starts a grandchild holding 64 MiB, then burns one core.
CHILD = r"""
import os, socket, subprocess, sys, threading, time
peak = bytearray(b"\x01") * (300 * 2**20)
del peak
keep = bytearray(b"\x02") * (100 * 2**20)
files = [open(os.devnull) for _ in range(20)]
for _ in range(3):
    threading.Thread(target=time.sleep, args=(120,), daemon=True).start()
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
grand = subprocess.Popen([sys.executable, "-c",
    "import time; x = bytearray(b'\\x03') * (64 * 2**20); print('g', flush=True); time.sleep(120)"],
    stdout=subprocess.PIPE)
grand.stdout.readline()
print(srv.getsockname()[1], grand.pid, flush=True)
end = time.time() + 60
while time.time() < end:
    pass
"""


@pytest.fixture(scope="module")
def engine() -> Iterator[tuple[psutil.Process, int, int]]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port, grand = (int(x) for x in proc.stdout.readline().split())
    yield psutil.Process(proc.pid), port, grand
    for p in psutil.Process(proc.pid).children(recursive=True):
        p.kill()
    proc.kill()
    proc.wait()


def collector(settings: Settings, state: ProxyState | None = None
              ) -> tuple[CollectorRegistry, EngineLocator]:
    reg = CollectorRegistry()
    locator = EngineLocator(settings, state or ProxyState())
    reg.register(ProcessCollector(locator))
    return reg, locator


E = {"process": "engine"}
S = {"process": "sidecar"}


def test_engine_figures_from_a_real_process(engine: tuple[psutil.Process, int, int]) -> None:
    proc, _, grand = engine
    reg, locator = collector(Settings(engine_pid=proc.pid))
    v = reg.get_sample_value
    first_cpu = v(c.PROCESS_CPU.exposed, E)
    t0 = time.monotonic()
    time.sleep(1.5)
    cpu = v(c.PROCESS_CPU.exposed, E)
    elapsed = time.monotonic() - t0
    assert v(c.PROCESS_UP.name, E) == 1
    assert locator.how == "engine_pid"
    util = v(c.PROCESS_CPU_UTILIZATION.name, E)
    rss = v(c.PROCESS_RSS.name, E)
    peak = v(c.PROCESS_RSS_PEAK.name, E)
    own_rss = proc.memory_info().rss
    grand_rss = psutil.Process(grand).memory_info().rss
    print(f"engine: cpu {cpu:.2f}s util {util:.2f} cores rss {rss / MiB:.0f} MiB "
          f"(own {own_rss / MiB:.0f} + grandchild {grand_rss / MiB:.0f}) peak {peak / MiB:.0f}"
          f" MiB fds {v(c.PROCESS_FDS.name, E)} threads {v(c.PROCESS_THREADS.name, E)}")
    assert first_cpu is not None and cpu is not None and cpu > first_cpu
    # One busy thread: at most one core; how much of it depends on the shared machine's load.
    assert util is not None and 0 < util <= 1.05
    assert util == pytest.approx((cpu - first_cpu) / elapsed, rel=0.1)
    # The tree: the child's own memory plus its grandchild's.
    assert rss is not None and rss >= own_rss + 60 * MiB
    assert 150 * MiB < rss < 400 * MiB
    # The 300 MiB peak came and went before the first scrape: only the kernel's VmHWM saw it.
    assert peak is not None and peak >= 300 * MiB + 60 * MiB
    assert v(c.PROCESS_FDS.name, E) >= 20
    assert v(c.PROCESS_THREADS.name, E) >= 4 + 1


def test_engine_found_by_the_upstreams_port(engine: tuple[psutil.Process, int, int]) -> None:
    proc, port, _ = engine
    reg, locator = collector(Settings(upstream=f"http://127.0.0.1:{port}"))
    assert reg.get_sample_value(c.PROCESS_UP.name, E) == 1
    assert locator.how == "port"
    pids = locator.pids()
    assert pids is not None and proc.pid in pids and len(pids) == 2


def test_engine_from_proxy_state(engine: tuple[psutil.Process, int, int]) -> None:
    proc, _, _ = engine
    reg, locator = collector(Settings(), ProxyState(engine_pid=proc.pid))
    assert reg.get_sample_value(c.PROCESS_UP.name, E) == 1
    assert locator.how == "state"


def test_no_engine_known_or_gone() -> None:
    reg, _ = collector(Settings(upstream="http://10.255.255.1:8000"))  # not this host
    assert reg.get_sample_value(c.PROCESS_UP.name, E) == 0
    assert reg.get_sample_value(c.PROCESS_RSS.name, E) is None
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    reg, _ = collector(Settings(engine_pid=dead.pid))
    assert reg.get_sample_value(c.PROCESS_UP.name, E) == 0


def test_sidecar_and_host() -> None:
    reg, _ = collector(Settings())
    v = reg.get_sample_value
    me = psutil.Process()
    assert v(c.PROCESS_UP.name, S) == 1
    rss, peak = v(c.PROCESS_RSS.name, S), v(c.PROCESS_RSS_PEAK.name, S)
    assert rss is not None and peak is not None and peak >= rss > 10 * MiB
    assert abs(rss - me.memory_info().rss) < 20 * MiB
    assert v(c.PROCESS_THREADS.name, S) >= 1
    assert v(c.PROCESS_CPU.exposed, S) > 0
    util = v(c.HOST_CPU_UTILIZATION.name)
    assert util is not None and 0 <= util <= 1
    used, total = v(c.HOST_MEMORY_USED.name), v(c.HOST_MEMORY_TOTAL.name)
    assert total == psutil.virtual_memory().total
    assert used is not None and 0 < used < total
