"""Saturation ramp: does ``llm_exporter_saturation_ratio`` rise before TTFT degrades?

Starts the embedded engine (``python -m exporter engine``) and the sidecar in front of it
(``python -m exporter serve --upstream ENGINE --engine-pid PID``), or only the sidecar with
``--upstream URL`` for a server already running, then raises the number of
concurrent streaming clients step by step. Each client sends chat requests back to back
(closed loop). During each step the sidecar's /metrics is sampled every 0.5 s (saturation,
engine waiting/running, sidecar queue) and every request's TTFT is measured by the client
(request sent to first content chunk). Prints one Markdown row per step.

    .venv/bin/python bench/saturation_ramp.py                 # tiny model, batch 4
    .venv/bin/python bench/saturation_ramp.py --model ''      # Gemma 3 270M (slow on 2 cores)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter import catalogue as c  # noqa: E402

WATCH = {c.SATURATION.name: "saturation", c.ENGINE_WAITING.name: "waiting",
         c.ENGINE_RUNNING.name: "running", c.QUEUED.name: "queued",
         c.SLO_LOAD.name: "slo_load"}
# Sampled, not greedy: the tiny model's random weights hit end-of-sequence at once when greedy,
# and a ramp of one-token answers measures nothing but prefill.
TEMPERATURE = 1.0
ENGINE_WATCH = {c.PROCESS_RSS.name: "engine_rss",
                c.PROCESS_CPU_UTILIZATION.name: "engine_cpu"}


@dataclass
class Step:
    concurrency: int
    ttft: list[float] = field(default_factory=list)
    done: int = 0
    tokens: int = 0
    failures: int = 0
    samples: dict[str, list[float]] = field(default_factory=dict)
    busy: list[tuple[float, float]] = field(default_factory=list)  # (when, busy seconds)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def one_request(session: aiohttp.ClientSession, url: str, model: str, max_tokens: int,
                      step: Step, i: int) -> None:
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": TEMPERATURE,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"Tell me a story, number {i}."}]}
    t0 = time.perf_counter()
    first = None
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as r:
            if r.status != 200:
                step.failures += 1
                await r.read()
                return
            async for line in r.content:
                if first is None and line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    choices = chunk.get("choices") or [{}]
                    if (choices[0].get("delta") or {}).get("content"):
                        first = time.perf_counter() - t0
                if line.startswith(b"data: {") and b'"usage"' in line:
                    usage = json.loads(line[6:]).get("usage") or {}
                    step.tokens += int(usage.get("completion_tokens") or 0)
    except (TimeoutError, aiohttp.ClientError):
        step.failures += 1
        return
    step.done += 1
    if first is not None:
        step.ttft.append(first)


async def client(session: aiohttp.ClientSession, url: str, model: str, max_tokens: int,
                 step: Step, until: float, cid: int) -> None:
    i = 0
    while time.perf_counter() < until:
        await one_request(session, url, model, max_tokens, step, cid * 100000 + i)
        i += 1


async def sampler(session: aiohttp.ClientSession, metrics_url: str, step: Step,
                  until: float) -> None:
    while time.perf_counter() < until:
        try:
            async with session.get(metrics_url) as r:
                text = await r.text()
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    if s.name == c.ENGINE_BUSY.exposed:
                        step.busy.append((time.perf_counter(), s.value))
                    if s.name in WATCH:
                        step.samples.setdefault(WATCH[s.name], []).append(s.value)
                    elif s.name in ENGINE_WATCH and s.labels.get("process") == "engine":
                        step.samples.setdefault(ENGINE_WATCH[s.name], []).append(s.value)
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.5)


async def ramp(url: str, metrics_url: str, model: str, levels: list[int], seconds: float,
               max_tokens: int) -> list[Step]:
    steps = []
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        warm = Step(0)
        await one_request(session, url, model, max_tokens, warm, -1)  # first batch is slow
        for n in levels:
            step = Step(n)
            until = time.perf_counter() + seconds
            await asyncio.gather(sampler(session, metrics_url, step, until),
                                 *(client(session, url, model, max_tokens, step, until, k)
                                   for k in range(n)))
            steps.append(step)
            print(f"  concurrency {n}: {step.done} requests", file=sys.stderr, flush=True)
    return steps


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def table(steps: list[Step], seconds: float) -> str:
    rows = ["| clients | requests | saturation mean | saturation max | SLO load (end) | "
            "engine waiting (mean) | engine running (mean) | TTFT p50 (ms) | TTFT p95 (ms) | "
            "output tok/s | engine busy | engine CPU (cores) | engine RSS (MiB) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in steps:
        def mean(k: str, s: Step = s) -> float:
            v = s.samples.get(k, [])
            return statistics.fmean(v) if v else float("nan")
        sat = s.samples.get("saturation", [])
        # rate(llm_exporter_engine_busy_seconds_total) over the step: hardware utilisation.
        b = s.busy
        util = (b[-1][1] - b[0][1]) / (b[-1][0] - b[0][0]) if len(b) > 1 else float("nan")
        rss = s.samples.get("engine_rss", [])
        load = s.samples.get("slo_load", [])  # the sidecar's own window: read at the end
        rows.append(f"| {s.concurrency} | {s.done} | {mean('saturation'):.2f} | "
                    f"{max(sat) if sat else float('nan'):.2f} | "
                    f"{load[-1] if load else float('nan'):.2f} | {mean('waiting'):.1f} | "
                    f"{mean('running'):.1f} | {pct(s.ttft, 0.5) * 1000:.0f} | "
                    f"{pct(s.ttft, 0.95) * 1000:.0f} | {s.tokens / seconds:.0f} | "
                    f"{util:.2f} | {mean('engine_cpu'):.2f} | "
                    f"{max(rss) / 2**20 if rss else float('nan'):.0f} |")
    return "\n".join(rows)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    import urllib.request

    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} did not become ready")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny",
                   help="'tiny' (built in a temp dir), a model folder, or '' for Gemma")
    p.add_argument("--upstream", default="", help="front this server instead of the embedded "
                   "engine")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--levels", default="1,2,3,4,5,6,8,10,12,16")
    p.add_argument("--seconds", type=float, default=12.0, help="per step")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--queue-threshold", type=float, default=5.0)
    p.add_argument("--slo-ttft", type=float, default=0.5, help="TTFT objective (s) the SLO "
                   "load reads against")
    p.add_argument("--slo-tpot", type=float, default=0.1, help="TPOT objective (s)")
    args = p.parse_args()

    model = args.model
    tmp = tempfile.TemporaryDirectory()
    if model == "tiny" and not args.upstream:
        from exporter.engine.tiny import build_tiny_model

        model = str(build_tiny_model(Path(tmp.name) / "tiny"))
    port, mport = free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen[bytes]] = []
    upstream = args.upstream
    serve = [sys.executable, "-m", "exporter", "serve", "--host", "127.0.0.1",
             "--port", str(port), "--metrics-host", "127.0.0.1", "--metrics-port", str(mport),
             "--saturation-queue-threshold", str(args.queue_threshold), "--log-level",
             "warning", "--slo-ttft", str(args.slo_ttft), "--slo-tpot", str(args.slo_tpot),
             # the SLO load over one step, read at its end
             "--slo-load-window", str(args.seconds)]
    url, metrics_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{mport}/metrics"
    try:
        if not upstream:
            eport = free_port()
            engine = [sys.executable, "-m", "exporter", "engine", "--model", model,
                      "--port", str(eport), "--max-batch", str(args.max_batch),
                      "--max-queue", "1024", "--device", "cpu"]
            print("$ " + " ".join(engine), file=sys.stderr)
            procs.append(subprocess.Popen(engine, cwd=ROOT, env=env))
            upstream = f"http://127.0.0.1:{eport}"
            wait_ready(upstream + "/health", procs[0], 900)
            serve += ["--engine-pid", str(procs[0].pid)]
        serve += ["--upstream", upstream]
        print("$ " + " ".join(serve), file=sys.stderr)
        procs.append(subprocess.Popen(serve, cwd=ROOT, env=env))
        wait_ready(metrics_url.replace("/metrics", "/readyz"), procs[-1], 120)
        levels = [int(x) for x in args.levels.split(",")]
        steps = asyncio.run(ramp(url, metrics_url, Path(model).name if model else "gemma",
                                 levels, args.seconds, args.max_tokens))
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        tmp.cleanup()
    what = (f"Sidecar in front of {args.upstream}" if args.upstream
            else f"Embedded engine ({args.model or 'Gemma 3 270M'}), max batch {args.max_batch}")
    print(f"\n{what}, queue threshold "
          f"{args.queue_threshold:g}, objectives TTFT {args.slo_ttft:g} s and TPOT "
          f"{args.slo_tpot:g} s, {args.seconds:g} s per step, {args.max_tokens} tokens "
          f"per request, closed-loop clients.\n")
    print(table(steps, args.seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
