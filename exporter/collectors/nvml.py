"""A narrow interface over NVML, the real one (``pynvml`` from nvidia-ml-py) and a fake.

The GPU collector talks only to :class:`Nvml`. Every figure comes back in NVML's own units
(percent, milliwatts, millijoules, MHz, bytes); the collector converts to base units. A figure
the device does not offer raises :class:`NvmlError` with ``not_supported`` set, which the
collector skips silently; any other :class:`NvmlError` is a real failure.

:class:`~exporter.collectors.nvml_fake.FakeNvml` stands in on machines without a GPU (tests, CI).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# GPM metric ids (nvmlGpmMetricId_t); the collector asks for these four.
GPM_SM_ACTIVE = 2  # NVML_GPM_METRIC_SM_UTIL
GPM_SM_OCCUPANCY = 3  # NVML_GPM_METRIC_SM_OCCUPANCY
GPM_TENSOR_ACTIVE = 5  # NVML_GPM_METRIC_ANY_TENSOR_UTIL
GPM_DRAM_ACTIVE = 10  # NVML_GPM_METRIC_DRAM_BW_UTIL
GPM_METRICS = (GPM_SM_ACTIVE, GPM_SM_OCCUPANCY, GPM_TENSOR_ACTIVE, GPM_DRAM_ACTIVE)

# Clock event ("throttle") reason bits, nvmlClocksEventReason*.
THROTTLE_REASONS: tuple[tuple[str, int], ...] = (
    ("gpu_idle", 0x1),
    ("applications_clocks_setting", 0x2),
    ("sw_power_cap", 0x4),
    ("hw_slowdown", 0x8),
    ("sync_boost", 0x10),
    ("sw_thermal_slowdown", 0x20),
    ("hw_thermal_slowdown", 0x40),
    ("hw_power_brake_slowdown", 0x80),
    ("display_clock_setting", 0x100),
)


class NvmlError(Exception):
    """An NVML call failed. ``not_supported``: the device simply lacks the figure."""

    def __init__(self, message: str, *, not_supported: bool = False) -> None:
        super().__init__(message)
        self.not_supported = not_supported


class NvmlUnavailable(Exception):
    """NVML cannot start. ``reason`` is a short label value: ``library_not_found``,
    ``driver_not_loaded``, ``driver_mismatch``, ``no_permission``, ``no_gpu``, ``init_failed``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_memory_bytes: int | None  # None: NVML could not tell (e.g. Windows WDDM, some MIG)


@dataclass(frozen=True)
class MigInstance:
    handle: Any
    index: int  # position under the parent (0..max MIG devices)
    gpu_instance_id: int
    uuid: str
    name: str


class Nvml(Protocol):
    """What the GPU collector needs from NVML, and nothing more. ``h`` is an opaque handle."""

    def init(self) -> None: ...  # raises NvmlUnavailable
    def shutdown(self) -> None: ...
    def device_count(self) -> int: ...
    def handle(self, index: int) -> Any: ...
    def uuid(self, h: Any) -> str: ...
    def name(self, h: Any) -> str: ...
    def utilization(self, h: Any) -> tuple[float, float]: ...  # (gpu %, memory %)
    def memory(self, h: Any) -> tuple[int, int]: ...  # (used bytes, total bytes)
    def power_milliwatts(self, h: Any) -> float: ...
    def energy_millijoules(self, h: Any) -> float: ...
    def temperature_celsius(self, h: Any) -> float: ...
    def clocks_mhz(self, h: Any) -> tuple[float, float]: ...  # (SM, memory)
    def throttle_reasons(self, h: Any) -> int: ...  # bit mask, THROTTLE_REASONS
    def ecc_errors(self, h: Any) -> tuple[int, int]: ...  # (corrected, uncorrected), volatile
    def processes(self, h: Any) -> list[GpuProcess]: ...  # compute + graphics, deduplicated
    def mig_instances(self, h: Any) -> list[MigInstance]: ...  # [] when MIG is off
    def gpm_supported(self, h: Any) -> bool: ...
    def gpm_sample(self, h: Any, gpu_instance_id: int | None = None) -> Any: ...
    def gpm_metrics(self, before: Any, after: Any,
                    metric_ids: Sequence[int]) -> dict[int, float]: ...  # percent
    def gpm_free(self, sample: Any) -> None: ...
    def xid_events(self) -> list[tuple[str, int]]: ...  # drained (uuid, xid) since last call


