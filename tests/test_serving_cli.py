"""`tiersim serve` and `tiersim capacity --qps`: the documents, the files, and one-line refusals."""

from __future__ import annotations

import json
import re

import pytest

from cli_run import assert_refused, invoke

from tiersim import fileformat
from tiersim.cli import cmd_serve
from tiersim.serving import memory
from tiersim.simulator import parallel

QUICK = ["--model", "r1-distill-qwen-1.5b", "--requests", "40", "--lengths", "200", "--prompt-lengths", "100"]


def _json(args):
    code, out, err = invoke(args)
    assert code == 0, err
    return json.loads(out)


def test_the_cli_vocabulary_is_the_simulators():
    assert cmd_serve.ON_FULL == memory.ON_FULL and cmd_serve.TP_SIZES == parallel.TP_SIZES
    assert cmd_serve.ORACLE == memory.ORACLE and cmd_serve.SPILL_CAP == memory.SPILL_CAP


def test_serve_runs_every_policy_and_writes_the_per_request_file(tmp_path):
    out, saved = tmp_path / "serve.parquet", tmp_path / "requests.jsonl"
    doc = _json(["serve", *QUICK, "--qps", "3", "--format", "json", "--out", str(out), "--save-requests", str(saved)])
    assert [r["on_full"] for r in doc["runs"]] == list(memory.ON_FULL)
    assert all(r["requests"] == 40 and r["output_tokens"] > 0 for r in doc["runs"])
    document, table = fileformat.read(out, [fileformat.SERVING], label="x")
    assert document["kind"] == "serving" and table.num_rows == 40 * len(memory.ON_FULL) and "ttft_s" in table.column_names
    assert document["timeline"]["batch"]
    replay = _json(["serve", "--model", "r1-distill-qwen-1.5b", "--requests-file", str(saved), "--format", "json"])
    for a, b in zip(doc["runs"], replay["runs"]):  # a request file replays the run it was saved from
        assert a["ttft_ms"] == b["ttft_ms"] and a["tpot_ms"] == b["tpot_ms"]


def test_capacity_qps_finds_a_rate_and_says_it_first(tmp_path):
    out = tmp_path / "cap.json"
    code, text, err = invoke(["capacity", "--qps", "1..256", *QUICK, "--requests", "300", "--max-batch", "8",
                              "--on-full", "preempt-recompute", "--out", str(out)])
    assert code == 0, err
    first = text.splitlines()[0]
    doc, _ = fileformat.read(out, [fileformat.SERVING_CAPACITY], label="x")
    rate = doc["policies"]["preempt-recompute"]["max_qps"]
    assert first == doc["recommendation"] and "requests/s within p99 TTFT 2000 ms" in first
    points = doc["policies"]["preempt-recompute"]["points"]
    ok = [p["qps"] for p in points if p["within_slo"]]
    over = [p["qps"] for p in points if not p["within_slo"]]
    assert doc["policies"]["preempt-recompute"]["bounded"] and over and 1 < rate < 256
    assert rate == max(ok) and min(over) / rate <= 1.06  # bracketed within the tolerance


@pytest.mark.parametrize("args, words", [
    (["serve", "--qps", "0"], "--qps"),
    (["serve", "--qps", "-1"], "--qps"),
    (["serve", "--tp", "4", "--model", "r1-distill-qwen-1.5b"], "must divide"),
    (["serve", "--tp", "3"], "--tp"),
    (["serve", "--on-full", "evict"], "--on-full"),
    (["serve", "--strategy", "teleport"], "--strategy"),
    (["serve", "--lengths", "-5"], "--lengths"),
    (["serve", "--prompt-lengths", "0"], "--prompt-lengths"),
    (["capacity", "--qps", "5..1"], "--qps"),
    (["capacity", "--qps", "x"], "--qps"),
    (["capacity", "--on-full", "spill"], "--on-full applies to capacity --qps"),
    (["capacity", "--qps", "1..2", "--batch", "8"], "--batch is the batch planner's"),
    (["capacity", "--qps", "1..2", "--steps", "9"], "--steps is the batch planner's"),
    (["capacity", "--qps", "1..2", "--ray"], "--ray is the batch planner's"),
    (["capacity", "--qps", "1..2", "--prefetch", "cover99"], "--prefetch is the batch planner's"),
    (["serve", "--model", "qwq-32b", "--gpu", "h100-pcie", "--tp", "2"], "--tp 2"),
])
def test_bad_serving_options_are_one_line_exit_2(args, words):
    _, err = assert_refused(args)
    assert words in err, err


