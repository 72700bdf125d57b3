"""Relay benchmark: what the sidecar adds to a streamed LLM response, next to the floors.

One run, in interleaved rounds (the targets' order rotates every round, so machine drift
cancels), against one synthetic upstream (``python -m tests.upstream --raw``: 1 token per SSE
event, ``--itl`` apart). Targets:

- ``direct``   the upstream itself (the baseline every "added" figure is measured against);
- ``bare``     ``bench/bare_relay.py``, an aiohttp pass-through relay with no instrumentation
               (uvloop): the Python floor;
- ``nginx``    nginx with ``proxy_buffering off`` (when installed; ``--install-nginx`` runs
               ``apt-get install -y nginx-light``): the native floor;
- ``sidecar``  ``python -m exporter serve --max-concurrency 0``, fully instrumented.

The proxy under test runs on core 0 (taskset); the upstream and this process (the load
generator: raw asyncio protocols on uvloop, measuring on its own ``perf_counter`` clock) on
core 1. Each stream is one keep-alive connection sending chat-completion requests back to back;
a stream's first request (connection set-up) is left out of the latency figures.

Figures, per concurrency:
- added TTFT / ITL p50, p99: the target's percentile minus direct's (direct's own in brackets).
  TTFT = request written -> first content event read; ITL = gap between consecutive content
  events as read (events that arrive in one read count as a 0 gap);
- CPU s per 1,000 chunks: user+system CPU of the proxy process tree during its rounds, per
  1,000 SSE events delivered to the clients (role, content, finish and [DONE] events; the
  per-request cost is spread over them);
- RSS: the largest resident set of the proxy process tree sampled during its rounds.
- chunks/s one core relays: 1 ÷ CPU per chunk at the highest concurrency.
Saturation: 256 streams with the inter-token gap shrinking step by step (offered 25k -> 100k
chunks/s): chunks/s delivered in a steady window, the proxy's CPU share, SSE events per client
read (above 1: the relay fell behind and coalesced events).

As root the run goes on in a session of its own whose scheduler autogroup gets niceness -10
(``--nice``): Linux shares CPU between sessions, so on a busy shared machine the proxy would
otherwise get a sliver of its core. The load generator's core use is printed: if it nears 100%,
the figures measure the generator, not the proxy.

    .venv/bin/python bench/relay_bench.py [--quick] [--install-nginx] [--targets bare,sidecar]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
PROXY_CORE, LOAD_CORE = 0, 1
clock = time.perf_counter
ALL_TARGETS = ("direct", "bare", "nginx", "sidecar")

NGINX_CONF = """\
worker_processes 1;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    upstream synthetic {{ server 127.0.0.1:{upstream_port}; keepalive 1024; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://synthetic;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


# -- processes -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Target:
    name: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def tree(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu(self) -> float:
        total = 0.0
        for p in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def rss(self) -> int:
        total = 0
        for p in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total


def spawn(cmd: Sequence[str], core: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(["taskset", "-c", str(core), *cmd], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def wait_ready(t: Target, timeout: float = 60.0) -> None:
    """Until a real streamed request through the target succeeds."""
    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}],
                       "stream": True}).encode()
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if t.proc is not None and t.proc.poll() is not None:
            break
        req = urllib.request.Request(f"http://127.0.0.1:{t.port}/v1/chat/completions",
                                     data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.read().endswith(b"data: [DONE]\n\n"):
                    return
        except (OSError, urllib.error.URLError) as e:
            last = str(e)
        time.sleep(0.2)
    tail = t.log.read_text(errors="replace")[-3000:] if t.log and t.log.exists() else ""
    raise RuntimeError(f"{t.name} did not become ready ({last})\n{tail}")


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)), None)


def install_nginx() -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "nginx-light"], check=True, env=env)


