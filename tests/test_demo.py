"""The demo end to end with the tiny model: engine + sidecar subprocesses, load, table, cleanup."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

from exporter import demo


def test_demo_runs_and_cleans_up(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = demo.cli_main(["--model", str(tiny_model_dir), "--duration", "4", "--port", "0",
                        "--metrics-port", "0", "--concurrency", "4", "--max-concurrency", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    for label in ("TTFT (client)", "TPOT (client)", "ITL (client)", "e2e (client)",
                  "queue (engine)", "prefill (engine)", "decode (engine)", "tokens/s",
                  "peak memory", "/metrics"):
        assert label in out
