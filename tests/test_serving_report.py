"""The report draws serving files: latency against load per policy, and one run's timeline, from the files alone."""

from __future__ import annotations

import json

from cli_run import invoke

from tiersim.report import build_report, load_input
from tiersim.report.serving import latency_vs_load

QUICK = ["--model", "r1-distill-qwen-1.5b", "--requests", "120", "--lengths", "300", "--prompt-lengths", "100"]


def test_latency_vs_load_has_one_curve_per_policy_and_the_slos(tmp_path):
    cap, run = tmp_path / "cap.json", tmp_path / "run.parquet"
    code, _, err = invoke(["capacity", "--qps", "2..200", *QUICK, "--max-batch", "8", "--on-full", "queue,spill",
                           "--out", str(cap), "--format", "json"])
    assert code == 0, err
    code, _, err = invoke(["serve", *QUICK, "--qps", "5", "--on-full", "spill", "--out", str(run), "--format", "json"])
    assert code == 0, err
    loaded = load_input(cap)
    fig = latency_vs_load(loaded.tables["points"], {"ttft_ms": 2000, "tpot_ms": 50})
    names = {t.name for t in fig.data}
    assert names == {"queue", "spill"} and len(fig.data) == 4  # TTFT and TPOT panels
    doc = json.loads(cap.read_text())
    drawn = sorted(x for t in fig.data if t.name == "spill" and t.yaxis == "y" for x in t.x)
    assert drawn == sorted(p["qps"] for p in doc["policies"]["spill"]["points"])
    spill = [p for p in sorted(doc["policies"]["spill"]["points"], key=lambda p: p["qps"])]
    trace = next(t for t in fig.data if t.name == "spill" and t.yaxis == "y")
    assert [sym.endswith("-open") for sym in trace.marker.symbol] == [p["stopped_early"] for p in spill]
    assert any(p["stopped_early"] for p in spill)  # past the knee the search stopped early: drawn open
    page = build_report([cap, run])
    assert "latency-vs-load" in page and "serving-timeline" in page
    assert doc["recommendation"] in page


def test_serve_report_draws_the_timeline(tmp_path):
    """``serve --report`` draws, without a temporary file, what the report draws from ``--out``'s file."""
    import re

    page, run = tmp_path / "serve.html", tmp_path / "run.parquet"
    code, _, err = invoke(["serve", *QUICK, "--qps", "5", "--on-full", "spill", "--report", str(page),
                           "--out", str(run)])
    assert code == 0, err
    text = page.read_text(encoding="utf-8")
    assert "serving-timeline" in text and "this run: tiersim serve" in text
    from_file = build_report([run])

    def plots(html: str) -> list[str]:
        return re.findall(r"Plotly\.newPlot\((.*?)\)\s*};?", html, re.S)

    assert plots(text) and plots(text) == plots(from_file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.parquet", "serve.html"]


def test_the_oracle_curve_says_it_is_one():
    import pandas as pd

    points = pd.DataFrame({"on_full": ["queue", "queue-oracle"], "qps": [1.0, 1.0], "ttft_p99_ms": [5.0, 4.0],
                           "tpot_p99_ms": [9.0, 9.0], "stopped_early": [False, False]})
    names = {t.name for t in latency_vs_load(points).data}
    assert names == {"queue", "queue-oracle (oracle: true output lengths)"}
