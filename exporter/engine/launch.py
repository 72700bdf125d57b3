"""Start the embedded engine as a child process and wait until it answers /health.

A subprocess keeps torch (threads, GIL, memory) away from the sidecar's event loop, and lets
the sidecar measure the engine process alone. The child's start-up lines (model conversion
progress on first run, load times) are passed through to our stderr as they come.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from typing import TextIO


class EngineStartError(RuntimeError):
    """The engine process exited, or never became healthy, during start-up."""


@dataclass
class EngineProcess:
    proc: subprocess.Popen[bytes]
    url: str
    start_seconds: float = 0.0
    _tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, wait, then SIGKILL: never leave an engine behind."""
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_engine(model: str, host: str = "127.0.0.1", port: int = 0, max_batch: int = 8,
                 max_queue: int = 64, device: str = "auto", timeout: float = 900.0,
                 log: TextIO = sys.stderr, quiet: bool = False) -> EngineProcess:
    """Start ``python -m exporter.engine`` and return once it is healthy.

    ``quiet`` keeps the child's lines out of ``log`` (they stay in the error message's tail).
    """
    port = port or free_port(host)
    cmd = [sys.executable, "-m", "exporter.engine", "--model", model, "--host", host,
           "--port", str(port), "--max-batch", str(max_batch), "--max-queue", str(max_queue),
           "--device", device]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    ep = EngineProcess(proc, f"http://{host}:{port}")
    threading.Thread(target=_pump, args=(proc, ep._tail, log, quiet), daemon=True).start()
    url = ep.url + "/health"
    try:
        while True:
            if proc.poll() is not None:
                time.sleep(0.2)  # let the pump catch the last lines
                tail = "\n".join(ep._tail)
                raise EngineStartError(f"the engine exited with status {proc.returncode} "
                                       f"during start-up:\n{tail}")
            if time.monotonic() - t0 > timeout:
                raise EngineStartError(f"the engine did not answer {url} within {timeout:.0f} s")
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    break
            time.sleep(0.25)
    except BaseException:
        ep.stop()
        raise
    ep.start_seconds = time.monotonic() - t0
    if not quiet:
        print(f"llm-exporter: embedded engine ready at {ep.url} (pid {ep.pid}) after "
              f"{ep.start_seconds:.1f} s", file=log, flush=True)
    return ep


def _pump(proc: subprocess.Popen[bytes], tail: deque[str], log: TextIO, quiet: bool) -> None:
    """Relay the child's stderr line by line (progress bars' \\r updates included)."""
    assert proc.stderr is not None
    buf = b""
    while True:
        chunk = proc.stderr.read1(4096) if hasattr(proc.stderr, "read1") else b""
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.replace(b"\r", b"\n").split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            tail.append(line)
            if not quiet:
                with contextlib.suppress(Exception):
                    print(line, file=log, flush=True)
