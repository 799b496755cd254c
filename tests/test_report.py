"""tiersim.report: loaders refuse what they cannot draw, figures carry the inputs' numbers, the page
is self-contained, and headless Chromium renders every plot without a JavaScript error."""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import report_fixtures as fx
from tiersim.errors import TiersimError
from tiersim.report import FIGURES_BY_KIND, build_report, load_input, write_report
from tiersim.report import figures

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    return fx.write_all(tmp_path_factory.mktemp("report-inputs"))


@pytest.fixture(scope="module")
def page(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    write_report([inputs[k] for k in ("simulation", "capacity", "quality-grid", "calibration")], out)
    return out


def _figure_ids(text: str) -> list[str]:
    return re.findall(r"<div class='figure' data-figure='([a-z_]+)'>", text)


# --- loaders -------------------------------------------------------------------------------------

def test_each_kind_loads_from_its_file_into_tidy_frames(inputs):
    sim = load_input(inputs["simulation"])
    assert sim.kind == "simulation" and len(sim.tables["timeline"]) == 256
    cap = load_input(inputs["capacity"])
    doc = json.loads(inputs["capacity"].read_text())
    assert cap.kind == "capacity" and len(cap.tables["rows"]) == len(doc["rows"])
    assert len(cap.tables["batch_sweep"]) == len(doc["batch_sweep"])
    quality_json, quality_parquet = load_input(inputs["quality-grid"]), load_input(inputs["quality-grid-parquet"])
    assert quality_json.kind == quality_parquet.kind == "quality-grid"
    pd.testing.assert_series_equal(quality_json.tables["rows"]["exact_match"], quality_parquet.tables["rows"]["exact_match"])
    cal = load_input(inputs["calibration"])
    assert cal.kind == "calibration" and not cal.tables["points"].empty and not cal.tables["sweep"].empty
    assert cal.provenance()["gpu"] == "NVIDIA H100 80GB HBM3"


def test_kind_comes_from_the_content_not_the_file_name(inputs, tmp_path):
    renamed = tmp_path / "results.dat"
    renamed.write_bytes(inputs["simulation"].read_bytes())
    assert load_input(renamed).kind == "simulation"


def test_producer_dicts_load_like_files():
    frame = fx.timeline()
    meta = fx.simulation_meta(frame=frame)
    # The simulate command passes its metadata with the timeline as a dict of numpy columns.
    sim = load_input(meta | {"timeline": {c: frame[c].to_numpy() for c in frame.columns}})
    np.testing.assert_allclose(sim.tables["timeline"]["kv_hbm_gb"], frame["kv_hbm_gb"])
    assert load_input(fx.capacity_document()).kind == "capacity"


def _write(tmp_path: Path, name: str, obj) -> Path:
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d | {"kind": "bogus"}, "serving-capacity file (kind 'bogus')"),
    (lambda d: {k: v for k, v in d.items() if k != "kind"}, "serving-capacity file (kind None)"),
    (lambda d: d | {"schema_version": 2}, "schema_version 2 is newer"),
    (lambda d: d | {"schema_version": "1"}, "schema_version must be an integer"),
    (lambda d: d | {"rows": [{k: v for k, v in r.items() if k != "overhead_pct"} for r in d["rows"]]},
     "lacks column 'overhead_pct'"),
    (lambda d: d | {"rows": []}, "capacity rows has no rows"),
])
def test_bad_documents_are_refused_with_one_named_reason(tmp_path, mutate, message):
    path = _write(tmp_path, "bad.json", mutate(fx.capacity_document()))
    with pytest.raises(TiersimError, match=re.escape(message)) as err:
        load_input(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_a_trace_is_refused_with_a_hint_to_simulate_it(tmp_path):
    from tiersim.traces.format import default_trace_path

    with pytest.raises(TiersimError, match=r"not a tiersim simulation, .* file \(kind 'trace'\); simulate it first: tiersim simulate"):
        load_input(default_trace_path())


@pytest.mark.parametrize("content, message", [
    ("not json at all", "neither Parquet nor valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (b"PAR1 truncated", "not a readable Parquet file"),
])
def test_foreign_files_are_refused(tmp_path, content, message):
    path = tmp_path / "x.bin"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(TiersimError, match=message):
        load_input(path)


def test_parquet_without_tiersim_metadata_is_refused(tmp_path):
    path = tmp_path / "plain.parquet"
    fx.timeline().to_parquet(path)
    with pytest.raises(TiersimError, match="without tiersim metadata"):
        load_input(path)


def test_missing_input_and_wrong_output_suffix(tmp_path, inputs):
    with pytest.raises(TiersimError, match="not found"):
        load_input(tmp_path / "nope.json")
    with pytest.raises(TiersimError, match=r"must end in \.html"):
        write_report([inputs["capacity"]], tmp_path / "report.json")
    with pytest.raises(TiersimError, match="no inputs"):
        build_report([])


# --- figures -------------------------------------------------------------------------------------

def test_hbm_occupancy_stacks_the_tiers_up_to_capacity():
    frame = fx.timeline(batch=64, hbm=0.5)
    fig = figures.hbm_occupancy(frame)
    stacked = [t for t in fig.data if t.stackgroup == "hbm"]
    assert [t.name for t in stacked] == ["weights", "activations + reserve", "KV in HBM tier", "DDR staging buffers",
                                         "free"]
    total = np.sum([np.asarray(t.y, dtype=float) for t in stacked], axis=0)
    np.testing.assert_allclose(total, frame["hbm_capacity_gb"])  # the config fits: the stack fills the GPU
    capacity = next(t for t in fig.data if t.name == "GPU HBM capacity")
    np.testing.assert_allclose(np.asarray(capacity.y, dtype=float), frame["hbm_capacity_gb"])
    assert fig.layout.yaxis.title.text == "HBM (GB)" and fig.layout.xaxis.title.text == "decode step"
    assert not [a for a in fig.layout.annotations if "exceeds" in (a.text or "")]


def test_hbm_occupancy_flags_the_first_step_over_capacity():
    frame = fx.timeline(batch=512, hbm=1.0, capacity_gb=80.0)  # ~60 GB of KV on top of ~18 GB: crosses 80 GB
    used = frame["weights_gb"] + frame["activations_gb"] + frame["kv_hbm_gb"] + frame["staging_gb"]
    first = int(frame["step"][used > frame["hbm_capacity_gb"]].iloc[0])
    fig = figures.hbm_occupancy(frame)
    free = next(t for t in fig.data if t.name == "free")
    assert min(np.asarray(free.y, dtype=float)) >= 0.0  # clipped, not a negative band
    assert any(a.text == f"exceeds HBM from step {first}" for a in fig.layout.annotations)


def test_pcie_traffic_carries_the_per_step_numbers():
    frame = fx.timeline()
    fig = figures.pcie_traffic(frame)
    by_name = {t.name: t for t in fig.data}
    np.testing.assert_allclose(np.asarray(by_name["H2D (DDR tier prefetch)"].y, dtype=float), frame["h2d_gb"])
    np.testing.assert_allclose(np.asarray(by_name["stall (waiting for PCIe)"].y, dtype=float), frame["stall_ms"])
    assert "GB" in fig.layout.yaxis.title.text and "ms" in fig.layout.yaxis2.title.text


def test_throughput_frontier_has_a_curve_per_strategy_the_slo_and_the_full_cache():
    doc = fx.capacity_document()
    points = pd.DataFrame(doc["points"])
    fig = figures.throughput_frontier(points, 50.0, doc["planner"]["full_cache"])
    names = [t.name for t in fig.data]
    assert "prefetch" in names and "int8 transfer * (approximate)" in names  # the registry's label
    assert any(n.startswith("full cache, batch 64") for n in names)
    fitting = points[points["fits"]]
    for trace in fig.data:
        if trace.name == "prefetch":  # one point per batch: the fastest split that fits there
            expected = fitting[fitting["strategy"] == "prefetch"].groupby("batch")["tpot_ms"].min()
            np.testing.assert_allclose(np.asarray(trace.x, dtype=float), expected.to_numpy())
            assert trace.marker.coloraxis == "coloraxis"  # HBM freed as colour
    assert fig.layout.xaxis.type == "log" and any(s.x0 == 50.0 for s in fig.layout.shapes)


def test_a_range_capacity_run_reports_its_frontier(tmp_path):
    from tiersim.cli.main import app

    out = tmp_path / "range.html"
    result = CliRunner().invoke(app, ["capacity", "--batch", "16..64", "--tpot-slo", "40", "--steps", "8",
                                      "--report", str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert _figure_ids(out.read_text(encoding="utf-8")) == ["throughput_frontier", "capacity_frontier"]


def test_capacity_frontier_marks_the_budget_and_the_best_config():
    doc = fx.capacity_document(max_overhead=10.0)
    rows = pd.DataFrame(doc["rows"])
    fig = figures.capacity_frontier(rows, 10.0, doc["best"])
    plotted = sum(len(t.x) for t in fig.data if t.name and t.name.startswith("evict"))
    assert plotted == len(rows)  # every config is on the chart
    (line,) = [s for s in fig.layout.shapes if s.type == "line"]
    assert line.x0 == pytest.approx(1.10)
    star = next(t for t in fig.data if t.name == "best within budget")
    assert star.y[0] == pytest.approx(doc["best"]["hbm_saved_gb"])
    assert star.x[0] == pytest.approx(1 + doc["best"]["overhead_pct"] / 100)
    # log axis on step-time ratio, labelled in overhead percent: the budget and 0% are readable
    assert fig.layout.xaxis.type == "log" and "0%" in fig.layout.xaxis.ticktext


def test_overhead_ticks_never_crowd():
    fig = figures.capacity_frontier(pd.DataFrame(fx.capacity_document()["rows"]), 10.0)
    logs = sorted(math.log10(v) for v in fig.layout.xaxis.tickvals)
    span = fig.layout.xaxis.range[1] - fig.layout.xaxis.range[0]
    assert min(np.diff(logs)) >= span / 12 - 1e-9


def test_savings_vs_batch_has_one_line_per_offloading_config():
    sweep = pd.DataFrame(fx.capacity_document()["batch_sweep"])
    fig = figures.savings_vs_batch(sweep, 10.0)
    offloading = sweep[sweep["hbm"] < 1.0]
    top = [t for t in fig.data if t.yaxis == "y"]
    assert len(top) == offloading.groupby(["hbm", "evict"]).ngroups
    for trace in top:
        hbm = float(trace.name.split()[1])
        expected = offloading[offloading["hbm"] == hbm].sort_values("batch")
        np.testing.assert_allclose(np.asarray(trace.y, dtype=float), expected["hbm_saved_gb"])
        ok = expected["fits"] & (expected["overhead_pct"] <= 10.0)
        assert list(trace.marker.symbol) == ["circle" if o else "circle-open" for o in ok]


def test_quality_heatmap_pivots_eviction_by_hbm_and_puts_baselines_beside_it():
    doc = fx.quality_document()
    rows = pd.DataFrame(doc["rows"])
    fig = figures.quality_heatmap(rows)
    heat = next(t for t in fig.data if t.type == "heatmap")
    for r in doc["rows"]:
        if r["method"] == "hierarchy":
            i, j = list(heat.y).index(f"HBM {r['hbm']:.2f}"), list(heat.x).index(f"{r['evict']:g}")
            assert heat.z[i][j] == pytest.approx(r["exact_match"])
    bars = {t.name: t for t in fig.data if t.type == "bar"}
    assert {"H2O", "R-KV", "SnapKV", "StreamingLLM"} <= set(bars)
    rkv = rows[rows["method"] == "rkv"].sort_values("hbm", ascending=False)
    np.testing.assert_allclose(np.asarray(bars["R-KV"].y, dtype=float), rkv["exact_match"])


def test_validation_figures_draw_every_paired_point_and_the_sweep():
    doc = fx.calibration_document()
    points = pd.DataFrame(doc["points"])
    points.loc[0, "simulated_step_ms"] = None  # a point the simulator did not cover is left out, not drawn at 0
    fig = figures.measured_vs_simulated(points)
    drawn = sum(len(t.x) for t in fig.data if t.name.startswith("HBM share"))
    assert drawn == len(points) - 1
    assert f"{len(points) - 1} points" in fig.layout.title.subtitle.text
    sweep = figures.link_sweep(pd.DataFrame(doc["link"]["sweep"]), doc["link"])
    assert {t.name for t in sweep.data} == {"host → device (H2D)", "device → host (D2H)",
                                             "both directions at once (total)"}
    assert sweep.layout.xaxis.type == "log" and "GB/s" in sweep.layout.yaxis.title.text


def test_a_compressed_check_point_is_its_own_series_not_a_lossless_one():
    """The graph executor's --compressed points share an HBM ratio with lossless ones: the figure names them apart
    (series and hover), so a quantized measurement is never read as that share's lossless step."""
    doc = fx.calibration_document()
    points = pd.DataFrame(doc["points"])
    row = int(points.index[points["hbm"] == 0.5][0])
    points["compressed"] = 0.0
    points.loc[row, "compressed"] = 0.25
    fig = figures.measured_vs_simulated(points)
    names = [t.name for t in fig.data if t.name.startswith("HBM share")]
    assert sum(len(t.x) for t in fig.data if t.name.startswith("HBM share")) == len(points)
    comp = next(t for t in fig.data if t.name == "HBM share 0.50 + compressed 0.25")
    assert len(comp.x) == 1 and comp.customdata[0][3] == "0.5 + compressed 0.25"
    lossless = next(t for t in fig.data if t.name == "HBM share 0.50")
    assert len(lossless.x) == int((points["hbm"] == 0.5).sum()) - 1
    assert len(names) == len(set(names))
    plain = figures.measured_vs_simulated(pd.DataFrame(doc["points"]))  # files without the field: as before
    assert not any("compressed" in t.name for t in plain.data)


def test_config_labels_never_show_negative_zero():
    assert figures.config_label({"hbm": 0.9, "ddr": 1 - 0.9 - 0.1, "evict": 0.1}) == "HBM 0.90 / DDR 0.00 / evict 0.10"


# --- the page ------------------------------------------------------------------------------------

def test_page_has_every_figure_plotly_once_and_no_network(page, inputs):
    text = page.read_text(encoding="utf-8")
    expected = [name for kind in ("simulation", "capacity", "quality-grid", "calibration")
                for name in FIGURES_BY_KIND[kind]]
    assert _figure_ids(text) == expected
    assert text.count("Plotly.newPlot(") == len(expected)
    assert len(re.findall(r"plotly\.js v\d", text)) == 1  # the library is embedded exactly once
    assert not re.search(r"<script[^>]*\bsrc\s*=", text, re.I)
    assert not re.search(r"<link[^>]*href\s*=\s*['\"]?https?:", text, re.I)
    meta = json.loads(html.unescape(re.search(r"id='tiersim-report'>(.*?)</script>", text).group(1)))
    assert meta["kind"] == "report" and meta["schema_version"] == 1
    assert len(meta["figures"]) == len(expected)


def test_page_header_names_model_gpu_trace_and_version_from_the_inputs(tmp_path, inputs):
    doc = fx.capacity_document()
    doc.update(model="qwq-32b", gpu="h200", trace="aime-trace.parquet", tiersim_version="9.8.7")
    text = build_report([_write(tmp_path, "c.json", doc)])
    header = text[text.index("<header>"):text.index("</header>")]
    for value in ("qwq-32b", "h200", "aime-trace.parquet", "9.8.7"):
        assert value in header
    assert "<title>tiersim report: qwq-32b on h200</title>" in text


def test_only_the_figures_of_the_given_inputs(tmp_path, inputs):
    doc = fx.capacity_document()
    doc.pop("batch_sweep")
    doc.pop("points")  # a capacity file from before the planner: no throughput frontier
    text = build_report([_write(tmp_path, "c.json", doc), inputs["quality-grid-parquet"]])
    assert _figure_ids(text) == ["capacity_frontier", "quality_heatmap"]


def test_same_inputs_twice_get_distinct_figure_ids(inputs):
    text = build_report([inputs["simulation"], inputs["simulation"]])
    ids = re.findall(r'<div id="([^"]+)" class="plotly-graph-div"', text)
    assert len(ids) == 4 and len(set(ids)) == 4


# --- CLI -----------------------------------------------------------------------------------------

def test_cli_writes_the_report(tmp_path, inputs):
    from tiersim.cli.main import app

    out = tmp_path / "r.html"
    result = CliRunner().invoke(app, ["report", str(inputs["capacity"]), str(inputs["calibration"]), "--out", str(out),
                                      "--title", "H100 plan"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and out.is_file()
    text = out.read_text(encoding="utf-8")
    assert "<title>H100 plan</title>" in text
    assert _figure_ids(text) == ["throughput_frontier", "capacity_frontier", "savings_vs_batch", "measured_vs_simulated",
                                 "link_sweep"]


def test_cli_bad_input_is_one_red_line_and_exit_2(tmp_path):
    from tiersim.traces.format import default_trace_path

    out = tmp_path / "r.html"
    proc = subprocess.run([sys.executable, "-m", "tiersim", "report", str(default_trace_path()), "--out", str(out)],
                          capture_output=True, text=True, env=os.environ | {"COLUMNS": "300"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "kind 'trace'" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()


def test_capacity_report_flag_end_to_end(tmp_path):
    """The planner's own result through `tiersim capacity --report` (the short way)."""
    from tiersim.cli.main import app

    out = tmp_path / "cap.html"
    result = CliRunner().invoke(app, ["capacity", "--steps", "8", "--report", str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert _figure_ids(out.read_text(encoding="utf-8")) == ["throughput_frontier", "capacity_frontier",
                                                             "savings_vs_batch"]


# --- headless Chromium ---------------------------------------------------------------------------

PROBE = """<script>
window.__errors = [];
window.addEventListener('error', function (e) { window.__errors.push(String(e.message || e)); });
window.addEventListener('unhandledrejection', function (e) { window.__errors.push('rejection: ' + e.reason); });
(function () { var orig = console.error; console.error = function () {
  window.__errors.push(Array.prototype.join.call(arguments, ' ')); orig.apply(console, arguments); }; })();
window.addEventListener('load', function () { setTimeout(function () {
  var plots = Array.prototype.map.call(document.querySelectorAll('.js-plotly-plot'), function (p) {
    return {id: p.id, svg: p.querySelectorAll('.main-svg').length, traces: (p.data || []).length,
            points: p.querySelectorAll('.point, .bars path, .hm, .js-line, .js-fill').length,
            xticks: p.querySelectorAll('.xaxislayer-above text').length}; });
  var out = document.createElement('pre'); out.id = 'probe-result';
  out.textContent = JSON.stringify({errors: window.__errors, plots: plots,
                                    cloud: document.querySelectorAll('[data-title^="Share chart"]').length,
                                    divs: document.querySelectorAll('.plotly-graph-div').length});
  document.body.appendChild(out); }, 500); });
</script>"""


def _render(page: Path, tmp_path: Path) -> dict:
    """Load the page in headless Chromium with an error probe injected; return what the probe saw."""
    probed = tmp_path / f"probed-{page.name}"
    probed.write_text(page.read_text(encoding="utf-8").replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    profile = tmp_path / "chromium-profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--window-size=1400,3000", "--virtual-time-budget=15000", "--dump-dom",
           probed.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="probe-result">(.*?)</pre>', proc.stdout, re.S)
    assert match, f"the probe did not report (chromium rc {proc.returncode}): {proc.stderr[-800:]}"
    return json.loads(html.unescape(match.group(1)))


@pytest.mark.skipif(CHROMIUM is None, reason="Debian `chromium` is not installed here (.ci/run installs it)")
def test_chromium_renders_every_plot_without_javascript_errors(page, tmp_path):
    seen = _render(page, tmp_path)
    expected = _figure_ids(page.read_text(encoding="utf-8"))
    assert seen["errors"] == []
    assert seen["cloud"] == 0  # no button that uploads the figure to Plotly Cloud
    assert seen["divs"] == len(expected) and len(seen["plots"]) == len(expected)
    for plot in seen["plots"]:
        assert plot["svg"] >= 1 and plot["traces"] >= 1 and plot["xticks"] >= 2, plot
        assert plot["points"] >= 1, plot  # marks were actually drawn, not just empty axes


@pytest.mark.skipif(CHROMIUM is None, reason="Debian `chromium` is not installed here (.ci/run installs it)")
def test_chromium_probe_catches_a_broken_page(page, tmp_path):
    """The render test can fail: a page whose figure script throws is reported, not passed."""
    text = page.read_text(encoding="utf-8")
    broken = tmp_path / "broken.html"
    broken.write_text(text.replace("Plotly.newPlot(", "Plotly.noSuchFunction(", 1), encoding="utf-8")
    seen = _render(broken, tmp_path)
    assert seen["errors"] and len(seen["plots"]) == len(_figure_ids(text)) - 1


def test_a_validation_section_says_what_measured_its_steps():
    """The HF eager harness (host-bound) and the CUDA-graph executor (GPU-bound), prefetch and hybrid: the section
    names the executor and the strategy, so two calibration files on one page cannot be mistaken for each other."""
    from tiersim.report.calibration import executor_line

    assert executor_line({}).startswith("Executor: hf-eager (HF eager generate over the TieredCache, a host-bound")
    graph = executor_line({"executor": "cuda-graph", "settings": {"strategy": "hybrid", "fetch_share": 0.25,
                                                                   "compressed": 0.25}})
    assert graph == ("Executor: cuda-graph (the decode step replayed as a CUDA graph, GPU-bound); DDR tier read by "
                     "hybrid (fetch share 0.25); compressed check at 0.25 of the context.")
    assert "DDR tier read by prefetch." in executor_line({"executor": "graph-eager", "settings": {"compressed": 0.0}})
