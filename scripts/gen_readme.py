"""Regenerate the README's metric table from the catalogue (``--check``: fail if stale)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from exporter.catalogue import markdown_table

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(<!-- metrics-table:[^\n]*-->\n).*?(<!-- /metrics-table -->)", re.S)


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + markdown_table() + "\n" + m.group(2), text)


def main(argv: list[str]) -> int:
    text = README.read_text()
    new = render(text)
    if "--check" in argv:
        if new != text:
            print("README metric table is stale: run `make generate`", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