class RealNvml:
    """:class:`Nvml` over ``pynvml``. Imports it lazily so the package imports without it."""

    def __init__(self) -> None:
        self._n: Any = None
        self._events: Any = None
        self._events_tried = False
        self._lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------
    def init(self) -> None:
        try:
            import pynvml
        except ImportError as e:
            raise NvmlUnavailable("library_not_found", "nvidia-ml-py is not installed") from e
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            raise NvmlUnavailable(_init_reason(pynvml, e), str(e)) from e
        self._n = pynvml
        if self.device_count() == 0:
            self.shutdown()
            raise NvmlUnavailable("no_gpu", "NVML found no device")

    def shutdown(self) -> None:
        if self._n is not None:
            if self._events is not None:
                self._call(self._n.nvmlEventSetFree, self._events)
                self._events = None
            self._call(self._n.nvmlShutdown)
            self._n = None

    def _call(self, fn: Any, *args: Any) -> Any:
        n = self._n
        try:
            return fn(*args)
        except n.NVMLError as e:
            ns = e.value in (n.NVML_ERROR_NOT_SUPPORTED, n.NVML_ERROR_FUNCTION_NOT_FOUND,
                             getattr(n, "NVML_ERROR_NOT_FOUND", -1))
            raise NvmlError(str(e), not_supported=ns) from e

    # -- figures --------------------------------------------------------------------------------
    def device_count(self) -> int:
        return int(self._call(self._n.nvmlDeviceGetCount))

    def handle(self, index: int) -> Any:
        return self._call(self._n.nvmlDeviceGetHandleByIndex, index)

    def uuid(self, h: Any) -> str:
        return _text(self._call(self._n.nvmlDeviceGetUUID, h))

    def name(self, h: Any) -> str:
        return _text(self._call(self._n.nvmlDeviceGetName, h))

    def utilization(self, h: Any) -> tuple[float, float]:
        u = self._call(self._n.nvmlDeviceGetUtilizationRates, h)
        return float(u.gpu), float(u.memory)

    def memory(self, h: Any) -> tuple[int, int]:
        m = self._call(self._n.nvmlDeviceGetMemoryInfo, h)
        return int(m.used), int(m.total)

    def power_milliwatts(self, h: Any) -> float:
        return float(self._call(self._n.nvmlDeviceGetPowerUsage, h))

    def energy_millijoules(self, h: Any) -> float:
        return float(self._call(self._n.nvmlDeviceGetTotalEnergyConsumption, h))

    def temperature_celsius(self, h: Any) -> float:
        return float(self._call(self._n.nvmlDeviceGetTemperature, h,
                                self._n.NVML_TEMPERATURE_GPU))

    def clocks_mhz(self, h: Any) -> tuple[float, float]:
        n = self._n
        return (float(self._call(n.nvmlDeviceGetClockInfo, h, n.NVML_CLOCK_SM)),
                float(self._call(n.nvmlDeviceGetClockInfo, h, n.NVML_CLOCK_MEM)))

    def throttle_reasons(self, h: Any) -> int:
        fn = getattr(self._n, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            self._n.nvmlDeviceGetCurrentClocksThrottleReasons
        return int(self._call(fn, h))

    def ecc_errors(self, h: Any) -> tuple[int, int]:
        n = self._n
        return (int(self._call(n.nvmlDeviceGetTotalEccErrors, h,
                               n.NVML_MEMORY_ERROR_TYPE_CORRECTED, n.NVML_VOLATILE_ECC)),
                int(self._call(n.nvmlDeviceGetTotalEccErrors, h,
                               n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, n.NVML_VOLATILE_ECC)))

    def processes(self, h: Any) -> list[GpuProcess]:
        n = self._n
        seen: dict[int, GpuProcess] = {}
        answered = 0
        for fn in (n.nvmlDeviceGetComputeRunningProcesses,
                   n.nvmlDeviceGetGraphicsRunningProcesses):
            try:
                procs = self._call(fn, h)
            except NvmlError as e:
                if e.not_supported:
                    continue
                raise
            answered += 1
            for p in procs:
                used = p.usedGpuMemory  # pynvml maps NVML's "not available" to None
                mem = None if used is None else int(used)
                if p.pid not in seen or seen[p.pid].used_memory_bytes is None:
                    seen[p.pid] = GpuProcess(int(p.pid), mem)
        if not answered:  # an old driver without these calls: unknown, not "no processes"
            raise NvmlError("process lists not supported", not_supported=True)
        return list(seen.values())

    def mig_instances(self, h: Any) -> list[MigInstance]:
        n = self._n
        try:
            current, _pending = self._call(n.nvmlDeviceGetMigMode, h)
        except NvmlError as e:
            if e.not_supported:
                return []
            raise
        if current != n.NVML_DEVICE_MIG_ENABLE:
            return []
        out: list[MigInstance] = []
        for i in range(int(self._call(n.nvmlDeviceGetMaxMigDeviceCount, h))):
            try:
                mh = self._call(n.nvmlDeviceGetMigDeviceHandleByIndex, h, i)
            except NvmlError:
                continue  # slot not populated
            out.append(MigInstance(mh, i, int(self._call(n.nvmlDeviceGetGpuInstanceId, mh)),
                                   self.uuid(mh), self.name(mh)))
        return out

    def gpm_supported(self, h: Any) -> bool:
        if not hasattr(self._n, "nvmlGpmQueryDeviceSupport"):
            return False
        try:
            return bool(self._call(self._n.nvmlGpmQueryDeviceSupport, h).isSupportedDevice)
        except NvmlError:
            return False

    def gpm_sample(self, h: Any, gpu_instance_id: int | None = None) -> Any:
        n = self._n
        sample = self._call(n.nvmlGpmSampleAlloc)
        try:
            if gpu_instance_id is None:
                self._call(n.nvmlGpmSampleGet, h, sample)
            else:
                self._call(n.nvmlGpmMigSampleGet, h, gpu_instance_id, sample)
        except NvmlError:
            self.gpm_free(sample)
            raise
        return sample

    def gpm_metrics(self, before: Any, after: Any,
                    metric_ids: Sequence[int]) -> dict[int, float]:
        n = self._n
        req = n.c_nvmlGpmMetricsGet_t()
        req.version = n.NVML_GPM_METRICS_GET_VERSION
        req.numMetrics = len(metric_ids)
        req.sample1 = before
        req.sample2 = after
        for i, mid in enumerate(metric_ids):
            req.metrics[i].metricId = mid
        self._call(n.nvmlGpmMetricsGet, req)
        return {int(req.metrics[i].metricId): float(req.metrics[i].value)
                for i in range(len(metric_ids)) if req.metrics[i].nvmlReturn == n.NVML_SUCCESS}

    def gpm_free(self, sample: Any) -> None:
        with contextlib.suppress(NvmlError):
            self._call(self._n.nvmlGpmSampleFree, sample)

    def xid_events(self) -> list[tuple[str, int]]:
        """Drain XID critical-error events without blocking (timeout 0 at scrape time)."""
        n = self._n
        with self._lock:
            if not self._events_tried:
                self._events_tried = True
                self._events = self._register_xid(n)
            if self._events is None:
                raise NvmlError("XID events not available", not_supported=True)
            out: list[tuple[str, int]] = []
            for _ in range(1000):
                try:
                    ev = n.nvmlEventSetWait_v2(self._events, 0)
                except n.NVMLError:
                    break  # NVML_ERROR_TIMEOUT: nothing pending
                if ev.eventType & n.nvmlEventTypeXidCriticalError:
                    out.append((self.uuid(ev.device), int(ev.eventData)))
            return out

    def _register_xid(self, n: Any) -> Any:
        try:
            es = n.nvmlEventSetCreate()
        except n.NVMLError:
            return None
        registered = 0
        for i in range(self.device_count()):
            try:
                n.nvmlDeviceRegisterEvents(self.handle(i), n.nvmlEventTypeXidCriticalError, es)
                registered += 1
            except (n.NVMLError, NvmlError):
                continue
        if not registered:
            n.nvmlEventSetFree(es)
            return None
        return es


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _init_reason(n: Any, e: Any) -> str:
    code = getattr(e, "value", None)
    if code == n.NVML_ERROR_LIBRARY_NOT_FOUND:
        return "library_not_found"
    if code == n.NVML_ERROR_DRIVER_NOT_LOADED:
        return "driver_not_loaded"
    if code == n.NVML_ERROR_NO_PERMISSION:
        return "no_permission"
    if code == n.NVML_ERROR_LIB_RM_VERSION_MISMATCH:
        return "driver_mismatch"
    return "init_failed"
