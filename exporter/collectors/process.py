"""Host and process figures from psutil, read at scrape time, for two processes
(``process="engine"`` and ``process="sidecar"``) and the host.

Finding the engine (first that answers): ``--engine-pid``; ``ProxyState.engine_pid`` (the
embedded engine sets it); the process listening on the upstream's port when the upstream is
on this host (``psutil.net_connections``; another user's process is only visible with enough
privileges, and in a pod only with a shared PID namespace). The engine's figures cover the
process and all its descendants (vLLM serves from an API process and computes in an
``EngineCore`` child); the sidecar's cover the sidecar process alone, so an engine started as
the sidecar's child is never counted twice.

Definitions:

- CPU seconds: user + system time of the live processes, plus the time of children the root
  has already reaped; never allowed to go down (a child exiting before its parent reaps it
  would otherwise make the counter dip).
- CPU utilisation: CPU seconds gained over wall seconds since the reference sample (in cores:
  2.0 = two cores busy); on the first scrape, since the process started. The reference moves
  only when at least ``min_window`` (1 s) has passed, so two scrapes in quick succession (an HA
  pair of Prometheus servers) repeat the last figure instead of dividing noise by nothing.
- Resident memory: sum of RSS (shared pages of forked processes count once per process).
- Peak resident memory: the largest of (a) the highest resident memory this collector has seen
  across scrapes, and (b) the kernel's own high-water mark, which also catches spikes between
  scrapes: ``getrusage(RUSAGE_SELF).ru_maxrss`` for the sidecar, and the sum of ``VmHWM`` from
  ``/proc/PID/status`` over the engine's processes (exact for one process, an upper bound for
  several whose peaks did not coincide). psutil's ``memory_full_info`` adds USS/PSS/swap but no
  peak, so it is not used here. Where ``/proc`` is unreadable (other user, not Linux) only (a)
  remains: a lower bound.
- Host CPU utilisation: busy over total CPU time of all cores since the previous scrape (idle
  and iowait count as idle). Host memory used: total minus available (what the kernel could
  not hand to a new process without swapping), not psutil's narrower ``used``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import psutil
from prometheus_client.core import Metric

from exporter import catalogue as c
from exporter.collectors.base import FailsafeCollector, Family, OnError, family
from exporter.settings import Settings
from exporter.state import ProxyState

log = logging.getLogger(__name__)

PROCESS_SPECS = (c.PROCESS_UP, c.PROCESS_CPU, c.PROCESS_CPU_UTILIZATION, c.PROCESS_RSS,
                 c.PROCESS_RSS_PEAK, c.PROCESS_FDS, c.PROCESS_THREADS)
HOST_SPECS = (c.HOST_CPU_UTILIZATION, c.HOST_MEMORY_USED, c.HOST_MEMORY_TOTAL)
_ERRORS = (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess)


def _local_host(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if ip.is_loopback or ip.is_unspecified:
        return True
    return any(a.address.split("%")[0] == str(ip)
               for addrs in psutil.net_if_addrs().values() for a in addrs)


class EngineLocator:
    """The engine's PID and its descendants, found as the module docstring says."""

    def __init__(self, settings: Settings, state: ProxyState, *,
                 upstream: Callable[[], str] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 retry_seconds: float = 10.0) -> None:
        self._settings = settings
        self._state = state
        self._upstream = upstream or (lambda: settings.upstream)
        self._clock = clock
        self._retry = retry_seconds
        self._by_port: psutil.Process | None = None
        self._looked_at = -1e18
        self.how = "unknown"  # engine_pid | state | port | unknown

    def process(self) -> psutil.Process | None:
        for pid, how in ((self._settings.engine_pid, "engine_pid"),
                         (self._state.engine_pid, "state")):
            if pid:
                try:
                    self.how = how
                    return psutil.Process(pid)
                except psutil.NoSuchProcess:
                    return None
        if self._by_port is not None and self._by_port.is_running():
            self.how = "port"
            return self._by_port
        self._by_port = None
        if self._clock() - self._looked_at >= self._retry:
            self._looked_at = self._clock()
            self._by_port = self._find_by_port()
            if self._by_port is not None:
                log.info("engine process found listening on the upstream's port: pid %d (%s)",
                         self._by_port.pid, _name(self._by_port))
                self.how = "port"
        return self._by_port

    def pids(self) -> set[int] | None:
        """The engine's PID and its descendants' (for GPU process memory); None: unknown."""
        root = self.process()
        if root is None:
            return None
        try:
            return {root.pid, *(p.pid for p in root.children(recursive=True))}
        except _ERRORS:
            return {root.pid}

    def _find_by_port(self) -> psutil.Process | None:
        url = urlsplit(self._upstream())
        if not url.hostname or not _local_host(url.hostname):
            return None
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            conns = psutil.net_connections(kind="tcp")
        except (psutil.AccessDenied, OSError):
            return None
        for conn in conns:
            if (conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port
                    and conn.pid and conn.pid != os.getpid()):
                try:
                    return psutil.Process(conn.pid)
                except psutil.NoSuchProcess:
                    continue
        return None


def _name(p: psutil.Process) -> str:
    try:
        return str(p.name())
    except _ERRORS:
        return "?"