@pytest.mark.parametrize("text, words", [
    ("", "no requests"),
    ("arrival_s,prompt_tokens,output_tokens\n0,0,3\n", "prompt_tokens"),
    ("arrival_s,prompt_tokens,output_tokens\n0,5,-3\n", "output_tokens"),
    ("arrival_s,prompt_tokens,output_tokens\n2,5,3\n1,5,3\n", "sorted"),
    ("arrival_s,prompt_tokens,output_tokens\nnan,5,3\n", "finite"),
])
def test_bad_workload_files_are_one_line_exit_2(tmp_path, text, words):
    path = tmp_path / "w.csv"
    path.write_text(text)
    _, err = assert_refused(["serve", "--requests-file", str(path)])
    assert words in err, err


def test_a_model_that_needs_tp_plans_on_tp():
    """QwQ-32B at AIME lengths: one 80 GB GPU holds the weights and ~10 GB of KV; on TP 2 it serves."""
    doc = _json(["serve", "--model", "qwq-32b", "--tp", "2", "--lengths", "aime", "--requests", "20", "--qps", "0.2",
                 "--on-full", "preempt-recompute", "--format", "json"])
    run = doc["runs"][0]
    assert run["tp"] == 2 and run["kv_budget_gb_per_gpu"] > 40 and run["requests"] == 20


def test_capacity_qps_keeps_a_request_files_lengths(tmp_path):
    from tiersim.serving import workload

    path = workload.write_requests(tmp_path / "w.csv", workload.check([0.0, 5.0, 9.0], [50, 60, 70], [20, 30, 40], "x"))
    doc = _json(["capacity", "--qps", "1..8", "--model", "r1-distill-qwen-1.5b", "--requests-file", str(path),
                 "--on-full", "queue", "--format", "json"])
    assert "3 requests" in doc["workload"] and "outputs mean 30" in doc["workload"]
    assert doc["policies"]["queue"]["points"][0]["qps"] == 1.0


def test_a_policy_that_cannot_hold_a_request_is_said_and_the_others_still_plan(tmp_path, monkeypatch):
    """One GPU with ~0.25 GB of KV and a 12K-token request: only spill (the DDR tier) can ever run it."""
    from tiersim.serving import workload
    from tiersim.simulator import presets

    gpu, model = presets.get_gpu("h100-sxm"), presets.get_model("r1-distill-qwen-1.5b")
    tight = presets.with_overrides(gpu, hbm_bytes=model.weight_bytes + gpu.reserved_bytes + 0.75e9)
    monkeypatch.setitem(presets.GPUS, "tight-test", tight)
    path = workload.write_requests(tmp_path / "w.csv", workload.check([0.0, 1.0, 2.0], [100, 100, 100],
                                                                      [200, 12_000, 300], "x"))
    args = ["--model", model.name, "--requests-file", str(path), "--gpu", "tight-test"]
    code, out, err = invoke(["serve", *args])
    assert code == 0, err
    said = " ".join(out.split())
    assert "--on-full preempt-recompute, preempt-swap cannot serve this workload" in said
    assert "--on-full queue cannot serve this workload: request 1 (100 prompt + 200 output tokens, reserving " \
           "max_tokens 16,384)" in said  # its own reason: the reservation
    doc = _json(["capacity", "--qps", "0.1..10", *args, "--format", "json"])
    assert doc["recommendation"].endswith("with --on-full spill (preempt-recompute, preempt-swap, queue cannot "
                                          "hold the longest request).")
    assert doc["policies"]["spill"]["max_qps"] > 0 and "unservable" in doc["policies"]["queue"]
    code, out, err = invoke(["serve", *args, "--on-full", "queue"])
    assert code == 2 and "use a larger --tp or --on-full spill" in err


