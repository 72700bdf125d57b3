"""``make demo`` / ``llm-exporter demo``: real figures from a real model in one command.

Starts the embedded engine (Gemma 3 270M unless ``--model``), puts the sidecar in front of it
(``python -m exporter serve --upstream ...`` as a subprocess, the way a user would run it),
drives a bounded mixed load (short and long prompts, more concurrent streams than the sidecar
lets through, so requests queue) and redraws a table of what the client saw and what the engine
reported, until ``--duration`` runs out or Ctrl-C. Children are always terminated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

SHORT = ["Write a haiku about the sea.", "Name three colours.", "What is a cat?",
         "Once upon a time there was a little", "The best thing about mornings is"]
LONG_BASE = ("Observability for language model servers means measuring how long a request "
             "waits, how long the prompt takes to process, and how fast tokens are produced. ")
LONG = [LONG_BASE * k + "Summarise the text above in one sentence." for k in (6, 10, 14)]


@dataclass
class Sample:
    ttft: float
    e2e: float
    tpot: float | None
    itls: list[float]
    tokens: int
    timings: dict[str, Any]


@dataclass
class Stats:
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0
    rejected: int = 0
    t0: float = field(default_factory=time.monotonic)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


async def _one(session: Any, url: str, stats: Stats, rng: random.Random) -> None:
    long = rng.random() < 0.3
    prompt = rng.choice(LONG if long else SHORT)
    body = {"messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": rng.randint(16, 48), "temperature": 0.7,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        if r.status == 429:
            stats.rejected += 1
            return
        if r.status != 200:
            stats.errors += 1
            return
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            timings = chunk.get("timings") or timings
            usage = chunk.get("usage") or usage
            for c in chunk.get("choices", []):
                if c.get("delta", {}).get("content"):
                    stamps.append(time.perf_counter())
    if not stamps:
        stats.errors += 1
        return
    n = int(usage.get("completion_tokens", len(stamps)))
    e2e = stamps[-1] - t0
    ttft = stamps[0] - t0
    stats.samples.append(Sample(ttft, e2e, (e2e - ttft) / (n - 1) if n > 1 else None,
                                [b - a for a, b in itertools.pairwise(stamps)],
                                n, timings))


async def _client(url: str, stats: Stats, stop: asyncio.Event, seed: int) -> None:
    import aiohttp

    rng = random.Random(seed)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        while not stop.is_set():
            try:
                await _one(s, url, stats, rng)
            except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError):
                stats.errors += 1
                await asyncio.sleep(0.5)


def _peak_rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _sidecar_requests(metrics_url: str) -> float:
    total = 0.0
    with contextlib.suppress(OSError), urllib.request.urlopen(metrics_url, timeout=2) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("llm_exporter_requests_total{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def render(stats: Stats, duration: float, urls: dict[str, str], engine_pid: int) -> str:
    s = stats.samples
    el = time.monotonic() - stats.t0
    frac = min(1.0, el / duration)
    bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
    ms = 1000.0
    tim = [x.timings for x in s if x.timings]

    def row(name: str, vals: list[float]) -> str:
        return (f"  {name:<22}{_pct(vals, .5) * ms:>9.0f}{_pct(vals, .9) * ms:>9.0f}"
                f"{_pct(vals, .99) * ms:>9.0f}")

    toks = sum(x.tokens for x in s)
    lines = [
        f"[{bar}] {min(el, duration):5.0f}/{duration:.0f} s   requests {len(s)}  "
        f"rejected {stats.rejected}  errors {stats.errors}",
        f"  {'ms':<22}{'p50':>9}{'p90':>9}{'p99':>9}",
        row("TTFT (client)", [x.ttft for x in s]),
        row("TPOT (client)", [x.tpot for x in s if x.tpot is not None]),
        row("ITL (client)", [i for x in s for i in x.itls]),
        row("e2e (client)", [x.e2e for x in s]),
        row("queue (engine)", [t["queue_ms"] / ms for t in tim]),
        row("prefill (engine)", [t["prompt_ms"] / ms for t in tim]),
        row("decode (engine)", [t["predicted_ms"] / ms for t in tim]),
        f"  output tokens/s {toks / max(el, 1e-9):8.1f}   engine peak memory "
        f"{_peak_rss_mb(engine_pid):7.0f} MiB   sidecar counted "
        f"{_sidecar_requests(urls['metrics']):.0f} requests",
        f"  proxy   {urls['proxy']}/v1/chat/completions   (point your own client here)",
        f"  metrics {urls['metrics']}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-exporter demo", description=__doc__)
    p.add_argument("--duration", type=float, default=60.0, help="Seconds of load (default 60).")
    p.add_argument("--model", default="", help="Engine model (default: Gemma 3 270M).")
    p.add_argument("--concurrency", type=int, default=10, help="Concurrent client streams.")
    p.add_argument("--max-concurrency", type=int, default=6,
                   help="Sidecar's --max-concurrency (fewer than clients, so requests queue).")
    p.add_argument("--max-batch", type=int, default=4, help="Engine batch size.")
    p.add_argument("--port", type=int, default=8000, help="Proxy port.")
    p.add_argument("--metrics-port", type=int, default=9400, help="Metrics port.")
    return p


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from exporter.engine.launch import free_port, start_engine

    t0 = time.monotonic()
    print("llm-exporter demo: starting the embedded engine "
          f"({args.model or 'Gemma 3 270M'})...", file=sys.stderr, flush=True)
    engine = start_engine(args.model, max_batch=args.max_batch, max_queue=64)
    sidecar: subprocess.Popen[bytes] | None = None
    try:
        port = args.port or free_port()
        mport = args.metrics_port or free_port()
        cmd = [sys.executable, "-m", "exporter", "serve", "--upstream", engine.url,
               "--host", "127.0.0.1", "--port", str(port), "--metrics-host", "127.0.0.1",
               "--metrics-port", str(mport), "--max-concurrency", str(args.max_concurrency),
               "--engine-pid", str(engine.pid), "--log-level", "warning"]
        sidecar = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        urls = {"proxy": f"http://127.0.0.1:{port}",
                "metrics": f"http://127.0.0.1:{mport}/metrics"}
        _wait_http(urls["metrics"], sidecar, 60)
        print(f"llm-exporter demo: ready in {time.monotonic() - t0:.1f} s (engine "
              f"{engine.start_seconds:.1f} s); {args.concurrency} streams for "
              f"{args.duration:.0f} s. Ctrl-C stops.", file=sys.stderr, flush=True)
        stats = asyncio.run(_drive(args, urls, engine.pid))
        print(render(stats, args.duration, urls, engine.pid))
        return 0 if stats.samples else 1
    except KeyboardInterrupt:
        return 130
    finally:
        if sidecar is not None and sidecar.poll() is None:
            sidecar.terminate()
            try:
                sidecar.wait(10)
            except subprocess.TimeoutExpired:
                sidecar.kill()
        engine.stop()


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the sidecar exited with status {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2):
            return
        time.sleep(0.25)
    raise RuntimeError(f"the sidecar did not answer {url} within {timeout:.0f} s")


async def _drive(args: argparse.Namespace, urls: dict[str, str], engine_pid: int) -> Stats:
    stats = Stats()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    clients = [asyncio.create_task(_client(urls["proxy"], stats, stop, i))
               for i in range(args.concurrency)]
    live = sys.stdout.isatty()
    height = 0
    try:
        while not stop.is_set() and time.monotonic() - stats.t0 < args.duration:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0 if live else 10.0)
            text = render(stats, args.duration, urls, engine_pid)
            if live:
                sys.stdout.write(f"\x1b[{height}F\x1b[J" if height else "")
                height = text.count("\n") + 1
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
    finally:
        stop.set()
        for c in clients:  # in-flight streams are cut; the engine frees their slots
            c.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        if live and height:
            sys.stdout.write(f"\x1b[{height}F\x1b[J")
    return stats