def _vm_hwm_bytes(pid: int) -> int | None:
    """The kernel's peak RSS of one process (Linux ``VmHWM``), None where unreadable."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _self_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes; Linux: KiB


@dataclass
class _Prev:
    key: tuple[int, float]  # (pid, create_time): a new process restarts the figures
    cpu: float  # at the reference sample
    at: float
    util: float  # the utilisation computed at the reference sample
    peak: float
    exported_cpu: float


@dataclass
class _Figures:
    cpu: float = 0.0
    rss: float = 0.0
    hwm: float | None = 0.0
    fds: float | None = 0.0
    threads: float = 0.0


class ProcessCollector(FailsafeCollector):
    NAME = "process"
    SPECS = PROCESS_SPECS + HOST_SPECS

    def __init__(self, locator: EngineLocator, *, on_error: OnError | None = None,
                 clock: Callable[[], float] = time.monotonic, min_window: float = 1.0) -> None:
        super().__init__(on_error)
        self._locator = locator
        self._clock = clock
        self._min_window = min_window
        self._host_util = 0.0
        self._self = psutil.Process()
        self._prev: dict[str, _Prev] = {}
        self._host_prev: tuple[float, float] | None = None

    def _collect(self, out: list[Metric]) -> None:
        fams = {s.name: family(s) for s in PROCESS_SPECS}
        self._one("sidecar", self._self, fams, tree=False)
        self._one("engine", self._locator.process(), fams, tree=True)
        out.extend(fams.values())
        self._host(out)

    def _one(self, label: str, root: psutil.Process | None, f: dict[str, Family], *,
             tree: bool) -> None:
        fig = self._figures(root, tree) if root is not None else None
        f[c.PROCESS_UP.name].add_metric([label], 0 if fig is None else 1)
        if fig is None or root is None:
            self._prev.pop(label, None)
            return
        now = self._clock()
        try:
            key = (root.pid, root.create_time())
        except _ERRORS:
            key = (root.pid, 0.0)
        prev = self._prev.get(label)
        if prev is None or prev.key != key:
            util = fig.cpu / max(time.time() - key[1], 1e-9)
            prev = self._prev[label] = _Prev(key, fig.cpu, now, util, fig.rss, fig.cpu)
        cpu = prev.exported_cpu = max(fig.cpu, prev.exported_cpu)  # monotonic: see above
        prev.peak = peak = max(prev.peak, fig.rss)
        if now - prev.at >= self._min_window:
            prev.util = (cpu - prev.cpu) / (now - prev.at)
            prev.cpu, prev.at = cpu, now
        util = prev.util
        kernel_peak = _self_peak_bytes() if not tree else fig.hwm
        f[c.PROCESS_CPU.name].add_metric([label], cpu)
        f[c.PROCESS_CPU_UTILIZATION.name].add_metric([label], util)
        f[c.PROCESS_RSS.name].add_metric([label], fig.rss)
        f[c.PROCESS_RSS_PEAK.name].add_metric([label], max(peak, kernel_peak or 0.0))
        if fig.fds is not None:
            f[c.PROCESS_FDS.name].add_metric([label], fig.fds)
        f[c.PROCESS_THREADS.name].add_metric([label], fig.threads)

    @staticmethod
    def _figures(root: psutil.Process, tree: bool) -> _Figures | None:
        try:
            procs = [root, *(root.children(recursive=True) if tree else [])]
            t = root.cpu_times()
            fig = _Figures(cpu=t.children_user + t.children_system)
        except _ERRORS:
            return None
        for i, p in enumerate(procs):
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    rss = p.memory_info().rss
                    threads = p.num_threads()
                    try:
                        fds: int | None = p.num_fds()
                    except (psutil.AccessDenied, AttributeError):
                        fds = None
            except _ERRORS:
                if i == 0:
                    return None
                continue  # a child went away mid-scrape
            fig.cpu += t.user + t.system
            fig.rss += rss
            fig.threads += threads
            fig.fds = None if fds is None or fig.fds is None else fig.fds + fds
            hwm = _vm_hwm_bytes(p.pid)
            fig.hwm = None if hwm is None or fig.hwm is None else fig.hwm + hwm
        return fig

    def _host(self, out: list[Metric]) -> None:
        t = psutil.cpu_times()
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        idle = t.idle + getattr(t, "iowait", 0.0)
        prev = self._host_prev
        d_total, d_idle = (total, idle) if prev is None else (total - prev[0], idle - prev[1])
        # The same minimum window as processes (cpu_times are in seconds of all cores).
        if prev is None or d_total >= self._min_window * (psutil.cpu_count() or 1):
            self._host_prev = (total, idle)
            self._host_util = (d_total - d_idle) / d_total if d_total > 0 else 0.0
        util = family(c.HOST_CPU_UTILIZATION)
        util.add_metric([], self._host_util)
        vm = psutil.virtual_memory()
        used = family(c.HOST_MEMORY_USED)
        used.add_metric([], vm.total - vm.available)
        total_mem = family(c.HOST_MEMORY_TOTAL)
        total_mem.add_metric([], vm.total)
        out.extend((util, used, total_mem))
