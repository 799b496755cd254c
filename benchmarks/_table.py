"""Shared helper: write one benchmark's markdown section into docs/benchmarks.md (atomically)."""

from __future__ import annotations

import platform
import re
from datetime import datetime, timezone
from pathlib import Path

from tiersim.atomic import write_text

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEach section is rewritten by the script named in it. Numbers are from the machine named there.\n"


def machine() -> str:
    import os

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, command: str, body: str) -> None:
    """Replace (or append) the section ``name`` of docs/benchmarks.md."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    section = f"## {name}\n\n`{command}` — {stamp}, {machine()}\n\n{body.strip()}\n"
    text = DOC.read_text() if DOC.exists() else HEADER
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    write_text(DOC, text)
