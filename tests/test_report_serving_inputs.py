"""A serving file's figures and summary read numbers: a column the timeline draws, or a header figure the
summary prints, that is text, negative or not a number is refused in one line (found in review: a timeline whose
``waiting`` or ``ddr_held_tokens`` were strings, and a header with ``goodput_qps`` NaN or -1, ``spilled_gb`` true,
``hbm_blocks`` -1, were drawn with exit 0)."""

from __future__ import annotations

import copy
import json

import pyarrow.parquet as pq
import pytest
from cli_run import invoke

from tiersim.errors import TiersimError
from tiersim.report import build_report

QUICK = ["--model", "r1-distill-qwen-1.5b", "--requests", "40", "--lengths", "100", "--prompt-lengths", "50"]


@pytest.fixture(scope="module")
def serving_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "run.parquet"
    code, _, err = invoke(["serve", *QUICK, "--qps", "4", "--on-full", "queue", "--out", str(path), "--format",
                           "json"])
    assert code == 0, err
    return path


def _rewrite(src, dst, change):
    table = pq.read_table(src)
    meta = json.loads(table.schema.metadata[b"tiersim"])
    change(meta)
    md = dict(table.schema.metadata)
    md[b"tiersim"] = json.dumps(meta).encode()
    pq.write_table(table.replace_schema_metadata(md), dst)
    return dst


def test_the_good_file_draws(serving_file):
    assert "serving-timeline" in build_report([serving_file])


def _timeline(column, value):
    def change(meta):
        n = len(meta["timeline"][column])
        meta["timeline"][column] = [value] * n
    return change


def _header(key, value):
    def change(meta):
        meta[key] = value
    return change


@pytest.mark.parametrize("name,change", [
    ("waiting", _timeline("waiting", "x")), ("ddr_held_tokens", _timeline("ddr_held_tokens", "x")),
    ("goodput_qps", _header("goodput_qps", float("nan"))), ("goodput_qps", _header("goodput_qps", -1)),
    ("spilled_gb", _header("spilled_gb", True)), ("hbm_blocks", _header("hbm_blocks", -1)),
    ("hbm_blocks", _header("hbm_blocks", [1])), ("preemptions", _header("preemptions", -3)),
])
def test_a_bad_figure_is_one_line_naming_the_field(serving_file, tmp_path, name, change):
    bad = _rewrite(serving_file, tmp_path / "bad.parquet", change)
    with pytest.raises(TiersimError) as info:
        build_report([bad])
    assert name in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.fixture(scope="module")
def capacity_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cap") / "cap.json"
    code, _, err = invoke(["capacity", "--qps", "2..8", *QUICK, "--on-full", "queue", "--out", str(path),
                           "--format", "json"])
    assert code == 0, err
    return path


@pytest.mark.parametrize("name,value", [("qps", -1.0), ("qps", float("nan")), ("ttft_p99_ms", -5.0),
                                        ("tpot_p99_ms", True), ("slo", {"ttft_s": float("nan"), "tpot_s": 0.05}),
                                        ("slo", {"ttft_s": 2.0, "tpot_s": -1})])
def test_a_serving_capacity_point_out_of_range_is_one_line(capacity_file, tmp_path, name, value):
    """Latency against load is drawn on log axes from each point's rate and p99s, with the file's SLOs as lines:
    a negative or NaN rate, a negative latency, `true` as a latency or a NaN/negative SLO is refused (found in
    review: all drawn with exit 0)."""
    doc = json.loads(capacity_file.read_text())
    if name == "slo":
        doc["slo"] = value
    else:
        for point in doc["points"]:
            point[name] = value
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    assert "latency-vs-load" in build_report([capacity_file])
    with pytest.raises(TiersimError) as info:
        build_report([bad])
    assert name in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("column", ["ttft_s", "e2e_s"])
def test_a_boolean_latency_column_is_refused(serving_file, tmp_path, column):
    """true/false is no latency: a foreign file's boolean ttft_s was drawn as 0 and 1 s (meets_slo, a boolean
    column of the same table, still draws)."""
    import pyarrow as pa

    table = pq.read_table(serving_file)
    table = table.set_column(table.schema.get_field_index(column), column, pa.array([True] * len(table)))
    pq.write_table(table, tmp_path / "bool.parquet")
    with pytest.raises(TiersimError, match=f"column '{column}' must hold numbers, got True"):
        build_report([tmp_path / "bool.parquet"])
