"""GPU and host: utilisation (GPM SM activity where the GPU has it), memory, power, the engine
and sidecar processes, and what a million tokens cost."""

from __future__ import annotations

from typing import Any

from exporter import catalogue as c
from exporter.dashboards import promql as pq
from exporter.dashboards.panels import Board, Q, stat, timeseries

UID = "llm-exporter-gpu"
GPU_LEGEND = "{{pod}} gpu{{gpu}}"
BY_GPU = ("pod", c.GPU)
PROCESSES = f'{c.PROCESS}=~"engine|sidecar"'


def gpu_utilisation() -> str:
    """GPM SM activity where the GPU reports it (Hopper and later), NVML's coarse
    utilisation elsewhere: ``or`` keeps the left side per GPU."""
    return (f"{pq.gauge(c.GPU_SM_ACTIVE, agg='max', by=BY_GPU)} or "
            f"{pq.gauge(c.GPU_UTILIZATION, agg='max', by=BY_GPU)}")


def cost_per_million_tokens() -> str:
    """Dollars per million output tokens: the replicas' cost rate over their token rate
    (all models: the cost is the replica's, not a model's)."""
    sel = pq.matchers(None)
    return (f"sum(rate({c.COST.exposed}{sel}[{pq.RATE}])) / "
            f"sum(rate({c.OUTPUT_TOKENS.exposed}{sel}[{pq.RATE}])) * 1e6")


def build() -> dict[str, Any]:
    b = Board(UID, "LLM exporter / GPU and host",
              "GPUs (NVML, GPM on Hopper and later), the engine and sidecar processes, and "
              "cost per token.")
    b.row("GPU").add(
        timeseries("GPU utilisation", "SM activity (GPM) where the GPU reports it, else NVML "
                   "utilisation (a kernel ran at all: often pegged, lags saturation).",
                   "percentunit", Q(gpu_utilisation(), GPU_LEGEND), max_val=1),
        timeseries("Tensor cores and DRAM (GPM)", "Tensor pipe activity and DRAM bandwidth "
                   "utilisation; Hopper and later only.", "percentunit",
                   Q(pq.gauge(c.GPU_TENSOR_ACTIVE, agg="max", by=BY_GPU),
                     f"tensor {GPU_LEGEND}"),
                   Q(pq.gauge(c.GPU_DRAM_ACTIVE, agg="max", by=BY_GPU), f"dram {GPU_LEGEND}"),
                   max_val=1),
        timeseries("GPU memory", "Used and installed device memory, and the engine "
                   "process's share.", "bytes",
                   Q(pq.gauge(c.GPU_MEMORY_USED, by=BY_GPU), f"used {GPU_LEGEND}"),
                   Q(pq.gauge(c.GPU_MEMORY_TOTAL, by=BY_GPU), f"total {GPU_LEGEND}"),
                   Q(pq.gauge(c.GPU_PROCESS_MEMORY, by=BY_GPU), f"engine {GPU_LEGEND}")),
        timeseries("GPU power", "Power draw.", "watt",
                   Q(pq.gauge(c.GPU_POWER, by=BY_GPU), GPU_LEGEND)),
        timeseries("GPU temperature", "Die temperature.", "celsius",
                   Q(pq.gauge(c.GPU_TEMPERATURE, agg="max", by=BY_GPU), GPU_LEGEND),
                   min_val=None),
        timeseries("GPU health", "Active throttle reasons, XID and ECC errors per second, "
                   "and whether NVML answered.", "short",
                   Q(pq.gauge(c.GPU_THROTTLE, agg="sum", by=("pod", "reason")),
                     "throttle {{reason}}"),
                   Q(pq.rate(c.GPU_XID_ERRORS, by=BY_GPU), f"xid {GPU_LEGEND}"),
                   Q(pq.rate(c.GPU_ECC_ERRORS, by=BY_GPU), f"ecc {GPU_LEGEND}"),
                   Q(pq.gauge(c.GPU_COLLECTOR_UP, agg="min", by=("pod",)),
                     "collector up {{pod}}")),
    )
    b.row("Processes and host").add(
        timeseries("Process CPU", "CPU time per second (cores) of the engine and the "
                   "sidecar.", "short",
                   Q(pq.rate(c.PROCESS_CPU, PROCESSES, by=("pod", c.PROCESS)),
                     f"{{{{{c.PROCESS}}}}} {{{{pod}}}}")),
        timeseries("Process memory (RSS)", "Resident memory of the engine and the sidecar.",
                   "bytes", Q(pq.gauge(c.PROCESS_RSS, PROCESSES, by=("pod", c.PROCESS)),
                              f"{{{{{c.PROCESS}}}}} {{{{pod}}}}")),
        timeseries("Host", "Host CPU busy fraction and memory in use.", "percentunit",
                   Q(pq.gauge(c.HOST_CPU_UTILIZATION, agg="max", by=("pod",)), "cpu {{pod}}"),
                   Q(f"{pq.gauge(c.HOST_MEMORY_USED, agg='max', by=('pod',))} / "
                     f"{pq.gauge(c.HOST_MEMORY_TOTAL, agg='max', by=('pod',))}",
                     "memory {{pod}}"), max_val=1),
    )
    b.row("Cost").add(
        stat("Cost per million output tokens", "Replica cost (--gpu-hourly-cost x GPUs + "
             "--replica-hourly-cost) over output tokens.", "currencyUSD",
             Q(cost_per_million_tokens(), "$/Mtok"), w=6, h=8, decimals=2),
        stat("Hourly cost", "Configured hourly cost of the selected replicas.", "currencyUSD",
             Q(pq.gauge(c.HOURLY_COST), "$/h"), w=6, h=8, decimals=2),
        timeseries("Cost per million output tokens", "Falls as batching fills the GPUs.",
                   "currencyUSD", Q(cost_per_million_tokens(), "$/Mtok"), w=12),
    )
    return b.to_dict()
