"""The command line: ``llm-exporter serve|rules|dashboards|engine|demo|calibrate``.

Only this module builds registries, tracer providers and event loops, and only it exits.
Each subcommand other than ``serve`` lives in its own module with a ``cli_main(argv)``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from exporter import __version__
from exporter.settings import SettingsError, add_arguments, from_namespace

# name -> (module with cli_main(argv) -> int, one-line help)
SUBCOMMANDS = {
    "rules": ("exporter.rules", "Generate Prometheus recording rules and SLO burn-rate alerts."),
    "dashboards": ("exporter.dashboards", "Generate (or push to Grafana) the dashboards."),
    "engine": ("exporter.engine.__main__", "Run the embedded engine alone."),
    "demo": ("exporter.demo", "Start engine + sidecar, drive a load, print live figures."),
    "calibrate": ("exporter.calibrate", "Measure what one replica carries within the SLOs; "
                  "write a report and Helm values."),
}

DESCRIPTION = """\
A transparent sidecar in front of an OpenAI-compatible inference server. It relays every
request byte for byte (streams unbuffered), times queue / prefill / decode, TTFT, TPOT and
inter-token latency, counts tokens, traces each request with OpenTelemetry (configured by the
standard OTEL_* variables) and serves Prometheus metrics on a separate port.
"""


def build_serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llm-exporter serve", description=DESCRIPTION)
    add_arguments(p)
    return p


def _serve(argv: Sequence[str]) -> int:
    parser = build_serve_parser()
    ns = parser.parse_args(argv)
    try:
        settings = from_namespace(ns, os.environ)
    except SettingsError as e:
        parser.error(str(e))
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from exporter.app import run

    try:
        return run(settings)
    except SettingsError as e:
        print(f"llm-exporter: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="llm-exporter", description=DESCRIPTION)
    top.add_argument("--version", action="version", version=f"llm-exporter {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("serve", help="Run the sidecar (proxy + metrics server).", add_help=False)
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not args or args[0] in ("-h", "--help", "--version"):
        top.parse_args(args or ["--help"])
        return 0
    command, rest = args[0], args[1:]
    if command == "serve":
        return _serve(rest)
    if command in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[command][0])
        return int(module.cli_main(rest))
    top.error(f"unknown command {command!r}; see llm-exporter --help")
    return 2