def test_json_output_is_strict_json_for_a_single_request():
    code, out, err = invoke(["serve", "--model", "r1-distill-qwen-1.5b", "--requests", "1", "--lengths", "50",
                             "--format", "json"])
    assert code == 0, err

    def refuse(constant):
        raise AssertionError(f"{constant} in the JSON document")

    doc = json.loads(out, parse_constant=refuse)
    assert doc["runs"][0]["offered_qps"] is None and doc["runs"][0]["requests"] == 1


def test_the_tables_say_n_a_where_no_tpot_is_defined(tmp_path):
    """Requests of one output token have no inter-token gap: the TPOT percentiles are undefined, and the table
    says n/a where it printed nan."""
    requests = tmp_path / "one-token.jsonl"
    requests.write_text("".join(json.dumps({"arrival_s": t, "prompt_tokens": 64, "output_tokens": 1}) + "\n"
                                for t in (0.0, 0.1)))
    code, out, err = invoke(["serve", "--requests-file", str(requests), "--on-full", "queue", "--wide"])
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.split()[:1] == ["queue"] and "meets" not in line)
    assert not re.search(r"\bnan\b", out, re.IGNORECASE) and row.count("n/a") == 2, out


def test_serve_and_capacity_qps_take_and_name_the_engine_overhead():
    from tiersim.simulator import engines

    args = [*QUICK, "--requests", "3", "--qps", "0.001", "--on-full", "queue"]
    runs = {e: _json(["serve", *args, "--format", "json", "--engine-overhead", e])["runs"][0]
            for e in ("none", "vllm")}
    gap = runs["vllm"]["tpot_ms"]["p50"] - runs["none"]["tpot_ms"]["p50"]
    assert gap == pytest.approx(engines.get("vllm").host_s(1) * 1e3, rel=1e-6)
    assert runs["vllm"]["engine_overhead"] == engines.get("vllm").describe()
    code, text, err = invoke(["serve", *args, "--engine-overhead", "vllm"])
    assert code == 0, err
    assert "engine overhead vllm" in text
    code, text, err = invoke(["capacity", "--qps", "1..4", *QUICK, "--requests", "20", "--on-full", "queue",
                              "--engine-overhead", "vllm"])
    assert code == 0, err
    assert "engine overhead vllm" in text
    code, _, err = invoke(["serve", *args, "--engine-overhead", "nope"])
    assert code == 2 and "--engine-overhead" in err and len(err.strip().splitlines()) == 1


def test_serve_out_keeps_every_policys_rows_and_a_version_1_file_still_reads(tmp_path):
    import pyarrow.parquet as pq

    from tiersim.report.build import build_report

    out = tmp_path / "serve.parquet"
    doc = _json(["serve", *QUICK, "--qps", "3", "--format", "json", "--on-full", "spill,queue", "--out", str(out)])
    document, table = fileformat.read(out, [fileformat.SERVING], label="x")
    assert document["schema_version"] == fileformat.SERVING.schema_version >= 2
    frame = table.to_pandas()
    assert frame["on_full"].tolist() == ["spill"] * 40 + ["queue"] * 40
    for run in doc["runs"]:  # each policy's rows are its run's: its p50 TTFT from them
        rows = frame[frame["on_full"] == run["on_full"]]
        assert rows["ttft_s"].median() * 1e3 == pytest.approx(run["ttft_ms"]["p50"], rel=1e-12)
    assert [r["on_full"] for r in document["runs"]] == ["spill", "queue"] and document["on_full"] == "spill"
    # A version-1 file (the first policy's rows, no on_full column) is still read, and drawn by the report.
    old = tmp_path / "old.parquet"
    meta = {**json.loads(pq.read_schema(out).metadata[fileformat.META_KEY]), "schema_version": 1}
    meta.pop("runs")
    v1 = table.slice(0, 40).drop_columns(["on_full"])  # the spill rows
    fileformat.write_table(old, v1.to_pandas(), meta)
    document, back = fileformat.read(old, [fileformat.SERVING], label="x")
    assert document["schema_version"] == 1 and back.num_rows == 40
    assert "serving_timeline" in build_report([str(old)])


