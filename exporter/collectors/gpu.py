"""GPU figures from NVML, read at scrape time.

Per device (labels ``gpu`` index, ``uuid``, ``name``): utilisation, memory, power, energy,
temperature, clocks, throttle reasons, volatile ECC and XID error counters, the GPU memory of
the engine's process(es) and, on Hopper and later, GPM figures (SM activity, SM occupancy,
tensor-core activity, DRAM bandwidth). GPM is a rate between two samples: each scrape takes a
new sample and reports the averages since the previous scrape's (the first scrape reports
none), so the figure covers the whole scrape interval instead of one instant.

MIG: a MIG-enabled GPU keeps its device-wide figures (power, energy, temperature, clocks, ECC,
throttle) under its own index; each MIG instance is exported as ``gpu="<index>/gi<GPU
instance id>"`` with its own UUID (``MIG-...``) and name, with the figures NVML gives per
instance: memory, engine process memory and GPM. NVML has no utilisation for MIG.

Engine process memory: processes whose PID is the engine's or one of its descendants; when the
engine's PID is unknown (a pod without a shared PID namespace), every process on the device,
since the device is the engine's.

No NVML (no library, no driver, no device): ``llm_exporter_gpu_collector_up{reason=...} 0``,
logged once, retried every minute; the exporter runs on.

``python -m exporter.collectors.gpu`` prints every figure once (two scrapes a second apart, so
GPM shows); it needs only prometheus-client, psutil and nvidia-ml-py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client.core import Metric

from exporter import catalogue as c
from exporter.collectors.base import FailsafeCollector, Family, OnError, family
from exporter.collectors.nvml import (
    GPM_DRAM_ACTIVE,
    GPM_METRICS,
    GPM_SM_ACTIVE,
    GPM_SM_OCCUPANCY,
    GPM_TENSOR_ACTIVE,
    THROTTLE_REASONS,
    Nvml,
    NvmlError,
    NvmlUnavailable,
    RealNvml,
)

log = logging.getLogger(__name__)

_GPM_SPECS = {GPM_SM_ACTIVE: c.GPU_SM_ACTIVE, GPM_SM_OCCUPANCY: c.GPU_SM_OCCUPANCY,
              GPM_TENSOR_ACTIVE: c.GPU_TENSOR_ACTIVE, GPM_DRAM_ACTIVE: c.GPU_DRAM_ACTIVE}
GPU_SPECS = tuple(s for s in c.ALL if s.group == "gpu")


class GpuCollector(FailsafeCollector):
    NAME = "gpu"
    SPECS = GPU_SPECS

    def __init__(self, nvml: Nvml | None = None, *, enabled: bool = True,
                 engine_pids: Callable[[], set[int] | None] = lambda: None,
                 on_error: OnError | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 retry_seconds: float = 60.0) -> None:
        super().__init__(on_error)
        self._nvml: Nvml = nvml if nvml is not None else RealNvml()
        self._enabled = enabled
        self._engine_pids = engine_pids
        self._clock = clock
        self._retry = retry_seconds
        self._ready = False
        self._down: NvmlUnavailable | None = None
        self._down_at = 0.0
        self._gpm_prev: dict[str, Any] = {}  # uuid -> previous GPM sample
        self._gpm_ok: dict[str, bool] = {}
        self._xid: dict[str, int] = {}
        self._xid_supported = True
        self._count = 0

    def gpu_count(self) -> int:
        """Physical GPUs seen on the last scrape (0 while NVML is down); cost uses it."""
        return self._count

    # -- NVML start-up --------------------------------------------------------------------------
    def _up(self) -> str:
        """'' when NVML answers, else the reason it does not."""
        if not self._enabled:
            return "disabled"
        if self._ready:
            return ""
        if self._down is not None and self._clock() - self._down_at < self._retry:
            return self._down.reason
        try:
            self._nvml.init()
        except NvmlUnavailable as e:
            if self._down is None:
                log.warning("GPU collector down (%s): %s; the exporter runs without GPU figures "
                            "and retries every %.0f s", e.reason, e.detail or e, self._retry)
            self._down, self._down_at = e, self._clock()
            return e.reason
        if self._down is not None:
            log.info("GPU collector up: NVML answers now")
        self._ready, self._down = True, None
        return ""

    # -- one scrape -----------------------------------------------------------------------------
    def _collect(self, out: list[Metric]) -> None:
        up = family(c.GPU_COLLECTOR_UP)
        out.append(up)
        reason = self._up()
        if reason:
            self._count = 0
            up.add_metric([reason], 0)
            return
        up.add_metric(["ok"], 1)
        fams = {s.name: family(s) for s in GPU_SPECS if s is not c.GPU_COLLECTOR_UP}
        errors: list[NvmlError] = []
        self._count = self._nvml.device_count()
        pids = self._engine_pids()
        xids = self._drain_xids(errors)
        for i in range(self._count):
            try:
                h = self._nvml.handle(i)
                labels = [str(i), self._nvml.uuid(h), self._nvml.name(h)]
            except NvmlError as e:
                errors.append(e)
                continue
            migs = self._figure(self._nvml.mig_instances, h, errors=errors) or []
            self._device(h, labels, fams, pids, errors, gpm=not migs)
            if xids is not None:
                self._xid[labels[1]] = self._xid.get(labels[1], 0) + xids.get(labels[1], 0)
                fams[c.GPU_XID_ERRORS.name].add_metric(labels, self._xid[labels[1]])
            for mig in migs:
                mlabels = [f"{i}/gi{mig.gpu_instance_id}", mig.uuid, mig.name]
                self._instance(mig.handle, mlabels, fams, pids, errors)
                self._gpm(h, mig.uuid, mlabels, fams, errors, mig.gpu_instance_id)
        self._hardware_utilization(fams, engine_seen=pids is not None)
        out.extend(f for f in fams.values() if f.samples)
        if errors:
            raise errors[0]  # counted once per scrape; the figures above are still served

    @staticmethod
    def _hardware_utilization(f: dict[str, Family], *, engine_seen: bool) -> None:
        """U = T_compute / T_total from the device, for the engine's GPUs (those holding its
        processes' memory; every GPU when they are not known): the mean GPM SM activity when
        each of them has it, else the mean NVML utilization (a kernel ran at all: an upper
        bound). Whole GPUs only; a MIG-partitioned GPU counts with its NVML figure."""

        def whole(spec: c.MetricSpec) -> dict[str, float]:
            return {smp.labels[c.GPU_UUID]: smp.value for smp in f[spec.name].samples
                    if "/" not in smp.labels[c.GPU]}

        util, sm = whole(c.GPU_UTILIZATION), whole(c.GPU_SM_ACTIVE)
        mine = {u for u, v in whole(c.GPU_PROCESS_MEMORY).items() if v > 0} if engine_seen \
            else set()
        gpus = (mine & util.keys()) or set(util)
        if not gpus:
            return
        source, values = (("sm_active", sm) if gpus <= sm.keys() else ("nvml", util))
        f[c.HARDWARE_UTILIZATION.name].add_metric(
            [source], sum(values[u] for u in gpus) / len(gpus))

    def _figure(self, fn: Callable[..., Any], *args: Any, errors: list[NvmlError]) -> Any:
        """One NVML figure: None when the device lacks it, or on an error (recorded)."""
        try:
            return fn(*args)
        except NvmlError as e:
            if not e.not_supported:
                errors.append(e)
            return None

    def _device(self, h: Any, labels: list[str], f: dict[str, Family], pids: set[int] | None,
                errors: list[NvmlError], *, gpm: bool) -> None:
        n, get = self._nvml, self._figure
        if (u := get(n.utilization, h, errors=errors)) is not None:
            f[c.GPU_UTILIZATION.name].add_metric(labels, u[0] / 100.0)
            f[c.GPU_MEMORY_UTILIZATION.name].add_metric(labels, u[1] / 100.0)
        if (p := get(n.power_milliwatts, h, errors=errors)) is not None:
            f[c.GPU_POWER.name].add_metric(labels, p / 1000.0)
        if (e := get(n.energy_millijoules, h, errors=errors)) is not None:
            f[c.GPU_ENERGY.name].add_metric(labels, e / 1000.0)
        if (t := get(n.temperature_celsius, h, errors=errors)) is not None:
            f[c.GPU_TEMPERATURE.name].add_metric(labels, t)
        if (clk := get(n.clocks_mhz, h, errors=errors)) is not None:
            f[c.GPU_SM_CLOCK.name].add_metric(labels, clk[0] * 1e6)
            f[c.GPU_MEMORY_CLOCK.name].add_metric(labels, clk[1] * 1e6)
        if (mask := get(n.throttle_reasons, h, errors=errors)) is not None:
            for reason, bit in THROTTLE_REASONS:
                f[c.GPU_THROTTLE.name].add_metric([*labels, reason], 1 if mask & bit else 0)
        if (ecc := get(n.ecc_errors, h, errors=errors)) is not None:
            f[c.GPU_ECC_ERRORS.name].add_metric([*labels, "corrected"], ecc[0])
            f[c.GPU_ECC_ERRORS.name].add_metric([*labels, "uncorrected"], ecc[1])
        self._instance(h, labels, f, pids, errors)
        if gpm:  # with MIG on, GPM is read per instance instead
            self._gpm(h, labels[1], labels, f, errors, None)

    def _instance(self, h: Any, labels: list[str], f: dict[str, Family], pids: set[int] | None,
                  errors: list[NvmlError]) -> None:
        """Figures a whole GPU and a MIG instance both have: memory and process memory."""
        n, get = self._nvml, self._figure
        if (m := get(n.memory, h, errors=errors)) is not None:
            f[c.GPU_MEMORY_USED.name].add_metric(labels, m[0])
            f[c.GPU_MEMORY_TOTAL.name].add_metric(labels, m[1])
        if (procs := get(n.processes, h, errors=errors)) is not None:
            mine = [p for p in procs if pids is None or p.pid in pids]
            f[c.GPU_PROCESS_MEMORY.name].add_metric(
                labels, sum(p.used_memory_bytes or 0 for p in mine))

    def _gpm(self, h: Any, key: str, labels: list[str], f: dict[str, Family],
             errors: list[NvmlError], gpu_instance_id: int | None) -> None:
        n = self._nvml
        if key not in self._gpm_ok:
            self._gpm_ok[key] = n.gpm_supported(h)
        if not self._gpm_ok[key]:
            return
        sample = self._figure(n.gpm_sample, h, gpu_instance_id, errors=errors)
        if sample is None:
            return
        prev = self._gpm_prev.pop(key, None)
        self._gpm_prev[key] = sample
        if prev is None:
            return
        try:
            values = self._figure(n.gpm_metrics, prev, sample, GPM_METRICS, errors=errors)
        finally:
            n.gpm_free(prev)
        for mid, value in (values or {}).items():
            f[_GPM_SPECS[mid].name].add_metric(labels, value / 100.0)

    def _drain_xids(self, errors: list[NvmlError]) -> dict[str, int] | None:
        if not self._xid_supported:
            return None
        try:
            events = self._nvml.xid_events()
        except NvmlError as e:
            if e.not_supported:
                self._xid_supported = False
                return None
            errors.append(e)
            return {}
        counts: dict[str, int] = {}
        for uuid, xid in events:
            counts[uuid] = counts.get(uuid, 0) + 1
            log.warning("GPU %s reported XID %d", uuid, xid)
        return counts


def _print(metrics: list[Metric]) -> None:
    for m in metrics:
        for s in m.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in s.labels.items())
            print(f"{s.name}{{{labels}}} {s.value:g}")


def main() -> int:
    """Print every figure NVML gives here: one scrape, a second's pause, a second scrape."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    errors: list[str] = []
    collector = GpuCollector(on_error=errors.append)
    first = list(collector.collect())
    time.sleep(1.0)
    second = list(collector.collect())
    print("# first scrape (no GPM: it needs a previous sample)")
    _print(first)
    print("# second scrape, 1 s later")
    _print(second)
    if errors:
        print(f"# {len(errors)} collection error(s); see the log above")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
