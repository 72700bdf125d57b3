"""A fake :class:`~exporter.collectors.nvml.Nvml` for machines without a GPU (tests, CI, demos):
devices are plain data, a figure set to ``None`` is "not supported", ``broken`` makes every
call fail like a GPU that fell off the bus, and GPM samples are counted so tests can check
that none leak."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from exporter.collectors.nvml import GpuProcess, MigInstance, NvmlError, NvmlUnavailable

# ---------------------------------------------------------------------------------------------

@dataclass
class FakeGpu:
    """One device as plain data. ``None`` for a figure means NVML reports it not supported."""

    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    name: str = "NVIDIA H100 80GB HBM3"
    utilization: tuple[float, float] | None = (50.0, 20.0)
    memory: tuple[int, int] | None = (40 * 2**30, 80 * 2**30)
    power_mw: float | None = 300_000.0
    energy_mj: float | None = 1_000_000.0
    temperature: float | None = 55.0
    clocks: tuple[float, float] | None = (1980.0, 2619.0)
    throttle: int | None = 0
    ecc: tuple[int, int] | None = (0, 0)
    processes: list[GpuProcess] = field(default_factory=list)
    mig: list[FakeGpu] = field(default_factory=list)  # MIG instances (their own figures)
    gpu_instance_id: int = 0
    gpm: dict[int, float] | None = None  # percent per GPM metric id; None: no GPM (pre-Hopper)
    broken: bool = False  # every call raises a real (not not-supported) error


class FakeNvml:
    """:class:`Nvml` from plain data. ``unavailable`` makes ``init`` fail with that reason."""

    def __init__(self, gpus: Sequence[FakeGpu] = (), *, unavailable: str = "") -> None:
        self.gpus = list(gpus)
        self.unavailable = unavailable
        self.xids: list[tuple[str, int]] = []
        self.samples_alive = 0
        self.init_calls = 0
        self._seq = 0

    def init(self) -> None:
        self.init_calls += 1
        if self.unavailable:
            raise NvmlUnavailable(self.unavailable, "fake")
        if not self.gpus:
            raise NvmlUnavailable("no_gpu", "fake has no device")

    def shutdown(self) -> None:
        pass

    def device_count(self) -> int:
        return len(self.gpus)

    def handle(self, index: int) -> Any:
        return self.gpus[index]

    @staticmethod
    def _get(h: FakeGpu, attr: str) -> Any:
        if h.broken:
            raise NvmlError("fake: GPU is lost")
        v = getattr(h, attr)
        if v is None:
            raise NvmlError(f"fake: {attr} not supported", not_supported=True)
        return v

    def uuid(self, h: Any) -> str:
        return str(self._get(h, "uuid"))

    def name(self, h: Any) -> str:
        return str(self._get(h, "name"))

    def utilization(self, h: Any) -> tuple[float, float]:
        return tuple(self._get(h, "utilization"))

    def memory(self, h: Any) -> tuple[int, int]:
        return tuple(self._get(h, "memory"))

    def power_milliwatts(self, h: Any) -> float:
        return float(self._get(h, "power_mw"))

    def energy_millijoules(self, h: Any) -> float:
        return float(self._get(h, "energy_mj"))

    def temperature_celsius(self, h: Any) -> float:
        return float(self._get(h, "temperature"))

    def clocks_mhz(self, h: Any) -> tuple[float, float]:
        return tuple(self._get(h, "clocks"))

    def throttle_reasons(self, h: Any) -> int:
        return int(self._get(h, "throttle"))

    def ecc_errors(self, h: Any) -> tuple[int, int]:
        return tuple(self._get(h, "ecc"))

    def processes(self, h: Any) -> list[GpuProcess]:
        return list(self._get(h, "processes"))

    def mig_instances(self, h: Any) -> list[MigInstance]:
        return [MigInstance(m, i, m.gpu_instance_id, m.uuid, m.name)
                for i, m in enumerate(self._get(h, "mig"))]

    def gpm_supported(self, h: Any) -> bool:
        return h.gpm is not None

    def gpm_sample(self, h: Any, gpu_instance_id: int | None = None) -> Any:
        target = h
        if gpu_instance_id is not None:
            target = next(m for m in h.mig if m.gpu_instance_id == gpu_instance_id)
        if target.gpm is None:
            raise NvmlError("fake: GPM not supported", not_supported=True)
        self._seq += 1
        self.samples_alive += 1
        return (target, self._seq)

    def gpm_metrics(self, before: Any, after: Any,
                    metric_ids: Sequence[int]) -> dict[int, float]:
        assert before[1] < after[1], "GPM needs two samples, the older first"
        gpm = after[0].gpm or {}
        return {m: gpm[m] for m in metric_ids if m in gpm}

    def gpm_free(self, sample: Any) -> None:
        self.samples_alive -= 1

    def xid_events(self) -> list[tuple[str, int]]:
        out, self.xids = self.xids, []
        return out