def start_targets(names: Sequence[str], upstream_port: int, tmp: Path,
                  sidecar_args: Sequence[str], notes: list[str]) -> dict[str, Target]:
    py = sys.executable
    up_url = f"http://127.0.0.1:{upstream_port}"
    targets: dict[str, Target] = {}
    for name in names:
        port = free_port()
        log = tmp / f"{name}.log"
        t = Target(name, port, log=log)
        if name == "direct":
            t.port = upstream_port
        elif name == "bare":
            t.proc = spawn([py, str(ROOT / "bench" / "bare_relay.py"), "--upstream", up_url,
                            "--port", str(port)], PROXY_CORE, log)
        elif name == "nginx":
            binary = nginx_binary()
            assert binary is not None
            d = tmp / "nginx"
            d.mkdir(exist_ok=True)
            conf = d / "nginx.conf"
            conf.write_text(NGINX_CONF.format(dir=d, upstream_port=upstream_port, port=port))
            t.proc = spawn([binary, "-p", str(d), "-c", str(conf), "-g", "daemon off;"],
                           PROXY_CORE, log)
        elif name == "sidecar":
            t.proc = spawn([py, "-m", "exporter", "serve", "--upstream", up_url,
                            "--host", "127.0.0.1", "--port", str(port),
                            "--metrics-host", "127.0.0.1", "--metrics-port", str(free_port()),
                            "--max-concurrency", "0", *sidecar_args], PROXY_CORE, log)
        targets[name] = t
    for name, t in list(targets.items()):
        try:
            wait_ready(t)
        except RuntimeError as e:
            if name == "direct":
                raise
            stop(t.proc)
            del targets[name]
            notes.append(f"{name} skipped: it did not answer a streamed request.")
            print(f"{notes[-1]}\n{e}", file=sys.stderr)
    return targets


# -- load generator ------------------------------------------------------------------------
@dataclass
class Sample:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    events: int = 0  # SSE events delivered (all requests, warm-up included)
    reads: int = 0  # socket reads that carried body bytes
    requests: int = 0
    errors: int = 0
    # A steady-state window (saturation): events and reads inside it only.
    win_start: float = math.inf
    win_end: float = math.inf
    win_events: int = 0
    win_reads: int = 0


class Client(asyncio.Protocol):
    """One keep-alive connection; times content events as they are read."""

    def __init__(self, sample: Sample, first: int, count: int) -> None:
        self.sample = sample
        self.first = first  # index of the first content event (after the role chunk)
        self.last_content = first + count - 1
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[bool] | None = None
        self.measure = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._finish(ok=False)

    def send(self, request: bytes) -> asyncio.Future[bool]:
        assert self.transport is not None
        self.done = asyncio.get_running_loop().create_future()
        self.head: bytes | None = b""
        self.status = 0
        self.chunked = True
        self.remaining = -1
        self.events = 0
        self.prev_nl = False
        self.tail = b""
        self.ttft = -1.0
        self.itl: list[float] = []
        self.last_t = 0.0
        self.sent = clock()
        self.transport.write(request)
        return self.done

    def data_received(self, data: bytes) -> None:
        t = clock()
        if self.done is None:
            return
        if self.head is not None:
            self.head += data
            i = self.head.find(b"\r\n\r\n")
            if i < 0:
                return
            head, data = self.head[:i].lower(), self.head[i + 4:]
            self.head = None
            self.status = int(head[9:12])
            self.chunked = b"transfer-encoding: chunked" in head
            j = head.find(b"content-length:")
            if j >= 0:
                end = head.find(b"\r\n", j)
                self.remaining = int(head[j + 15:end if end > 0 else None])
            if not data and (self.chunked or self.remaining != 0):
                return
        self.sample.reads += 1
        n = data.count(b"\n\n")
        if self.prev_nl and data[:1] == b"\n":
            n += 1
        self.prev_nl = data[-1:] == b"\n"
        s = self.sample
        if s.win_start <= t < s.win_end:
            s.win_events += n
            s.win_reads += 1
        if n:
            k0 = self.events
            self.events = k0 + n
            for k in range(max(k0, self.first), min(k0 + n, self.last_content + 1)):
                if k == self.first:
                    self.ttft = t - self.sent
                else:
                    self.itl.append(t - self.last_t)
                self.last_t = t
        if self.chunked:
            self.tail = (self.tail + data[-7:])[-7:]
            if self.tail.endswith(b"\r\n0\r\n\r\n") or self.tail == b"0\r\n\r\n":
                self._finish(ok=True)
        elif self.remaining >= 0:
            self.remaining -= len(data)
            if self.remaining <= 0:
                self._finish(ok=True)

    def _finish(self, ok: bool) -> None:
        done, self.done = self.done, None
        if done is None or done.done():
            return
        s = self.sample
        s.events += self.events
        s.requests += 1
        ok = ok and self.status == 200 and self.ttft >= 0
        if not ok:
            s.errors += 1
        elif self.measure:
            s.ttft.append(self.ttft)
            s.itl.extend(self.itl)
        done.set_result(ok)


