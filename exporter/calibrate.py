"""``llm-exporter calibrate``: what one replica can carry, measured the way the method this
project grew from measures it, and turned into the chart's thresholds and autoscaler target.

The server is fronted by the real sidecar (``llm-exporter serve`` as a child process, the way a
user runs it): ``--upstream URL``, or the embedded engine with ``--model PATH`` when no
upstream is given. Then:

1. warm-up: ``--warmup`` seconds at the first load, not measured;
2. a sweep of load steps, each held for ``--window`` seconds: ``--concurrency 1,2,4,8``
   (closed loop: that many clients, each sending its next request when the last one ended) or
   ``--rate 0.5,1,2`` (open loop: Poisson arrivals at that many requests/s, as in MLPerf's
   server scenario, the same draws at every step: :func:`arrivals`); requests from a
   synthetic length mix (``--input-words``, ``--output-tokens``, ``--jitter``) or a JSONL
   file of the user's own (``--prompts``);
3. per step, from the client: TTFT, TPOT, ITL and e2e percentiles, requests/s and output
   tokens/s of the requests that started in the window; from the sidecar's /metrics, sampled
   every second: goodput and attainment (its own good/bad verdicts against the SLO file), the
   engine's queue and KV usage, the engine process's memory (RSS; GPU memory when NVML sees a
   GPU), GPU utilisation and SM activity, energy per output token, cost per million output
   tokens at ``--gpu-hourly-cost`` / ``--replica-hourly-cost``;
4. the **capacity**: the highest load whose attainment (requests the sidecar judged good on
   every objective, over the requests sent) is at or above the target (the SLO file's goodput
   objective, else ``--attainment-target``); ``--refine`` further steps bisect the gap
   between it and the first load above it that missed, so the capacity lands near the knee
   rather than on the sweep's grid; from it ``DIR/values.yaml`` for the Helm chart (formulas
   in :func:`chart_values`) and ``DIR/report.md`` with its plots.

A progress bar runs on stderr; Ctrl-C stops the sweep and keeps the steps that finished.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter import catalogue as c

DEFAULT_TARGET = 0.95
# Requests still running when a step's window closes get this long to finish (they count for
# the step they started in); beyond it they are cut off and counted as failed.
DRAIN_SECONDS = 60.0
LATE = 0.05  # seconds behind its schedule an open-loop arrival may be sent
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven",
         "tall", "ships", "sail", "past", "old", "harbour", "lights", "toward", "distant",
         "islands", "under", "pale", "morning", "sky")


# --- workload -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prompt:
    messages: list[dict[str, str]]
    max_tokens: int


def synthetic(n: int, input_words: int, output_tokens: int, jitter: float,
              seed: int) -> list[Prompt]:
    """``n`` chat prompts of about ``input_words`` words and ``output_tokens`` tokens each,
    both varied uniformly by ±``jitter`` (a fraction)."""
    rng = random.Random(seed)

    def vary(x: int) -> int:
        return max(1, round(x * rng.uniform(1 - jitter, 1 + jitter)))

    out = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(vary(input_words)))
        out.append(Prompt([{"role": "user", "content": words}], vary(output_tokens)))
    return out


def from_jsonl(path: Path, default_max_tokens: int) -> list[Prompt]:
    """One request per line: ``{"prompt": "..."}`` or ``{"messages": [...]}``, optionally
    ``"max_tokens"``. Errors name the line."""
    prompts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{i}: not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{i}: expected an object")
        if isinstance(obj.get("messages"), list):
            messages = obj["messages"]
        elif isinstance(obj.get("prompt"), str):
            messages = [{"role": "user", "content": obj["prompt"]}]
        else:
            raise ValueError(f"{path}:{i}: needs \"prompt\" (a string) or \"messages\" (a list)")
        limit = obj.get("max_tokens", default_max_tokens)
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"{path}:{i}: max_tokens must be a positive integer")
        prompts.append(Prompt(messages, limit))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


# --- one request, one step ----------------------------------------------------------------------

@dataclass
class Result:
    ok: bool
    ttft: float | None = None
    e2e: float | None = None
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


async def request(session: Any, url: str, model: str, prompt: Prompt,
                  temperature: float = 0.7, ignore_eos: bool = False) -> Result:
    """One streaming chat request; times as the client sees them (``perf_counter``). A 200
    stream that ends is a success, even with no token (a model may stop at once)."""
    import aiohttp

    body: dict[str, Any] = {"model": model, "messages": prompt.messages,
                            "max_tokens": prompt.max_tokens, "stream": True,
                            "stream_options": {"include_usage": True},
                            "temperature": temperature}
    if ignore_eos:
        body["ignore_eos"] = True
    t0 = time.perf_counter()
    stamps: list[float] = []
    tokens = None
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as r:
            if r.status != 200:
                await r.read()
                return Result(False)
            async for raw in r.content:
                if not raw.startswith(b"data: {"):
                    continue
                chunk = json.loads(raw[6:])
                if isinstance(chunk.get("usage"), dict):
                    tokens = chunk["usage"].get("completion_tokens")
                for ch in chunk.get("choices") or ():
                    delta = ch.get("delta") or {}
                    if delta.get("content") or delta.get("reasoning_content"):
                        stamps.append(time.perf_counter())
    except (OSError, ValueError, TimeoutError, aiohttp.ClientError):
        return Result(False)
    n = tokens if isinstance(tokens, int) and tokens >= 0 else len(stamps)
    return Result(True, stamps[0] - t0 if stamps else None, time.perf_counter() - t0,
                  [b - a for a, b in itertools.pairwise(stamps)], n)


@dataclass
class Step:
    mode: str  # concurrency | rate
    load: float
    window: float
    results: list[Result] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=dict)  # sidecar /metrics, per s
    counters: dict[str, float] = field(default_factory=dict)  # deltas over the step
    lags: list[float] = field(default_factory=list)  # open loop: sent minus scheduled, s
    wall: float = 0.0

    # client-side figures
    def ok(self) -> list[Result]:
        return [r for r in self.results if r.ok]

    def pct(self, what: str, q: float) -> float:
        vals: list[float] = []
        for r in self.ok():
            if what == "itl":
                vals.extend(r.itls)
            else:
                v = getattr(r, what)
                if v is not None:
                    vals.append(v)
        return percentile(vals, q)

    @property
    def sent_rps(self) -> float:
        """Requests started per second of the window (open loop: the rate actually sent)."""
        return len(self.results) / self.window

    @property
    def behind(self) -> bool:
        """Open loop: the load generator kept one arrival in ten more than ``LATE`` seconds
        behind its schedule, so the step offered burstier, later load than its label."""
        return percentile(self.lags, 0.9) > LATE

    @property
    def rps(self) -> float:
        return len(self.ok()) / self.window

    @property
    def tps(self) -> float:
        return sum(r.output_tokens for r in self.ok()) / self.window

    @property
    def failed(self) -> int:
        return len(self.results) - len(self.ok())

    # sidecar-side figures
    @property
    def attainment(self) -> float:
        """Requests the sidecar judged good (succeeded, met every objective) over the requests
        sent in the step. A request the sidecar did not judge good, for whatever reason (bad,
        cut off at the drain, refused with a 4xx such as 429), counts against the step: the
        live series leave client errors and cancellations out, a capacity cannot."""
        good, bad = self.counters.get("good", 0.0), self.counters.get("bad", 0.0)
        if not self.results or good + bad == 0:
            return math.nan
        return min(1.0, good / len(self.results))

    # Over the window, as the client's rates: the step's requests are those that started in
    # it, and the sidecar judged each of them by the time the step's drain ended.
    @property
    def goodput_rps(self) -> float:
        return self.counters.get("good", 0.0) / self.window

    @property
    def goodput_tps(self) -> float:
        return self.counters.get("good_tokens", 0.0) / self.window

    def mean(self, key: str) -> float:
        v = self.samples.get(key) or []
        return statistics.fmean(v) if v else math.nan

    def peak(self, key: str) -> float:
        v = self.samples.get(key) or []
        return max(v) if v else math.nan

    @property
    def joules_per_token(self) -> float:
        tokens = self.counters.get("output_tokens", 0.0)
        joules = self.counters.get("energy", math.nan)
        return joules / tokens if tokens else math.nan

    def cost_per_million(self, hourly: float) -> float:
        return hourly / 3600 / self.tps * 1e6 if hourly and self.tps else math.nan


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN when empty."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q * len(s)) - 1))]


# --- the sidecar's /metrics, sampled ----------------------------------------------------------

def _whole_gpu(lab: dict[str, str]) -> bool:
    """A whole device, not one of its MIG instances (``gpu="0/1"``), which it already holds."""
    return "/" not in lab.get(c.GPU, "")


# family (as exposed) -> (key, sample filter, how samples combine). Gauges are sampled every
# second, counters diffed over the step. Memory and energy add up over GPUs; utilisation is
# the mean over them (two GPUs at 75% are 75% busy, not 150%).
GAUGES: dict[str, tuple[str, Callable[[dict[str, str]], bool], str]] = {
    c.ENGINE_WAITING.exposed: ("engine_waiting", lambda lab: True, "sum"),
    c.QUEUED.exposed: ("sidecar_queued", lambda lab: True, "sum"),
    c.ENGINE_KV_USAGE.exposed: ("kv_usage", lambda lab: True, "sum"),
    c.PROCESS_RSS.exposed: ("engine_rss", lambda lab: lab.get("process") == "engine", "sum"),
    c.GPU_PROCESS_MEMORY.exposed: ("gpu_memory", _whole_gpu, "sum"),
    c.GPU_UTILIZATION.exposed: ("gpu_util", _whole_gpu, "mean"),
    c.GPU_SM_ACTIVE.exposed: ("sm_active", _whole_gpu, "mean"),
}
COUNTERS: dict[str, tuple[str, Callable[[dict[str, str]], bool], str]] = {
    c.GOODPUT_REQUESTS.exposed + "/good": ("good", lambda lab: lab.get(c.RESULT) == "good",
                                            "sum"),
    c.GOODPUT_REQUESTS.exposed + "/bad": ("bad", lambda lab: lab.get(c.RESULT) == "bad", "sum"),
    c.GOODPUT_OUTPUT_TOKENS.exposed: ("good_tokens", lambda lab: True, "sum"),
    c.OUTPUT_TOKENS.exposed: ("output_tokens", lambda lab: True, "sum"),
    c.GPU_ENERGY.exposed: ("energy", _whole_gpu, "sum"),
}


def scrape(url: str) -> dict[str, float]:
    """The watched families, each combined over its samples as :data:`GAUGES` and
    :data:`COUNTERS` say (the engine's RSS alone; whole GPUs, not their MIG instances)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    seen: dict[str, tuple[str, list[float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            for table in (GAUGES, COUNTERS):
                for name, (key, keep, how) in table.items():
                    if name.split("/")[0] == s.name and keep(s.labels):
                        seen.setdefault(key, (how, []))[1].append(s.value)
    return {key: statistics.fmean(v) if how == "mean" else math.fsum(v)
            for key, (how, v) in seen.items()}


# --- the sweep ----------------------------------------------------------------------------------

class Progress:
    """One line on stderr, redrawn in place when it is a terminal (else a line per step)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.tty = sys.stderr.isatty()

    def show(self, i: int, label: str, done: float, total: float, requests: int) -> None:
        frac = min(1.0, done / total) if total else 1.0
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        line = (f"step {i}/{self.steps} {label:<18} [{bar}] {done:4.0f}/{total:.0f} s  "
                f"{requests} requests")
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)

    def end(self, text: str) -> None:
        print(("\r" if self.tty else "") + text + " " * 20, file=sys.stderr, flush=True)


def arrivals(load: float, window: float, prompts: list[Prompt], seed: int
             ) -> list[tuple[float, Prompt]]:
    """An open-loop step's requests: ``round(load x window)`` arrivals at uniform random
    offsets in the window, each with its prompt, in time order. That is a Poisson process
    conditioned on its count (MLPerf's server scenario, sending exactly the rate offered).

    Common random numbers: the same seed gives the same draws in the same order, so a step at
    a higher load holds every arrival of a step at a lower one (same offset, same prompt) plus
    its own. Two steps differ by their load, not by their luck: a burst that sinks one step
    is in the next one too, and attainment falls with load instead of jumping between
    windows."""
    rng = random.Random(seed)
    draws = [(rng.uniform(0.0, window), rng.choice(prompts))
             for _ in range(round(load * window))]
    return sorted(draws, key=lambda d: d[0])


async def run_step(session: Any, proxy: str, metrics: str, model: str, mode: str, load: float,
                   window: float, prompts: list[Prompt], seed: int,
                   tick: Callable[[float, int], None] | None = None,
                   temperature: float = 0.7, ignore_eos: bool = False) -> Step:
    pick = random.Random(seed)  # closed loop: the same prompt order at every step
    step = Step(mode, load, window)
    loop = asyncio.get_running_loop()
    before = await loop.run_in_executor(None, scrape, metrics)
    t0 = time.perf_counter()
    end = t0 + window
    tasks: set[asyncio.Task[None]] = set()

    async def one(prompt: Prompt) -> None:
        step.results.append(await request(session, proxy, model, prompt, temperature,
                                          ignore_eos))

    async def closed_client() -> None:
        while time.perf_counter() < end:
            await one(pick.choice(prompts))

    async def sample() -> None:
        while time.perf_counter() < end:
            await asyncio.sleep(1.0)
            with contextlib.suppress(OSError, ValueError):
                now = await loop.run_in_executor(None, scrape, metrics)
                for key, *_ in GAUGES.values():
                    if key in now:
                        step.samples.setdefault(key, []).append(now[key])
            if tick is not None:
                tick(time.perf_counter() - t0, len(step.results))

    sampler = asyncio.create_task(sample())
    if mode == "concurrency":
        for _ in range(int(load)):
            tasks.add(asyncio.create_task(closed_client()))
    else:
        # Kept to absolute times: a client that falls behind sends the late ones at once
        # instead of slipping the whole schedule (the report shows what was sent).
        for offset, prompt in arrivals(load, window, prompts, seed):
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.add(asyncio.create_task(one(prompt)))
            step.lags.append(max(0.0, time.perf_counter() - t0 - offset))
    drain = max(0.0, end + DRAIN_SECONDS - time.perf_counter())  # from the window's end
    _, pending = await asyncio.wait(tasks, timeout=drain) if tasks else (set(), set())
    for t in pending:
        t.cancel()
        step.results.append(Result(False))
    await asyncio.gather(*pending, return_exceptions=True)
    sampler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampler
    step.wall = time.perf_counter() - t0
    await asyncio.sleep(0.1)  # the sidecar records what ended a few ms after it ends
    after = await loop.run_in_executor(None, scrape, metrics)
    for key, *_ in COUNTERS.values():
        if key in after:
            step.counters[key] = after[key] - before.get(key, 0.0)
    return step


def capacity(steps: Sequence[Step], target: float) -> Step | None:
    """The highest load whose attainment is at or above ``target``, in load order: the last
    step before attainment first falls below it (a later recovery is noise, not capacity)."""
    best = None
    for s in sorted(steps, key=lambda s: s.load):
        if math.isnan(s.attainment) or s.attainment < target or not s.ok():
            break
        best = s
    return best


def knee_found(steps: Sequence[Step], cap: Step) -> bool:
    """Whether a load above the capacity missed the target (else the capacity is only a lower
    bound: the sweep stopped short of the knee)."""
    return any(s.load > cap.load for s in steps)


def next_load(steps: Sequence[Step], target: float, mode: str) -> float | None:
    """The load that halves the gap between the capacity and the first load above it that
    missed the target (bisection), or None when there is nothing left to narrow: no capacity,
    no failing load above it, adjacent client counts, or rates within 5% of each other."""
    cap = capacity(steps, target)
    if cap is None:
        return None
    above = [s.load for s in steps if s.load > cap.load]
    if not above:
        return None
    hi = min(above)
    if mode == "concurrency":
        mid = float((int(cap.load) + int(hi)) // 2)
        return mid if mid > cap.load else None
    if hi - cap.load <= 0.05 * hi:
        return None
    return round((cap.load + hi) / 2, 4)


def chart_values(cap: Step | None, target: float, headroom: float) -> dict[str, Any]:
    """Helm values from the capacity step. ``capacity.requestsPerSecond`` = requests/s the
    replica completed at that step (the sidecar exports it and
    ``llm_exporter_capacity_load_ratio`` = arrivals/s over it); the autoscaler targets
    ``headroom`` of it. ``queueThreshold`` = requests waiting (engine + sidecar) at capacity,
    at least 1, so the saturation ratio reads 1 where attainment would start to fall;
    ``kvThreshold`` = the KV usage seen at capacity, within [0.5, 0.95] (0.8 when unknown)."""
    if cap is None:
        return {}
    waiting = cap.mean("engine_waiting")
    queued = cap.mean("sidecar_queued")
    q = (0.0 if math.isnan(waiting) else waiting) + (0.0 if math.isnan(queued) else queued)
    kv = cap.peak("kv_usage")
    return {
        "sidecar": {
            "capacity": {"requestsPerSecond": round(cap.rps, 4)},
            "saturation": {"queueThreshold": round(max(1.0, q), 2),
                           "kvThreshold": 0.8 if math.isnan(kv) else round(
                               min(0.95, max(0.5, kv)), 2)},
        },
        "autoscaling": {"metric": "capacity", "target": headroom},
    }


# --- the report -------------------------------------------------------------------------------

CLOSED_LOOP_SHORT = ("closed loop: the same rate arriving in Poisson bursts queues more; "
                     "calibrate with --rate for the autoscaler's figure")
CLOSED_LOOP = ("A closed loop: each client sent its next request when its last one ended, so "
               "the requests/s above arrived evenly paced by the server itself. Users arrive at "
               "random (Poisson bursts), and the same rate arriving that way queues more: the "
               "requests/s a replica carries within the objectives is lower. For the "
               "autoscaler's figure, calibrate with `--rate`.")


def _f(x: float, fmt: str = ".0f", scale: float = 1.0) -> str:
    return "—" if x is None or math.isnan(x) else format(x * scale, fmt)


def report(steps: Sequence[Step], cap: Step | None, target: float, out: Path,
           about: dict[str, str], hourly: float, plots: bool = True) -> str:
    label = "clients" if steps and steps[0].mode == "concurrency" else "requests/s offered"
    lines = ["# Calibration report", ""]
    lines += [f"- {k}: {v}" for k, v in about.items()]
    lines += [f"- attainment target: {target:.2%} of requests good on every objective", ""]
    if cap is not None and not knee_found(steps, cap):
        lines += [f"**Capacity: at least {cap.load:g} {label}** — {cap.rps:.3g} requests/s, "
                  f"{cap.tps:.3g} output tokens/s at {cap.attainment:.1%} attainment, the "
                  "highest load of the sweep: no step missed the target, so the knee lies "
                  "above it. Add higher loads; `values.yaml` holds this lower bound.", ""]
    elif cap is not None:
        lines += [f"**Capacity: {cap.load:g} {label}** — {cap.rps:.3g} requests/s, "
                  f"{cap.tps:.3g} output tokens/s at {cap.attainment:.1%} attainment. "
                  "See `values.yaml` for the chart.", ""]
    else:
        lines += ["**Capacity: not found** — attainment was below the target at the lowest "
                  "load: lower the load or relax the objectives.", ""]
    if cap is not None and cap.mode == "concurrency":
        lines += [CLOSED_LOOP, ""]
    lines += [f"| {label} | requests (failed) | sent req/s | req/s | out tok/s | "
              "TTFT p50 / p90 / p99 ms | TPOT p50 / p90 / p99 ms | ITL p50 / p99 ms | "
              "e2e p50 / p99 s | attainment | "
              "goodput req/s | good tok/s | engine queue | KV | engine RSS peak / mean MiB | "
              "GPU mem MiB | GPU util | SM active | J / token | $ / 1M tokens |",
              "|" + "---:|" * 20]
    for s in steps:
        ms = 1000.0
        mark = " ◀" if s is cap else ""
        lines.append(
            f"| {s.load:g}{mark} | {len(s.results)} ({s.failed}) | {s.sent_rps:.3g} | "
            f"{s.rps:.3g} | {s.tps:.3g} | "
            f"{_f(s.pct('ttft', .5), scale=ms)} / {_f(s.pct('ttft', .9), scale=ms)} / "
            f"{_f(s.pct('ttft', .99), scale=ms)} | {_f(s.pct('tpot', .5), scale=ms)} / "
            f"{_f(s.pct('tpot', .9), scale=ms)} / {_f(s.pct('tpot', .99), scale=ms)} | "
            f"{_f(s.pct('itl', .5), scale=ms)} / {_f(s.pct('itl', .99), scale=ms)} | "
            f"{_f(s.pct('e2e', .5), '.2f')} / {_f(s.pct('e2e', .99), '.2f')} | "
            f"{_f(s.attainment, '.1%')} | {_f(s.goodput_rps, '.3g')} | "
            f"{_f(s.goodput_tps, '.3g')} | {_f(s.mean('engine_waiting'), '.1f')} | "
            f"{_f(s.peak('kv_usage'), '.0%')} | {_f(s.peak('engine_rss'), scale=2**-20)} / "
            f"{_f(s.mean('engine_rss'), scale=2**-20)} | "
            f"{_f(s.peak('gpu_memory'), scale=2**-20)} | {_f(s.mean('gpu_util'), '.0%')} | "
            f"{_f(s.mean('sm_active'), '.0%')} | {_f(s.joules_per_token, '.3g')} | "
            f"{_f(s.cost_per_million(hourly), '.3g')} |")
    few = math.ceil(2 / (1 - target)) if target < 1 else 0
    if cap is not None and len(cap.results) < few:
        lines += ["", f"**Note**: the capacity step holds {len(cap.results)} requests; at a "
                  f"{target:.0%} target one bad request in {few} is the whole margin, so its "
                  f"verdict is noise-prone. Lengthen `--window` until each step holds at least "
                  f"{few}."]
    if steps and steps[0].mode == "rate" and any(s.behind for s in steps):
        lines += ["", f"**Note**: at some steps the load generator sent one request in ten "
                  f"more than {LATE * 1000:.0f} ms behind its schedule (a busy machine, or too "
                  "many requests in flight for one client process): those steps offered a "
                  "later, burstier load than their label."]
    lines += ["", "Latency figures are the client's (request sent to first / each content "
              "token); attainment and goodput are the sidecar's own verdicts against the "
              "objectives; engine and GPU figures are the sidecar's /metrics sampled every "
              "second (mean, or peak where marked; GPU memory and energy add up over the "
              "GPUs, utilisation and SM activity are their mean).", ""]
    if plots and steps:
        for name, title in _plot(steps, cap, label, out):
            lines += [f"![{title}]({name})", ""]
    return "\n".join(lines)


# One figure: (file, title, panels); a panel: (y label, lines); a line: (label, values, style).
Line = tuple[str, list[float], str]


def _plot(steps: Sequence[Step], cap: Step | None, label: str, out: Path
          ) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [s.load for s in steps]
    mib = 2.0 ** -20

    def known(values: list[float]) -> bool:
        return any(not math.isnan(v) for v in values)

    latency: list[tuple[str, list[Line]]] = [
        (f"{what.upper()} (ms)", [(f"{what.upper()} p{q * 100:g}",
                                   [s.pct(what, q) * 1000 for s in steps], style)
                                  for q, style in ((.5, "-"), (.9, "--"), (.99, ":"))])
        for what in ("ttft", "tpot")]
    gpu_mem = [s.peak("gpu_memory") * mib for s in steps]
    util = [s.mean("gpu_util") for s in steps]
    figures: list[tuple[str, str, list[tuple[str, list[Line]]]]] = [
        ("latency.png", "Latency percentiles vs load", latency),
        ("throughput.png", "Throughput and goodput vs load", [
            ("tokens/s", [("output tokens/s", [s.tps for s in steps], "-"),
                          ("good output tokens/s", [s.goodput_tps for s in steps], "-")]),
            ("share of requests good", [("attainment", [s.attainment for s in steps], "-")])]),
        ("memory.png", "Engine memory, queue and GPU vs load", [
            ("MiB", [("RSS peak", [s.peak("engine_rss") * mib for s in steps], "-"),
                     ("RSS mean", [s.mean("engine_rss") * mib for s in steps], "-"),
                     *([("GPU memory peak", gpu_mem, "-")] if known(gpu_mem) else [])]),
            ("requests / ratio", [
                ("engine queue", [s.mean("engine_waiting") for s in steps], "-"),
                ("KV usage (peak)", [s.peak("kv_usage") for s in steps], "-"),
                *([("GPU utilisation", util, "-"),
                   ("SM active", [s.mean("sm_active") for s in steps], "-")]
                  if known(util) else [])])]),
    ]
    for name, title, panels in figures:
        fig, axes = plt.subplots(1, len(panels), figsize=(11, 4))
        for ax, (ylabel, lines) in zip(axes, panels, strict=True):
            for line_label, values, style in lines:
                ax.plot(x, values, style, marker="o", label=line_label)
            if cap is not None:
                ax.axvline(cap.load, color="grey", linestyle="--", label="capacity")
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
    return [(name, title) for name, title, _ in figures]


def write_values(values: dict[str, Any], about: dict[str, str], out: Path) -> None:
    import yaml

    head = ["# Generated by `llm-exporter calibrate`: helm install ... -f values.yaml", "#"]
    head += [f"# {k}: {v}" for k, v in about.items()]
    if not values:
        head.append("# No capacity found: nothing to set.")
    text = "\n".join(head) + "\n" + (yaml.safe_dump(values, sort_keys=False) if values else "")
    (out / "values.yaml").write_text(text)


# --- the command --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-exporter calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("the server (as for serve)")
    g.add_argument("--upstream", default="", metavar="URL",
                   help="An OpenAI-compatible server to calibrate. Empty: start the embedded "
                        "engine with --model.")
    g.add_argument("--model", default="", metavar="PATH",
                   help="Embedded engine: model folder or GGUF (default Gemma 3 270M).")
    g.add_argument("--max-batch", type=int, default=8, help="Embedded engine batch size.")
    g.add_argument("--served-model", default="", metavar="NAME",
                   help="Model name sent in requests (default: the server's first in "
                        "/v1/models).")
    g.add_argument("--slo", default="", metavar="FILE",
                   help="SLO file: the objectives requests are judged against, and the "
                        "goodput objective's target (default: the --slo-* defaults of serve).")
    g.add_argument("--gpu-hourly-cost", type=float, default=0.0)
    g.add_argument("--replica-hourly-cost", type=float, default=0.0)
    g.add_argument("--sidecar-arg", action="append", default=[], metavar="ARG",
                   help="Further argument for the sidecar (repeatable).")
    s = p.add_argument_group("the sweep")
    s.add_argument("--concurrency", default="", metavar="LIST",
                   help="Closed-loop steps: concurrent clients, e.g. 1,2,4,8 (default).")
    s.add_argument("--rate", default="", metavar="LIST",
                   help="Open-loop steps instead: Poisson arrivals, requests/s, e.g. 0.5,1,2.")
    s.add_argument("--window", type=float, default=30.0, metavar="SECONDS",
                   help="Seconds each step is held (default 30).")
    s.add_argument("--warmup", type=float, default=10.0, metavar="SECONDS",
                   help="Seconds of unmeasured load first (default 10).")
    s.add_argument("--refine", type=int, default=2, metavar="N",
                   help="After the sweep, up to N steps that bisect the gap between the "
                        "capacity and the first load above it that missed the target "
                        "(default 2: a sweep of 2,4,8 req/s that fails at 8 ends within 1 "
                        "req/s of the knee). 0: the sweep's loads only.")
    s.add_argument("--attainment-target", type=float, default=DEFAULT_TARGET,
                   help="Share of good requests a step must keep to be within capacity, when "
                        "the SLO file has no goodput objective (default 0.95).")
    s.add_argument("--headroom", type=float, default=0.8,
                   help="Autoscaler target as a share of capacity (default 0.8).")
    w = p.add_argument_group("the requests")
    w.add_argument("--prompts", default="", metavar="FILE",
                   help="JSONL, one request per line: {\"prompt\": ...} or {\"messages\": "
                        "[...]}, optional \"max_tokens\".")
    w.add_argument("--input-words", type=int, default=64,
                   help="Synthetic prompts: words per prompt (default 64).")
    w.add_argument("--output-tokens", type=int, default=32,
                   help="Tokens asked per request (max_tokens; default 32).")
    w.add_argument("--jitter", type=float, default=0.25,
                   help="Synthetic lengths vary by ± this share (default 0.25).")
    w.add_argument("--temperature", type=float, default=0.7,
                   help="Sampling temperature of the requests (default 0.7).")
    w.add_argument("--ignore-eos", action="store_true",
                   help="Ask the server to generate max_tokens whatever the model says "
                        "(\"ignore_eos\": true; vLLM, SGLang and the embedded engine honour it).")
    w.add_argument("--seed", type=int, default=1,
                   help="Seed of the prompts and arrival times. Every step draws the same "
                        "ones (common random numbers: a faster step holds every arrival of a "
                        "slower one), so steps differ by their load, not by their luck. "
                        "Change it to repeat a sweep with other draws.")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="Writes DIR/report.md, its PNG plots and DIR/values.yaml.")
    return p


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"llm-exporter calibrate: {what}: expected numbers, got {text!r}"
                         ) from None
    if not vals or any(v <= 0 for v in vals):
        raise SystemExit(f"llm-exporter calibrate: {what}: expected positive numbers")
    return vals


def _target(args: argparse.Namespace) -> float:
    if args.slo:
        from exporter import slo

        cfg = slo.load(args.slo)
        for o in cfg.objectives:
            if o.name == "goodput" and o.model is None:
                return o.target
    return float(args.attainment_target)


def _first_model(url: str) -> str:
    with contextlib.suppress(OSError, ValueError, KeyError, IndexError), \
            urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        return str(json.loads(r.read())["data"][0]["id"])
    return "default"


def cli_main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    if args.concurrency and args.rate:
        raise SystemExit("llm-exporter calibrate: give --concurrency or --rate, not both")
    mode = "rate" if args.rate else "concurrency"
    loads = _floats(args.rate, "--rate") if args.rate else _floats(
        args.concurrency or "1,2,4,8", "--concurrency")
    if args.window <= 0 or args.warmup < 0 or args.refine < 0:
        raise SystemExit("llm-exporter calibrate: --window must be positive, --warmup and "
                         "--refine not negative")
    if mode == "concurrency" and any(x != int(x) for x in loads):
        raise SystemExit("llm-exporter calibrate: --concurrency: whole numbers of clients")
    try:
        prompts = (from_jsonl(Path(args.prompts), args.output_tokens) if args.prompts else
                   synthetic(256, args.input_words, args.output_tokens, args.jitter, args.seed))
        target = _target(args)
    except (OSError, ValueError) as e:
        raise SystemExit(f"llm-exporter calibrate: {e}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from exporter.engine.launch import free_port, start_engine

    engine = None
    sidecar: subprocess.Popen[bytes] | None = None
    upstream = args.upstream
    try:
        if not upstream:
            print(f"calibrate: starting the embedded engine ({args.model or 'Gemma 3 270M'})",
                  file=sys.stderr, flush=True)
            engine = start_engine(args.model, max_batch=args.max_batch, max_queue=4096,
                                  quiet=True)
            upstream = engine.url
        port, mport = free_port(), free_port()
        cmd = [sys.executable, "-m", "exporter", "serve", "--upstream", upstream,
               "--host", "127.0.0.1", "--port", str(port), "--metrics-host", "127.0.0.1",
               "--metrics-port", str(mport), "--log-level", "warning",
               "--gpu-hourly-cost", str(args.gpu_hourly_cost),
               "--replica-hourly-cost", str(args.replica_hourly_cost), *args.sidecar_arg]
        if engine is not None:
            cmd += ["--engine-pid", str(engine.pid)]
        if args.slo:
            cmd += ["--slo", args.slo]
        sidecar = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        proxy, metrics = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{mport}/metrics"
        _wait(metrics, sidecar)
        model = args.served_model or _first_model(upstream)
        about = {"date": time.strftime("%Y-%m-%d %H:%M"),
                 "server": args.upstream or f"embedded engine ({args.model or 'Gemma 3 270M'},"
                                            f" max batch {args.max_batch})",
                 "model": model,
                 "requests": (f"{len(prompts)} from {args.prompts}" if args.prompts else
                              f"synthetic, ~{args.input_words} words in, {args.output_tokens} "
                              f"tokens out, ±{args.jitter:.0%}"),
                 "sweep": f"{mode} {', '.join(f'{x:g}' for x in loads)}, then up to "
                          f"{args.refine} bisection step(s); {args.window:g} s per step after "
                          f"{args.warmup:g} s warm-up"}
        steps = asyncio.run(sweep(proxy, metrics, model, mode, loads, args, prompts, target))
        hourly = args.gpu_hourly_cost + args.replica_hourly_cost
        cap = capacity(steps, target)
        (out / "report.md").write_text(report(steps, cap, target, out, about, hourly))
        bound = cap is not None and not knee_found(steps, cap)
        if bound:
            about["capacity"] = "a lower bound: no step of the sweep missed the target"
        closed = mode == "concurrency" and cap is not None
        if closed:
            about["arrivals"] = CLOSED_LOOP_SHORT
        write_values(chart_values(cap, target, args.headroom), about, out)
        print(f"calibrate: {len(steps)} step(s); capacity "
              f"{'at least ' if bound else ''}"
              f"{f'{cap.load:g} ({cap.rps:.3g} requests/s)' if cap else 'not found'}; "
              f"wrote {out / 'report.md'} and {out / 'values.yaml'}"
              f"{'; ' + CLOSED_LOOP_SHORT if closed else ''}", file=sys.stderr)
        return 0 if steps else 1
    finally:
        if sidecar is not None and sidecar.poll() is None:
            sidecar.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                sidecar.wait(10)
            if sidecar.poll() is None:
                sidecar.kill()
        if engine is not None:
            engine.stop()


def _wait(metrics: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"llm-exporter calibrate: the sidecar exited with status "
                             f"{proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(metrics, timeout=2):
            return
        time.sleep(0.25)
    raise SystemExit(f"llm-exporter calibrate: the sidecar did not answer {metrics}")


async def sweep(proxy: str, metrics: str, model: str, mode: str, loads: list[float],
                args: argparse.Namespace, prompts: list[Prompt], target: float) -> list[Step]:
    """Warm-up, one step per load, then up to ``args.refine`` bisection steps between the
    capacity and the first load above it that missed the target. Ctrl-C (or SIGTERM) ends it
    with the finished steps. Returns the steps in load order."""
    import aiohttp

    steps: list[Step] = []
    progress = Progress(len(loads) + args.refine)
    current = asyncio.current_task()
    loop = asyncio.get_running_loop()
    stopping = False

    def stop() -> None:
        nonlocal stopping
        stopping = True
        if current is not None:
            current.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    unit = "clients" if mode == "concurrency" else "req/s"
    timeout = aiohttp.ClientTimeout(total=args.window + DRAIN_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        try:
            if args.warmup > 0:
                await run_step(session, proxy, metrics, model, mode, loads[0], args.warmup,
                               prompts, args.seed + 2, lambda t, n: progress.show(
                                   0, "warm-up", t, args.warmup, n),
                               args.temperature, args.ignore_eos)
                progress.end(f"warm-up done ({args.warmup:g} s)")
            todo = list(loads)
            for i in itertools.count(1):
                if not todo:
                    if i > len(loads) + args.refine:
                        break
                    nxt = next_load(steps, target, mode)
                    if nxt is None:
                        break
                    todo.append(nxt)
                load = todo.pop(0)
                what = f"{load:g} {unit}" + (" (bisect)" if i > len(loads) else "")

                def tick(t: float, n: int, i: int = i, what: str = what) -> None:
                    progress.show(i, what, t, args.window, n)

                step = await run_step(session, proxy, metrics, model, mode, load, args.window,
                                      prompts, args.seed, tick, args.temperature,
                                      args.ignore_eos)
                steps.append(step)
                progress.end(f"step {i}/{progress.steps} {what}: {len(step.results)} "
                             f"requests, {step.rps:.3g} req/s, attainment "
                             f"{_f(step.attainment, '.1%')}")
        except asyncio.CancelledError:
            if not stopping:
                raise
            progress.end(f"stopped: keeping {len(steps)} finished step(s)")
    return sorted(steps, key=lambda s: s.load)


if __name__ == "__main__":
    raise SystemExit(cli_main(sys.argv[1:]))