def test_goodput_never_exceeds_what_the_engine_drained():
    """At an offered rate far past what the engine drains, goodput is the SLO-meeting requests over the makespan."""
    doc = _json(["serve", "--requests", "10", "--lengths", "20", "--qps", "1e9", "--on-full", "queue",
                 "--format", "json"])
    run = doc["runs"][0]
    met = run["slo_attainment"] * run["requests"]
    assert run["goodput_qps"] == pytest.approx(met / run["makespan_s"], rel=1e-12)
    assert run["goodput_qps"] <= run["throughput_qps"]


def test_capacity_qps_has_serves_upper_bound():
    code, _, err = invoke(["capacity", "--qps", "1..1e12", "--requests", "10", "--lengths", "50"])
    assert code != 0 and "1e+09" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [["serve", "--on-full", "queue"], ["capacity", "--qps", "0.5..2", "--on-full", "queue"]])
def test_an_assumed_host_link_is_noted_and_marked_like_simulate(command):
    """A preset whose host link is an assumption says so on stderr and in the document, as simulate does."""
    from tiersim.simulator import presets

    gpu = presets.get_gpu("h100-pcie")
    assert gpu.link_assumed  # the case under test
    code, out, err = invoke([*command, "--gpu", "h100-pcie", "--requests", "5", "--lengths", "20", "--format", "json"])
    assert code == 0, err
    assert "assumption, not a measurement" in " ".join(err.split())
    assert json.loads(out)["gpu_link"] == {"assumed": True, "source": gpu.link_source}


@pytest.mark.parametrize("tpot", ["0", "0.0001"])
def test_serve_and_capacity_qps_refuse_the_same_tpot_slo(tpot):
    """capacity --qps and serve share one --tpot-slo bound: the same one-line refusal, word for word."""
    seen = []
    for command in (["serve"], ["capacity", "--qps", "5"]):
        code, _, err = invoke([*command, "--tpot-slo", tpot, "--requests", "3", "--lengths", "8"])
        lines = [x for x in err.splitlines() if x.strip()]
        assert code == 2 and len(lines) == 1 and "--tpot-slo must be >= 0.001" in lines[0], err
        seen.append(lines[0])
    assert seen[0] == seen[1]


def test_capacity_qps_says_plainly_when_no_rate_met_the_slos():
    doc = _json(["capacity", *QUICK, "--qps", "1..4", "--on-full", "queue", "--ttft-slo", "0.001", "--format", "json"])
    assert doc["policies"]["queue"]["max_qps"] == 0
    first = doc["recommendation"]
    assert first.startswith("No rate met the SLOs") and " meets " not in first and "misses" in first


@pytest.mark.parametrize("extra, words", [
    (["--requests", "10"], "--requests shapes synthetic requests; --requests-file"),
    (["--qps", "5"], "--qps shapes synthetic requests; --requests-file"),
    (["--lengths", "50"], "--lengths shapes"),
    (["--on-full", "queue", "--spill-ddr", "0.3"], "--spill-ddr applies to spilled tokens only"),
    (["--on-full", "queue,preempt-swap", "--strategy", "host-attention"], "--strategy applies to spilled tokens only"),
    (["--on-full", "queue", "--spill-cap", "0.2"], "--spill-cap applies to spilled tokens only"),
])
def test_an_option_that_would_be_ignored_is_refused_in_one_line(tmp_path, extra, words):
    saved = tmp_path / "r.csv"
    assert invoke(["serve", "--requests", "3", "--lengths", "8", "--on-full", "queue", "--save-requests",
                   str(saved)])[0] == 0
    replay = ["--requests-file", str(saved)] if "spilled" not in words else ["--requests", "3", "--lengths", "8"]
    code, _, err = invoke(["serve", *replay, *extra])
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and words in lines[0], err