# API -> (path, index of the first content event, request body fields). Responses and
# Anthropic Messages streams open with 4 and 2 events that carry no token.
APIS: dict[str, tuple[str, int, dict[str, object]]] = {
    "chat": ("/v1/chat/completions", 1, {"messages": [{"role": "user",
                                                       "content": "Say something."}]}),
    "responses": ("/v1/responses", 4, {"input": "Say something."}),
    "messages": ("/v1/messages", 2, {"messages": [{"role": "user",
                                                   "content": "Say something."}]}),
}


def build_request(port: int, tokens: int, extra: dict[str, object] | None = None,
                  api: str = "chat") -> bytes:
    path, _, fields = APIS[api]
    limit = "max_output_tokens" if api == "responses" else "max_tokens"
    body = json.dumps({"model": "bench", "stream": True, limit: tokens, **fields}).encode()
    headers = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}",
               "Content-Type: application/json", "Accept: text/event-stream",
               f"Content-Length: {len(body)}"]
    if extra:
        headers.append(f"x-synthetic: {json.dumps(extra)}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


async def one_stream(port: int, request: bytes, tokens: int, start_in: float, stop_at: float,
                     sample: Sample, first_content: int = 1) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(start_in)
    proto: Client | None = None
    first = True
    try:
        while clock() < stop_at:
            if proto is None or proto.closed:
                _, proto = await loop.create_connection(
                    lambda: Client(sample, first_content, tokens), "127.0.0.1", port)
                first = True
            proto.measure = not first
            first = False
            try:
                await asyncio.wait_for(proto.send(request), 60)
            except TimeoutError:
                sample.errors += 1
                proto.closed = True
    except OSError:
        sample.errors += 1
    finally:
        if proto is not None and proto.transport is not None:
            proto.transport.close()


@dataclass
class Round:
    sample: Sample
    wall: float
    cpu: float  # proxy process tree, seconds
    rss: int  # proxy process tree, largest sampled
    load_busy: float  # share of the load core used by upstream + load generator
    win_cpu: float = 0.0  # proxy CPU inside the sample's window
    win_wall: float = 0.0


async def run_round(t: Target, upstream: psutil.Process, streams: int, duration: float,
                    tokens: int, itl: float, ttft: float, seed: int,
                    extra: dict[str, object] | None = None,
                    stagger: float | None = None, api: str = "chat") -> Round:
    """``streams`` connections for ``duration`` s; starts spread over ``stagger`` s (default:
    one response's length). With ``stagger`` given, a steady window from the last start to the
    end is measured apart (for saturation)."""
    rng = random.Random(seed)
    request = build_request(t.port, tokens, extra, api)
    me = psutil.Process()
    sample = Sample()
    span = ttft + tokens * itl if stagger is None else stagger
    rss = 0
    stop_sampling = asyncio.Event()

    async def sample_rss() -> None:
        nonlocal rss
        while not stop_sampling.is_set():
            rss = max(rss, t.rss())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_sampling.wait(), 0.25)

    def load_cpu() -> float:
        a, b = me.cpu_times(), upstream.cpu_times()
        return float(a.user + a.system + b.user + b.system)

    cpu0, load0, t0 = t.cpu(), load_cpu(), clock()
    sampler = asyncio.create_task(sample_rss())
    stop_at = t0 + duration
    win_cpu: list[float] = []

    async def window() -> None:
        for at in (sample.win_start, sample.win_end):
            await asyncio.sleep(max(0.0, at - clock()))
            win_cpu.append(t.cpu())

    windowed = None
    if stagger is not None and duration > stagger + 0.5:
        sample.win_start, sample.win_end = t0 + stagger + 0.2, stop_at
        windowed = asyncio.create_task(window())
    await asyncio.gather(*(one_stream(t.port, request, tokens, rng.uniform(0, span), stop_at,
                                      sample, APIS[api][1]) for _ in range(streams)))
    wall = clock() - t0
    stop_sampling.set()
    await sampler
    cpu = t.cpu() - cpu0
    busy = (load_cpu() - load0) / wall
    rd = Round(sample, wall, cpu, rss, busy)
    if windowed is not None:
        await windowed
        rd.win_cpu = win_cpu[1] - win_cpu[0]
        rd.win_wall = sample.win_end - sample.win_start
    return rd


