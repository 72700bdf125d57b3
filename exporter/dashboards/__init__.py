"""Grafana dashboards generated from the metric catalogue: ``llm-exporter dashboards``.

``generate`` writes one JSON file per dashboard (committed under ``dashboards/``; ``--check``
fails when they are stale), ``push`` uploads them to a Grafana. Building needs the
``dashboards`` extra (grafana-foundation-sdk, Grafana 11 flavour), pushing the ``grafana``
extra (grafana-client).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# file stem -> module building it (imported on use: the SDK is an optional extra)
BOARDS = ("overview", "phases", "capacity", "gpu")


def build_all() -> dict[str, dict[str, Any]]:
    """{file stem: dashboard JSON data}, in a fixed order."""
    import importlib

    out = {}
    for stem in BOARDS:
        module = importlib.import_module(f"exporter.dashboards.{stem}")
        build: Callable[[], dict[str, Any]] = module.build
        out[stem] = build()
    return out


def render(dashboard: dict[str, Any]) -> str:
    """The committed form: sorted keys, two-space indent, final newline."""
    return json.dumps(dashboard, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def files() -> dict[str, str]:
    return {f"{stem}.json": render(d) for stem, d in build_all().items()}


def stale(out: Path) -> list[str]:
    """Files under ``out`` that differ from what generation gives (or are missing)."""
    bad = []
    for name, text in files().items():
        path = out / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            bad.append(str(path))
    return bad


def write(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files().items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-exporter dashboards", description=__doc__)
    sub = p.add_subparsers(dest="action", required=True)
    g = sub.add_parser("generate", help="Write the dashboards' JSON files.")
    g.add_argument("--out", default="dashboards", help="Folder (default: dashboards).")
    g.add_argument("--check", action="store_true",
                   help="Write nothing; exit 1 when the files are stale.")
    u = sub.add_parser("push", help="Upload the dashboards to Grafana (idempotent).")
    u.add_argument("--grafana-url", default=os.environ.get("LLM_EXPORTER_GRAFANA_URL"),
                   required="LLM_EXPORTER_GRAFANA_URL" not in os.environ,
                   help="Grafana base URL (env LLM_EXPORTER_GRAFANA_URL).")
    u.add_argument("--token", default=os.environ.get("LLM_EXPORTER_GRAFANA_TOKEN"),
                   required="LLM_EXPORTER_GRAFANA_TOKEN" not in os.environ,
                   help="Service-account token (env LLM_EXPORTER_GRAFANA_TOKEN, which keeps "
                        "it out of the process list).")
    u.add_argument("--folder", default="LLM exporter", help="Folder title (created if absent).")
    return p


def cli_main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    try:
        if args.action == "generate":
            out = Path(args.out)
            if args.check:
                bad = stale(out)
                for name in bad:
                    print(f"stale: {name} (run: llm-exporter dashboards generate --out {out})",
                          file=sys.stderr)
                return 1 if bad else 0
            for written in write(out):
                print(written)
            return 0
        from exporter.dashboards.push import PushError, client_api, push

        try:
            uids = push(client_api(args.grafana_url, args.token), build_all().values(),
                        args.folder)
        except PushError as e:
            print(f"llm-exporter dashboards: {e}", file=sys.stderr)
            return 2
        for uid in uids:
            print(f"pushed {uid} to {args.grafana_url} (folder {args.folder!r})")
        return 0
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("grafana_foundation_sdk"):
            print("llm-exporter dashboards: needs grafana-foundation-sdk: pip install "
                  "'llm-exporter[dashboards]'", file=sys.stderr)
            return 2
        raise
