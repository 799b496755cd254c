"""Report speed and size: build time and HTML size for real simulator outputs, and how long headless
Chromium takes to load and render the page (the wait a reader sees).

Inputs come from the real producers (`tiersim simulate --out`, `tiersim capacity --out`), so the
numbers track what users get. Rewrites the "Report" section of docs/benchmarks.md.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _table import markdown_table, write_section

from tiersim.report import build_report, write_report


def produce(folder: Path, steps: int) -> list[Path]:
    sim, cap = folder / f"sim-{steps}.parquet", folder / f"cap-{steps}.json"
    base = [sys.executable, "-m", "tiersim"]
    subprocess.run(base + ["simulate", "--steps", str(steps), "--out", str(sim), "--format", "json"], check=True,
                   capture_output=True)
    subprocess.run(base + ["capacity", "--steps", "32", "--out", str(cap), "--format", "json"], check=True,
                   capture_output=True)
    return [sim, cap]


def chromium_seconds(page: Path, profile: Path) -> float | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return None
    start = time.perf_counter()
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}", "--dump-dom", page.as_uri()], capture_output=True, timeout=300)
    return time.perf_counter() - start


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for steps in (256, 4096):
            inputs = produce(folder, steps)
            build_report(inputs)  # warm imports and plotly's validators
            start = time.perf_counter()
            out = write_report(inputs, folder / f"report-{steps}.html")
            build = time.perf_counter() - start
            load = chromium_seconds(out, folder / f"profile-{steps}")
            rows.append([f"simulation ({steps} steps) + capacity grid", f"{build:.2f}",
                         f"{out.stat().st_size / 1e6:.2f}", "n/a" if load is None else f"{load:.1f}"])
            print(rows[-1])
    table = markdown_table(["inputs", "build + write (s)", "HTML (MB)", "Chromium load + render (s)"], rows)
    note = ("plotly.js (~4.8 MB) is embedded once, so the page opens offline; the rest is the figures' data. "
            "Chromium time includes browser start-up.")
    write_section("Report", "python benchmarks/bench_report.py", table + "\n\n" + note)
    print(table)


if __name__ == "__main__":
    main()
