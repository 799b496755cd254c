"""Trace capture on the real model, the file format's refusals, atomic writes, and the synthesizer."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tiersim.errors import TraceError
from tiersim.hierarchy import TierConfig
from tiersim.prompts import load_prompts
from tiersim.traces import COLUMNS, SCHEMA_VERSION, read, write
from tiersim.traces.capture import capture, generate_one

SMALL = dict(sink_tokens=4, recent_window=8, retier_every=4)
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def captured(smollm2, tmp_path_factory):
    from tiersim.models import describe_model

    model, tokenizer = smollm2
    cfg = TierConfig(hbm=0.4, ddr=0.6, **SMALL)
    trace = capture(model, tokenizer, load_prompts(None, 2), cfg, NEW_TOKENS, describe_model(model))
    path = tmp_path_factory.mktemp("trace") / "t.parquet"
    write(path, trace.steps, trace.meta)
    return read(path)


@pytest.mark.slow
def test_capture_round_trip_numbers_add_up(captured):
    steps = captured.steps
    layers = captured.meta["model"]["num_layers"]
    assert captured.meta["schema_version"] == SCHEMA_VERSION
    assert len(captured.meta["sequences"]) == 2
    # One row per sequence, step and layer.
    for seq in captured.meta["sequences"]:
        rows = steps[steps.seq_id == seq["seq_id"]]
        assert len(rows) == seq["new_tokens"] * layers
        assert rows.context_len.min() == seq["prompt_len"]
    tiers = steps.n_hbm + steps.n_ddr + steps.n_compressed + steps.n_evicted
    assert (tiers == steps.context_len).all()
    mass = steps.mass_hbm + steps.mass_ddr + steps.mass_compressed
    assert np.allclose(mass, 1.0, atol=1e-4)
    assert (steps.n_ddr > 0).any() and (steps.hbm_to_ddr > 0).any()
    # Tier changes are explained by the recorded moves (lossless config: HBM <-> DDR only).
    for (_, _), rows in steps.sort_values("step").groupby(["seq_id", "layer"]):
        delta = rows.n_ddr.diff().iloc[1:].to_numpy()
        moved = (rows.hbm_to_ddr - rows.ddr_to_hbm).iloc[1:].to_numpy()
        assert (delta == moved).all()
    assert (steps.ddr_cover90 <= steps.ddr_cover99).all() and (steps.ddr_cover99 <= steps.n_ddr).all()


@pytest.mark.slow
def test_moved_bytes_match_tier_changes(smollm2):
    from tiersim.models import describe_model

    model, tokenizer = smollm2
    rows = []
    cfg = TierConfig(hbm=0.3, ddr=0.7, **SMALL)
    _, _, cache = generate_one(model, tokenizer, load_prompts(None, 1)[0].prompt, cfg, 16, rows.append)
    info = describe_model(model)
    bytes_per_token_layer = 2 * info["num_kv_heads"] * info["head_dim"] * 4  # K+V, float32
    demoted = sum(r.hbm_to_ddr for r in rows)
    assert cache.stats()["bytes_d2h"] == demoted * bytes_per_token_layer
    # Every decode step prefetches the layer's DDR tier as the previous step left it (holes included).
    by_key = {(r.step, r.layer): r.n_ddr for r in rows}
    prefetched = sum(by_key[(r.step - 1, r.layer)] for r in rows if r.step > 0)
    assert prefetched > 0
    assert prefetched * bytes_per_token_layer <= cache.stats()["bytes_h2d"] <= 1.3 * prefetched * bytes_per_token_layer
    assert cache.stats()["bytes"]["ddr"] == cache.tier_counts(0)["ddr"] * bytes_per_token_layer * info["num_layers"]


@pytest.mark.slow
def test_lossless_capture_gives_the_same_text_at_every_hbm_ratio(smollm2):
    from tiersim.models import describe_model

    model, tokenizer = smollm2
    prompts = load_prompts(None, 1)
    texts = []
    for hbm in (1.0, 0.5, 0.1):
        cfg = TierConfig(hbm=hbm, ddr=round(1 - hbm, 6), **SMALL)
        trace = capture(model, tokenizer, prompts, cfg, NEW_TOKENS, describe_model(model))
        texts.append(trace.meta["sequences"][0]["text"])
        if hbm < 1:
            assert trace.steps.n_ddr.max() > 0
    assert texts[0] and texts[0] == texts[1] == texts[2]


def _toy_trace(n_steps=40, layers=2):
    rows = []
    for step in range(n_steps):
        for layer in range(layers):
            t = 20 + step
            rows.append({c: 0 for c in COLUMNS} | {
                "step": step, "layer": layer, "context_len": t, "n_hbm": t - t // 2, "n_ddr": t // 2,
                "mass_hbm": 0.8, "mass_ddr": 0.2, "ddr_cover90": 1, "ddr_cover99": 2,
            })
    meta = {"kind": "trace", "schema_version": SCHEMA_VERSION, "model": {"num_layers": layers},
            "policy": TierConfig(hbm=0.5, ddr=0.5).to_dict(),
            "sequences": [{"seq_id": 0, "prompt_len": 20, "new_tokens": n_steps}]}
    return pd.DataFrame(rows), meta


def test_bad_files_are_refused(tmp_path):
    steps, meta = _toy_trace()
    good = write(tmp_path / "good.parquet", steps, meta)
    assert read(good).steps.shape[0] == len(steps)

    with pytest.raises(TraceError, match="not found"):
        read(tmp_path / "missing.parquet")
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(TraceError, match="truncated"):
        read(truncated)
    foreign = tmp_path / "foreign.parquet"
    pd.DataFrame({"a": [1, 2]}).to_parquet(foreign)
    with pytest.raises(TraceError, match="not a tiersim trace"):
        read(foreign)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(TraceError):
        read(text)
    newer = tmp_path / "newer.parquet"
    write(newer, steps, {**meta, "schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(TraceError, match="newer"):
        read(newer)
    other_kind = tmp_path / "sim.parquet"
    write(other_kind, steps, {**meta, "kind": "simulation"})
    with pytest.raises(TraceError, match="simulation"):
        read(other_kind)


def test_bad_trace_on_the_command_line_is_one_line(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    proc = subprocess.run(
        [sys.executable, "-m", "tiersim", "synth", "--trace", str(bad), "--out", str(tmp_path / "o.parquet")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.parquet").exists()


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    steps, meta = _toy_trace()
    target = tmp_path / "out.parquet"

    def broken(table, where, **kwargs):
        with open(where, "wb") as fh:
            fh.write(b"PAR1 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(KeyboardInterrupt):
        write(target, steps, meta)
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_incomplete_tables(tmp_path):
    steps, meta = _toy_trace()
    with pytest.raises(TraceError, match="mass_ddr"):
        write(tmp_path / "x.parquet", steps.drop(columns=["mass_ddr"]), meta)


@pytest.mark.slow
def test_synth_reproduces_the_statistics_it_was_fitted_on(captured):
    from tiersim.traces.synth import fit, synthesize_sequence

    profile = fit(captured)
    rng = np.random.default_rng(0)
    seqs = captured.meta["sequences"]
    synth = pd.concat(
        [synthesize_sequence(profile, s["prompt_len"], s["new_tokens"], captured.num_layers, rng, s["seq_id"])
         for s in seqs for _ in range(20)],
        ignore_index=True,
    )
    real = captured.steps
    # Tier counts follow the policy exactly as the cache does.
    merged = real.merge(synth.drop_duplicates(["seq_id", "step", "layer"]), on=["seq_id", "step", "layer"],
                        suffixes=("", "_s"))
    for col in ("context_len", "n_hbm", "n_ddr", "n_compressed", "n_evicted"):
        assert (merged[col] == merged[col + "_s"]).all(), col
    # Fitted statistics come back within sampling error.
    decode_r, decode_s = real[real.step > 0], synth[synth.step > 0]
    assert decode_s.mass_ddr.mean() == pytest.approx(decode_r.mass_ddr.mean(), rel=0.2, abs=0.01)
    retier = lambda f: f[(f.step % 4 == 0) & (f.step > 0)]  # noqa: E731
    churn_r = np.minimum(retier(real).hbm_to_ddr, retier(real).ddr_to_hbm).sum() / len(retier(real))
    churn_s = np.minimum(retier(synth).hbm_to_ddr, retier(synth).ddr_to_hbm).sum() / len(retier(synth))
    assert churn_s == pytest.approx(churn_r, rel=0.3, abs=0.2)
    has = lambda f: f[f.n_ddr > 0]  # noqa: E731
    c90_r = (has(decode_r).ddr_cover90 / has(decode_r).n_ddr).mean()
    c90_s = (has(decode_s).ddr_cover90 / has(decode_s).n_ddr).mean()
    assert c90_s == pytest.approx(c90_r, rel=0.15, abs=0.03)


@pytest.mark.slow
def test_synth_extrapolates_to_reasoning_lengths(captured):
    from tiersim.traces.synth import fit, synthesize

    trace = synthesize(fit(captured), n=2, mean_length=1500, num_layers=4, seed=1)
    steps = trace.steps
    assert steps.layer.nunique() == 4
    assert steps.context_len.max() > 600
    assert ((steps.n_hbm + steps.n_ddr + steps.n_compressed + steps.n_evicted) == steps.context_len).all()
    assert json.dumps(trace.meta)  # metadata stays JSON


@pytest.mark.slow
def test_full_mode_keeps_replayable_attention_rows(smollm2, tmp_path):
    from tiersim.models import describe_model

    model, tokenizer = smollm2
    cfg = TierConfig(hbm=0.5, ddr=0.5, **SMALL)
    trace = capture(model, tokenizer, load_prompts(None, 1), cfg, 8, describe_model(model), full=True)
    path = write(tmp_path / "full.parquet", trace.steps, trace.meta)
    back = read(path)
    assert back.meta["mode"] == "full"
    for _, row in back.steps.iterrows():
        positions, probs = np.asarray(row.attn_positions), np.asarray(row.attn_probs)
        retained = row.context_len - row.n_evicted
        assert len(positions) == len(probs) == retained
        assert probs.sum() == pytest.approx(1.0, abs=1e-4) and (np.diff(positions) > 0).all()
    decode = back.steps[back.steps.step > 0]
    assert (decode.mass_hbm + decode.mass_ddr).between(0.999, 1.001).all()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model", "/no/such/model"], "not found"),
        (["--hbm", "0.5", "--ddr", "0.6", "--evict", "0"], "sum to 1"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--n", "0"], "--n"),
        (["--prompts", "/no/such.jsonl"], "--prompts: file not found"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_capture_bad_input_is_one_line(tmp_path, args, needle):
    out = tmp_path / "t.parquet"
    proc = subprocess.run([sys.executable, "-m", "tiersim", "capture", *args, "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_user_prompt_files_are_checked(tmp_path):
    from tiersim.errors import TiersimError

    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "What is 2+2?", "answer": "4"}\n\n{"id": "x", "prompt": "Name a color."}\n')
    prompts = load_prompts(good)
    assert [p.id for p in prompts] == ["1", "x"] and prompts[0].answer == "4" and prompts[1].answer is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(TiersimError, match="line 2"):
        load_prompts(bad)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"question": "no prompt field"}\n')
    with pytest.raises(TiersimError, match="'prompt'"):
        load_prompts(missing)


def test_bundled_prompts_are_complete():
    from tiersim.prompts import answers_match, extract_answer

    prompts = load_prompts()
    assert len(prompts) >= 30 and len({p.id for p in prompts}) == len(prompts)
    assert all(p.answer for p in prompts)
    assert extract_answer("so 3 + 4 = 7. Answer: 1,250.50 dollars") == "1250.5"
    assert extract_answer("The result is 12 and then 15") == "15"
    assert extract_answer("Answer: Ben") == "ben" and answers_match("ben", "Ben")
    assert answers_match("22.10", "22.1") and not answers_match("22", "22.1") and not answers_match(None, "1")


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from tiersim.atomic import write_text

    umask = os.umask(0o022)
    try:
        write_text(tmp_path / "x.txt", "hi")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "x.txt").stat().st_mode) == 0o644


@pytest.mark.slow
def test_the_file_columns_are_the_cache_records_fields(captured, tmp_path):
    """The trace's columns come from StepRecord: what the cache records is what the file holds, and
    both docs tables list every field (a field added to the record without its doc row fails here)."""
    import re
    from dataclasses import fields
    from pathlib import Path

    from tiersim.hierarchy.record import StepRecord

    assert list(COLUMNS) == ["seq_id", *StepRecord.columns()]
    assert list(captured.steps.columns) == list(COLUMNS)
    on_disk = pq.read_schema(captured.path)
    assert {name: str(on_disk.field(name).type) for name in COLUMNS} == {
        name: {"int16": "int16", "int32": "int32", "float32": "float"}[dtype] for name, dtype in COLUMNS.items()}
    docs = Path(__file__).resolve().parent.parent / "docs"
    for doc in ("trace-format.md", "file-formats.md"):
        text = (docs / doc).read_text()
        documented = set(re.findall(r"^\| ([a-z0-9_, ]+?)(?: \(.*?\))? \|", text, flags=re.M))
        names = {n.strip() for cell in documented for n in cell.split(",")}
        missing = [f.name for f in fields(StepRecord) if f.name not in names]
        assert not missing, f"{doc} lacks {missing}"