def test_spill_options_with_spill_and_a_file_alone_still_run(tmp_path):
    saved = tmp_path / "r.csv"
    assert invoke(["serve", "--requests", "3", "--lengths", "8", "--on-full", "queue", "--save-requests",
                   str(saved)])[0] == 0
    for args in (["--requests-file", str(saved)], ["--requests", "3", "--lengths", "8", "--on-full", "queue,spill",
                                                   "--spill-ddr", "0.3", "--strategy", "host-attention"]):
        code, _, err = invoke(["serve", *args, "--format", "json"])
        assert code == 0, err


def test_the_oracle_runs_only_by_name_and_says_so():
    """all = the four policies a real engine has; queue-oracle (queue reserving the true outputs) only when named,
    beside them, marked in the document; --max-tokens cuts every policy's outputs, with a note."""
    assert "queue-oracle" not in [r["on_full"] for r in _json(["serve", *QUICK, "--format", "json"])["runs"]]
    doc = _json(["serve", *QUICK, "--on-full", "all,queue-oracle", "--format", "json"])
    assert [r["on_full"] for r in doc["runs"]] == [*memory.ON_FULL, memory.ORACLE]
    assert [r["oracle"] for r in doc["runs"]] == [False] * 4 + [True]
    (max_tokens,) = {r["max_tokens"] for r in doc["runs"]}  # the power of two covering the ~200-token outputs
    assert max_tokens in (256, 512, 1024)
    code, out, err = invoke(["serve", *QUICK, "--max-tokens", "150", "--on-full", "queue", "--format", "json"])
    run = json.loads(out)["runs"][0]
    assert code == 0 and run["max_tokens"] == 150 and "--max-tokens 150 cuts" in err
    assert run["output_tokens"] <= 150 * 40


def test_drawn_requests_past_the_context_are_cut_there_and_the_run_says_how_many(tmp_path):
    """The means are checked against the context, but a log-normal tail draws requests past it (qwq-32b's 40,960
    tokens, aime outputs at --sigma 1: one in twenty): no engine runs one whole, so each is cut at the context as
    an engine stops a request there, with a note naming how many and the longest drawn, and the workload line (in
    the document too) says so. The default max_tokens stays within the context (40,788 rounded up to 65,536
    made queue reserve room no request can use). A request file is the user's own: refused, as before."""
    import numpy as np

    from tiersim.serving import workload
    from tiersim.shapes import MODEL_SHAPES

    window = MODEL_SHAPES["qwq-32b"].max_context
    args = ["serve", "--model", "qwq-32b", "--tp", "2", "--lengths", "aime", "--sigma", "1", "--requests", "40",
            "--on-full", "queue", "--seed", "3"]
    drawn = workload.synthetic(40, 1.0, 256, 13800, 1.0, seed=3)  # the same draw: --qps 1, the default prompts
    total = drawn.prompt + drawn.output
    over = int((total > window).sum())
    assert over >= 1  # the point of the test: the tail does cross the context
    saved = tmp_path / "requests.csv"
    code, out, err = invoke([*args, "--format", "json", "--save-requests", str(saved)])
    assert code == 0, err
    assert (f"note: {over} of 40 drawn requests (prompt + output) run past qwq-32b's 40,960-token context, the "
            f"longest {int(total.max()):,} tokens: each is cut at the context") in " ".join(err.split())
    run = json.loads(out)["runs"][0]
    assert f"{over} cut at the 40,960-token context" in run["workload"] and run["max_tokens"] <= window
    cut = workload.read_requests(saved)
    assert (cut.prompt == drawn.prompt).all() and (cut.prompt + cut.output == np.minimum(total, window)).all()
    _, err = assert_refused(["serve", "--model", "qwq-32b", "--tp", "2", "--requests-file", str(_long_file(tmp_path))])
    assert "request 0 of --requests-file" in err and "past qwq-32b's 40,960-token context" in err


def _long_file(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens\n0,100,50000\n")
    return path
