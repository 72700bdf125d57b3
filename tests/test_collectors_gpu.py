"""The GPU collector against FakeNvml: units, labels, GPM deltas, MIG, no-GPU, failures."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from exporter import catalogue as c
from exporter.collectors.gpu import GpuCollector
from exporter.collectors.nvml import (
    GPM_DRAM_ACTIVE,
    GPM_SM_ACTIVE,
    GPM_SM_OCCUPANCY,
    GPM_TENSOR_ACTIVE,
    GpuProcess,
)
from exporter.collectors.nvml_fake import FakeGpu, FakeNvml

H100 = dict(uuid="GPU-aaaa", name="NVIDIA H100 80GB HBM3")
L = {"gpu": "0", "uuid": "GPU-aaaa", "name": "NVIDIA H100 80GB HBM3"}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(nvml: FakeNvml, **kw: object) -> tuple[CollectorRegistry, GpuCollector, list[str]]:
    errors: list[str] = []
    reg = CollectorRegistry()
    col = GpuCollector(nvml, on_error=errors.append, **kw)  # type: ignore[arg-type]
    reg.register(col)
    return reg, col, errors


def test_device_figures_in_base_units() -> None:
    gpu = FakeGpu(**H100, utilization=(87.0, 41.0), memory=(30 * 2**30, 80 * 2**30),
                  power_mw=412_345.0, energy_mj=9_876_543.0, temperature=67.0,
                  clocks=(1755.0, 2619.0), throttle=0x4 | 0x40, ecc=(3, 1))
    reg, _, errors = make(FakeNvml([gpu]))
    v = reg.get_sample_value
    assert v(c.GPU_COLLECTOR_UP.name, {"reason": "ok"}) == 1
    assert v(c.GPU_UTILIZATION.name, L) == pytest.approx(0.87)
    assert v(c.GPU_MEMORY_UTILIZATION.name, L) == pytest.approx(0.41)
    assert v(c.GPU_MEMORY_USED.name, L) == 30 * 2**30
    assert v(c.GPU_MEMORY_TOTAL.name, L) == 80 * 2**30
    assert v(c.GPU_POWER.name, L) == pytest.approx(412.345)
    assert v(c.GPU_ENERGY.exposed, L) == pytest.approx(9876.543)
    assert v(c.GPU_TEMPERATURE.name, L) == 67
    assert v(c.GPU_SM_CLOCK.name, L) == 1755e6
    assert v(c.GPU_MEMORY_CLOCK.name, L) == 2619e6
    assert v(c.GPU_THROTTLE.name, {**L, "reason": "sw_power_cap"}) == 1
    assert v(c.GPU_THROTTLE.name, {**L, "reason": "hw_thermal_slowdown"}) == 1
    assert v(c.GPU_THROTTLE.name, {**L, "reason": "gpu_idle"}) == 0
    assert v(c.GPU_ECC_ERRORS.exposed, {**L, "error_type": "corrected"}) == 3
    assert v(c.GPU_ECC_ERRORS.exposed, {**L, "error_type": "uncorrected"}) == 1
    assert errors == []


def test_unsupported_figures_are_left_out_silently() -> None:
    gpu = FakeGpu(**H100, power_mw=None, energy_mj=None, ecc=None, throttle=None)
    reg, _, errors = make(FakeNvml([gpu]))
    assert reg.get_sample_value(c.GPU_POWER.name, L) is None
    assert reg.get_sample_value(c.GPU_ECC_ERRORS.exposed, {**L, "error_type": "corrected"}) \
        is None
    assert reg.get_sample_value(c.GPU_TEMPERATURE.name, L) == 55
    assert errors == []


def test_engine_process_memory_only_counts_the_engine() -> None:
    gpu = FakeGpu(**H100, processes=[GpuProcess(100, 5 * 2**30), GpuProcess(101, 2**30),
                                     GpuProcess(999, 7 * 2**30), GpuProcess(102, None)])
    reg, _, _ = make(FakeNvml([gpu]), engine_pids=lambda: {100, 101, 102})
    assert reg.get_sample_value(c.GPU_PROCESS_MEMORY.name, L) == 6 * 2**30
    # Engine PID unknown (pod without a shared PID namespace): the whole device is the engine's.
    reg, _, _ = make(FakeNvml([gpu]), engine_pids=lambda: None)
    assert reg.get_sample_value(c.GPU_PROCESS_MEMORY.name, L) == 13 * 2**30


def test_gpm_needs_a_previous_sample_and_frees_old_ones() -> None:
    gpu = FakeGpu(**H100, gpm={GPM_SM_ACTIVE: 62.5, GPM_SM_OCCUPANCY: 31.0,
                               GPM_TENSOR_ACTIVE: 44.0, GPM_DRAM_ACTIVE: 71.0})
    nvml = FakeNvml([gpu])
    reg, _, errors = make(nvml)
    # First scrape (made by the first get_sample_value): one sample, nothing to report yet.
    assert reg.get_sample_value(c.GPU_SM_ACTIVE.name, L) is None
    assert reg.get_sample_value(c.GPU_SM_ACTIVE.name, L) == pytest.approx(0.625)
    assert reg.get_sample_value(c.GPU_SM_OCCUPANCY.name, L) == pytest.approx(0.31)
    assert reg.get_sample_value(c.GPU_TENSOR_ACTIVE.name, L) == pytest.approx(0.44)
    assert reg.get_sample_value(c.GPU_DRAM_ACTIVE.name, L) == pytest.approx(0.71)
    assert nvml.samples_alive == 1  # only the latest sample is kept between scrapes
    assert errors == []


def test_no_gpm_before_hopper() -> None:
    reg, _, _ = make(FakeNvml([FakeGpu(**H100, gpm=None)]))
    list(reg.collect())
    assert reg.get_sample_value(c.GPU_SM_ACTIVE.name, L) is None


def test_mig_instances_are_exported_per_instance() -> None:
    mig = [FakeGpu(uuid=f"MIG-{i}", name="NVIDIA H100 80GB HBM3 MIG 3g.40gb",
                   memory=((i + 1) * 2**30, 40 * 2**30), gpu_instance_id=gi,
                   processes=[GpuProcess(100 + i, 2**30)], gpm={GPM_SM_ACTIVE: 10.0 * (i + 1)})
           for i, gi in enumerate((1, 2))]
    parent = FakeGpu(**H100, utilization=None, mig=mig, gpm={GPM_SM_ACTIVE: 99.0})
    nvml = FakeNvml([parent])
    reg, _, errors = make(nvml)
    list(reg.collect())
    m1 = {"gpu": "0/gi1", "uuid": "MIG-0", "name": "NVIDIA H100 80GB HBM3 MIG 3g.40gb"}
    m2 = {**m1, "gpu": "0/gi2", "uuid": "MIG-1"}
    assert reg.get_sample_value(c.GPU_MEMORY_USED.name, m1) == 2**30
    assert reg.get_sample_value(c.GPU_MEMORY_USED.name, m2) == 2 * 2**30
    assert reg.get_sample_value(c.GPU_PROCESS_MEMORY.name, m2) == 2**30
    assert reg.get_sample_value(c.GPU_SM_ACTIVE.name, m1) == pytest.approx(0.10)
    assert reg.get_sample_value(c.GPU_SM_ACTIVE.name, m2) == pytest.approx(0.20)
    # The parent keeps its device-wide figures; GPM moves to the instances.
    assert reg.get_sample_value(c.GPU_POWER.name, L) == 300
    assert reg.get_sample_value(c.GPU_SM_ACTIVE.name, L) is None
    assert reg.get_sample_value(c.GPU_UTILIZATION.name, L) is None
    assert errors == []


def test_xid_events_are_counted_per_device() -> None:
    nvml = FakeNvml([FakeGpu(**H100), FakeGpu(uuid="GPU-bbbb", name="NVIDIA H100 80GB HBM3")])
    reg, _, _ = make(nvml)
    assert reg.get_sample_value(c.GPU_XID_ERRORS.exposed, L) == 0
    nvml.xids = [("GPU-aaaa", 79), ("GPU-aaaa", 48), ("GPU-bbbb", 13)]
    assert reg.get_sample_value(c.GPU_XID_ERRORS.exposed, L) == 2
    b = {"gpu": "1", "uuid": "GPU-bbbb", "name": "NVIDIA H100 80GB HBM3"}
    assert reg.get_sample_value(c.GPU_XID_ERRORS.exposed, b) == 1


def test_no_gpu_is_reported_logged_once_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    nvml = FakeNvml(unavailable="driver_not_loaded")
    with caplog.at_level(logging.WARNING):
        reg, col, errors = make(nvml, clock=clock, retry_seconds=60)
        for _ in range(3):
            assert reg.get_sample_value(c.GPU_COLLECTOR_UP.name,
                                        {"reason": "driver_not_loaded"}) == 0
    assert nvml.init_calls == 1  # not retried within a minute
    assert len([r for r in caplog.records if "GPU collector down" in r.message]) == 1
    assert errors == []  # no GPU is a state, not an instrumentation error
    assert col.gpu_count() == 0
    # The driver comes back: the next retry finds it.
    nvml.unavailable, nvml.gpus = "", [FakeGpu(**H100)]
    clock.t += 61
    assert reg.get_sample_value(c.GPU_COLLECTOR_UP.name, {"reason": "ok"}) == 1
    assert col.gpu_count() == 1


def test_disabled() -> None:
    reg, _, _ = make(FakeNvml([FakeGpu(**H100)]), enabled=False)
    assert reg.get_sample_value(c.GPU_COLLECTOR_UP.name, {"reason": "disabled"}) == 0


def test_a_lost_gpu_is_counted_and_the_others_still_served() -> None:
    nvml = FakeNvml([FakeGpu(uuid="GPU-lost", broken=True), FakeGpu(**H100)])
    reg, _, errors = make(nvml)
    one = {**L, "gpu": "1"}
    assert reg.get_sample_value(c.GPU_TEMPERATURE.name, one) == 55
    assert errors == ["collector:gpu"]


def test_real_nvml_reports_why_it_is_down_or_real_figures() -> None:
    """Against the real NVML: on a machine without a GPU the collector says why; on a GPU
    machine (the lent H100/H200) every device reports memory, temperature and its UUID."""
    from exporter.collectors.nvml import RealNvml

    reg = CollectorRegistry()
    errors: list[str] = []
    reg.register(GpuCollector(RealNvml(), on_error=errors.append))
    fams = {f.name: f for f in reg.collect()}
    up = fams[c.GPU_COLLECTOR_UP.name].samples[0]
    if up.value == 0:
        assert up.labels["reason"] in ("library_not_found", "driver_not_loaded",
                                       "driver_mismatch", "no_permission", "no_gpu",
                                       "init_failed")
        assert set(fams) == {c.GPU_COLLECTOR_UP.name}
        return
    totals = fams[c.GPU_MEMORY_TOTAL.name].samples
    assert totals and all(s.value > 0 for s in totals)
    assert all(s.labels["uuid"].startswith(("GPU-", "MIG-")) for s in totals)
    assert fams[c.GPU_TEMPERATURE.name].samples
    assert errors == []