# -- statistics and the table ---------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


@dataclass
class Agg:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    events: int = 0
    reads: int = 0
    requests: int = 0
    errors: int = 0
    cpu: float = 0.0
    wall: float = 0.0
    rss: int = 0
    load_busy: float = 0.0
    win_events: int = 0
    win_reads: int = 0
    win_cpu: float = 0.0
    win_wall: float = 0.0

    def add(self, r: Round) -> None:
        s = r.sample
        self.win_events += s.win_events
        self.win_reads += s.win_reads
        self.win_cpu += r.win_cpu
        self.win_wall += r.win_wall
        self.ttft += s.ttft
        self.itl += s.itl
        self.events += s.events
        self.reads += s.reads
        self.requests += s.requests
        self.errors += s.errors
        self.cpu += r.cpu
        self.wall += r.wall
        self.rss = max(self.rss, r.rss)
        self.load_busy = max(self.load_busy, r.load_busy)


def ms(x: float) -> str:
    return "—" if math.isnan(x) else f"{x * 1000:+.2f}"


def latency_table(results: dict[tuple[str, int], Agg], targets: Sequence[str],
                  concurrencies: Sequence[int]) -> list[str]:
    lines = ["| streams | relay | added TTFT p50 (ms) | added TTFT p99 (ms) | "
             "added ITL p50 (ms) | added ITL p99 (ms) | CPU s / 1k chunks | RSS (MiB) | "
             "requests (errors) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in concurrencies:
        for name in targets:
            a = results.get((name, c))
            if a is None:
                continue
            api = name.partition(" ")[2]  # "sidecar (responses)": against "direct (responses)"
            base = results.get((f"direct {api}".strip(), c))
            if name.startswith("direct") or base is None:
                cells = [f"[{pct(a.ttft, .5) * 1000:.2f}]", f"[{pct(a.ttft, .99) * 1000:.2f}]",
                         f"[{pct(a.itl, .5) * 1000:.2f}]", f"[{pct(a.itl, .99) * 1000:.2f}]"]
            else:
                cells = [ms(pct(a.ttft, q) - pct(base.ttft, q)) for q in (.5, .99)]
                cells += [ms(pct(a.itl, q) - pct(base.itl, q)) for q in (.5, .99)]
            if name.startswith("direct"):
                cpu, rss = "—", "—"
            else:
                cpu = f"{a.cpu / a.events * 1000:.3f}" if a.events else "—"
                rss = f"{a.rss / 2**20:.0f}"
            lines.append(f"| {c} | {name} | {' | '.join(cells)} | {cpu} | {rss} | "
                         f"{a.requests} ({a.errors}) |")
    return lines


def saturation_table(sat: dict[tuple[str, float], Agg], names: Sequence[str],
                     itls: Sequence[float], streams: int,
                     steady: dict[str, Agg], steady_streams: int) -> list[str]:
    """One row per offered rate; each cell: delivered k chunks/s, proxy CPU, events per read."""
    relays = [n for n in names if n != "direct"]
    lines = ["| offered chunks/s | " + " | ".join(names) + " |",
             "|---:|" + "---:|" * len(names)]
    best: dict[str, tuple[float, float, float, float]] = {}
    for itl in itls:
        cells = []
        for name in names:
            a = sat[(name, itl)]
            rate = a.win_events / a.win_wall if a.win_wall else 0.0
            per_read = a.win_events / a.win_reads if a.win_reads else math.nan
            if name == "direct":
                cells.append(f"{rate / 1000:.1f}k ({per_read:.1f}/read)")
                continue
            share = a.win_cpu / a.win_wall if a.win_wall else 0.0
            cells.append(f"{rate / 1000:.1f}k @ {share:.0%} CPU ({per_read:.1f}/read)")
            if rate > best.get(name, (0.0, 0.0, 0.0))[0]:
                best[name] = (rate, share, per_read,
                              a.win_cpu / a.win_events * 1e6 if a.win_events else math.nan)
        lines.append(f"| {streams / itl / 1000:.1f}k | " + " | ".join(cells) + " |")
    lines += ["", f"| relay | chunks/s one core relays (1 ÷ CPU per chunk at "
              f"{steady_streams} streams) | most chunks/s delivered in the steps | proxy CPU "
              "share then | events per read then | CPU µs / chunk then |",
              "|---|---:|---:|---:|---:|---:|"]
    for name in relays:
        if name not in best:
            continue
        rate, share, per_read, us = best[name]
        st = steady.get(name)
        core = f"{st.events / st.cpu:,.0f}" if st is not None and st.cpu else "—"
        lines.append(f"| {name} | {core} | {rate:,.0f} | {share:.0%} | {per_read:.1f} | "
                     f"{us:.1f} |")
    return lines


# -- the run -------------------------------------------------------------------------------
async def bench(a: argparse.Namespace, targets: dict[str, Target], upstream: psutil.Process
                ) -> tuple[dict[tuple[str, int], Agg], dict[tuple[str, float], Agg]]:
    names = list(targets)
    results: dict[tuple[str, int], Agg] = {(n, c): Agg() for n in names for c in a.concurrency}
    seed = 0
    for c in a.concurrency:
        for r in range(a.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                seed += 1
                rd = await run_round(targets[name], upstream, c, a.duration, a.tokens, a.itl,
                                     a.ttft, seed)
                results[(name, c)].add(rd)
                print(f"  streams={c:<4} round={r + 1} {name:<8} requests={rd.sample.requests:<5}"
                      f" ttft_p50={pct(rd.sample.ttft, .5) * 1000:7.2f} ms"
                      f" itl_p99={pct(rd.sample.itl, .99) * 1000:7.2f} ms"
                      f" cpu={rd.cpu:6.2f} s  load-core={rd.load_busy:4.0%}", flush=True)
                await asyncio.sleep(0.2)
    # The other APIs' streams, through the sidecar only (against direct): the per-event cost of
    # each protocol's scanner next to chat's.
    for api in a.apis:
        if api == "chat":
            continue
        pair = [n for n in ("direct", "sidecar") if n in targets]
        for c in a.concurrency:
            for r in range(a.rounds):
                for name in pair[r % len(pair):] + pair[:r % len(pair)]:
                    seed += 1
                    rd = await run_round(targets[name], upstream, c, a.duration, a.tokens,
                                         a.itl, a.ttft, seed, api=api)
                    results.setdefault((f"{name} ({api})", c), Agg()).add(rd)
                    print(f"  streams={c:<4} round={r + 1} {name} ({api}) "
                          f"requests={rd.sample.requests:<5} "
                          f"ttft_p50={pct(rd.sample.ttft, .5) * 1000:7.2f} ms "
                          f"cpu={rd.cpu:6.2f} s", flush=True)
                    await asyncio.sleep(0.2)
    sat: dict[tuple[str, float], Agg] = {}
    for itl in a.sat_itl if a.saturation > 0 else []:
        extra: dict[str, object] = {"ttft": 0.0, "itl": itl, "tokens": a.sat_tokens}
        for r in range(a.sat_rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                seed += 1
                rd = await run_round(targets[name], upstream, a.saturation, a.sat_duration,
                                     a.sat_tokens, itl, 0.0, seed, extra, stagger=0.1)
                sat.setdefault((name, itl), Agg()).add(rd)
                s, w = rd.sample, max(rd.win_wall, 1e-9)
                print(f"  saturation offered={a.saturation / itl:8,.0f}/s {name:<8} "
                      f"delivered={s.win_events / w:8,.0f}/s "
                      f"events/read={s.win_events / max(s.win_reads, 1):5.1f} "
                      f"proxy-cpu={rd.win_cpu / w:4.0%} load-core={rd.load_busy:4.0%}",
                      flush=True)
                await asyncio.sleep(0.2)
    return results, sat


def own_autogroup(nice: int) -> None:
    """Go on in a new session (hence a new scheduler autogroup) with ``nice``.

    Linux's autogroups share CPU between sessions, whatever each process's own niceness; the
    autogroup's niceness is what counts against other sessions. It ends with the session.
    """
    path = Path("/proc/self/autogroup")
    if not path.exists():
        return
    if os.getsid(0) != os.getpid():
        child = os.fork()
        if child:
            def forward(sig: int, _frame: object) -> None:
                os.kill(child, sig)

            signal.signal(signal.SIGINT, forward)
            signal.signal(signal.SIGTERM, forward)
            _, status = os.waitpid(child, 0)
            os._exit(os.waitstatus_to_exitcode(status))
        os.setsid()
    try:
        path.write_text(str(nice))
    except OSError as e:
        print(f"could not set the autogroup's niceness ({e}); figures may be noisier")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="About one minute instead of ~5.")
    p.add_argument("--targets", default=",".join(ALL_TARGETS),
                   help="Comma-separated subset of direct,bare,nginx,sidecar "
                        "(direct is always added).")
    p.add_argument("--concurrency", default="1,64,256", help="Concurrent streams per level.")
    p.add_argument("--rounds", type=int, default=None, help="Rounds per level (default 3; 2 "
                   "with --quick).")
    p.add_argument("--duration", type=float, default=None,
                   help="Seconds per target per round (default 4; 1.5 with --quick).")
    p.add_argument("--tokens", type=int, default=32, help="Content tokens per response.")
    p.add_argument("--apis", default="chat,responses,messages",
                   help="Streams to relay: chat (every target), and responses (OpenAI "
                        "Responses) and messages (Anthropic Messages) through the sidecar "
                        "only, each against direct.")
    p.add_argument("--itl", type=float, default=0.01, help="Upstream inter-token gap (s).")
    p.add_argument("--ttft", type=float, default=0.02, help="Upstream time to first token.")
    p.add_argument("--saturation", type=int, default=256,
                   help="Streams for the saturation phase (0 skips it).")
    p.add_argument("--sat-itl", default="0.01,0.005,0.0033,0.0025",
                   help="Inter-token gaps (s) of the saturation steps: offered chunks/s = "
                        "streams / gap.")
    p.add_argument("--sat-tokens", type=int, default=100)
    p.add_argument("--sat-duration", type=float, default=None)
    p.add_argument("--sat-rounds", type=int, default=None)
    p.add_argument("--sidecar-arg", action="append", default=[],
                   help="Extra argument for `exporter serve` (repeatable).")
    p.add_argument("--nice", type=int, default=-10 if os.geteuid() == 0 else 0,
                   help="Run in a session of its own whose scheduler autogroup gets this "
                        "niceness (default -10 as root, 0 otherwise): with autogroups, each "
                        "session shares the CPU equally, so on a busy shared machine the proxy "
                        "would otherwise get a sliver of its core.")
    p.add_argument("--install-nginx", action="store_true",
                   help="apt-get install -y nginx-light first (needs root).")
    p.add_argument("--out", default=str(ROOT / "bench" / "results.md"),
                   help="Where to write the Markdown tables ('' for nowhere).")
    a = p.parse_args(argv)
    a.concurrency = [int(x) for x in a.concurrency.split(",") if x]
    a.apis = [x.strip() for x in a.apis.split(",") if x.strip()]
    unknown = set(a.apis) - set(APIS)
    if unknown:
        p.error(f"--apis: unknown {', '.join(sorted(unknown))}; one of {', '.join(APIS)}")
    if a.rounds is None:
        a.rounds = 2 if a.quick else 3
    if a.duration is None:
        a.duration = 1.5 if a.quick else 4.0
    a.sat_itl = [float(x) for x in a.sat_itl.split(",") if x]
    if a.sat_duration is None:
        a.sat_duration = 2.0 if a.quick else 3.0
    if a.sat_rounds is None:
        a.sat_rounds = 1
    return a


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if a.install_nginx and nginx_binary() is None:
        install_nginx()
    wanted = [n.strip() for n in a.targets.split(",") if n.strip()]
    names = ["direct", *[n for n in ALL_TARGETS[1:] if n in wanted]]
    notes: list[str] = []
    if "nginx" in names and nginx_binary() is None:
        names.remove("nginx")
        notes.append("nginx not installed: skipped (rerun with --install-nginx, or "
                     "`apt-get install -y nginx-light`).")
        print(notes[-1])
    if shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs taskset and two cores")
    if a.nice:
        own_autogroup(a.nice)
    os.sched_setaffinity(0, {LOAD_CORE})
    started = time.monotonic()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmpdir:
        tmp = Path(tmpdir)
        up_port = free_port()
        up_proc = spawn([sys.executable, "-m", "tests.upstream", "--raw", "--port", str(up_port),
                         "--ttft", str(a.ttft), "--itl", str(a.itl), "--tokens", str(a.tokens)],
                        LOAD_CORE, tmp / "upstream.log")
        targets: dict[str, Target] = {}
        try:
            targets = start_targets(names, up_port, tmp, a.sidecar_arg, notes)
            names = list(targets)
            print(f"targets ready: {', '.join(names)}; proxy core {PROXY_CORE}, "
                  f"upstream + load generator core {LOAD_CORE}", flush=True)
            import uvloop

            results, sat = uvloop.run(bench(a, targets, psutil.Process(up_proc.pid)))
        finally:
            for t in targets.values():
                stop(t.proc)
            stop(up_proc)
    elapsed = time.monotonic() - started
    total = sum(x.requests for x in results.values())
    busy = max((x.load_busy for x in results.values()), default=0.0)
    header = [
        f"Relay benchmark ({time.strftime('%Y-%m-%d')}, {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}): "
        f"{a.rounds} interleaved rounds × {a.duration:g} s per target and level, "
        f"{a.tokens} tokens per response, 1 token per SSE event, upstream TTFT "
        f"{a.ttft * 1000:g} ms, ITL {a.itl * 1000:g} ms; proxy pinned to core {PROXY_CORE}, "
        f"upstream + load generator to core {LOAD_CORE} (busiest round: {busy:.0%} of it), "
        f"autogroup niceness {a.nice}; load average {load[0]:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end; "
        f"{total:,} requests in {elapsed:.0f} s.",
        "",
        "Added figures are the relay's percentile minus direct's; [direct's own] in brackets. "
        "Chunks = SSE events delivered (role, content, finish, [DONE]).",
        "",
    ]
    rows = [*names, *[f"{n} ({api})" for api in a.apis if api != "chat"
                      for n in ("direct", "sidecar") if n in names]]
    lines = header + latency_table(results, rows, a.concurrency)
    if sat:
        lines += ["", f"Saturation: {a.saturation} streams of {a.sat_tokens} tokens, the gap "
                  "shrinking step by step; each cell: chunks/s delivered @ the proxy's CPU "
                  "share of its core (SSE events per client read: above 1 means the relay "
                  "fell behind and coalesced events, which makes each event cheaper). A proxy "
                  "CPU share under 100% at the top step means other work on the machine took "
                  "the rest of the core.", ""]
        top = max(a.concurrency)
        lines += saturation_table(sat, names, a.sat_itl, a.saturation,
                                  {n: results[(n, top)] for n in names}, top)
    lines += ["", *notes] if notes else []
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if a.out:
        Path(a.out).write_text(text)
        print(f"written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
