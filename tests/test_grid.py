"""The quality grid: metrics, cells, the runner on tiny and real models, the grid file and the CLI."""

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from tiersim.errors import ConfigError, TiersimError
from tiersim.quality import metrics
from tiersim.quality.grid import HIERARCHY, Sample, build_cells, prepare_samples, run_grid
from tiersim.quality.store import KIND, grid_document, read_grid, write_grid

# -- metrics on plain lists ------------------------------------------------------------------------


def test_exact_match_is_the_share_of_identical_texts():
    assert metrics.exact_match(["a", "b", "c", "d"], ["a", "x", "c", "d"]) == 0.75
    assert metrics.exact_match(["a"], ["a "]) == 0.0
    with pytest.raises(ValueError, match="length"):
        metrics.exact_match(["a"], ["a", "b"])


def test_tokens_to_divergence():
    assert metrics.tokens_to_divergence([5, 6, 7, 8], [5, 6, 9, 8]) == 2
    assert metrics.tokens_to_divergence([5, 6, 7], [9, 6, 7]) == 0
    assert metrics.tokens_to_divergence([5, 6, 7], [5, 6, 7]) == 3  # identical: the full length
    assert metrics.tokens_to_divergence([5, 6, 7], [5, 6]) == 2  # one stopped early (EOS)
    assert metrics.mean_tokens_to_divergence([[1, 2, 3], [1, 2, 3]], [[1, 2, 3], [0, 2, 3]]) == 1.5


def test_answer_agreement_and_accuracy():
    assert metrics.answer_agreement(["55", "10.5", None, "7"], ["55.0", "10.50", None, "8"]) == 0.75
    assert metrics.answer_agreement(["5"], [None]) == 0.0
    assert metrics.accuracy(["55", "3", None], ["55", "4", "9"]) == pytest.approx(1 / 3)
    assert metrics.accuracy(["55", "3"], [None, "3"]) == 1.0  # prompts without ground truth are not graded
    assert metrics.accuracy(["55"], [None]) is None


# -- cells ------------------------------------------------------------------------------------------


def test_build_cells_covers_the_grid_then_the_baselines():
    cells = build_cells([1.0, 0.5, 0.25], [0, 0.03, 0.1], [0.0], ["h2o", "rkv"], recent_window=8)
    hier = [c for c in cells if c.method == HIERARCHY]
    assert [(c.hbm, c.config.evict) for c in hier] == [(h, e) for h in (1.0, 0.5, 0.25) for e in (0, 0.03, 0.1)]
    for cell in hier:
        cfg = cell.config
        assert cfg.hbm + cfg.ddr + cfg.compressed + cfg.evict == pytest.approx(1.0)
        assert cfg.recent_window == 8 and cfg.policy == "hierarchy"
    by_key = {(c.hbm, c.config.evict): c.config for c in hier}
    assert by_key[(0.5, 0.03)].ddr == pytest.approx(0.47)
    # HBM 1.0 with 10% evicted: HBM keeps what is left, nothing goes to DDR.
    assert by_key[(1.0, 0.1)].hbm == pytest.approx(0.9) and by_key[(1.0, 0.1)].ddr == 0
    base = [(c.method, c.hbm, c.config.evict) for c in cells if c.method != HIERARCHY]
    assert base == [("h2o", 0.5, 0.5), ("h2o", 0.25, 0.75), ("rkv", 0.5, 0.5), ("rkv", 0.25, 0.75)]


@pytest.mark.parametrize(
    "args, message",
    [
        (([1.5], [0]), "--hbm"),
        (([0.0], [0]), "--hbm"),
        (([0.5], [1.0]), "--evict"),
        (([0.5], [0.5], [0.5]), "leave nothing"),
        (([0.5], [0], [0], ["snapkvv"]), "unknown baseline 'snapkvv'"),
    ],
)
def test_build_cells_rejects_bad_ratios(args, message):
    with pytest.raises(ConfigError, match=message):
        build_cells(*args)


def test_a_fetch_share_no_strategy_takes_is_refused():
    """grid --fetch-share 0.3 with prefetch alone (the default --strategy) ran every cell at share 1 without a word."""
    with pytest.raises(ConfigError, match="--fetch-share 0.3 applies to strategies 'hybrid' or 'selective' only"):
        build_cells([0.5], [0], strategies=["prefetch"], fetch_share=0.3)
    shares = {c.config.strategy: c.config.fetch_share
              for c in build_cells([0.5], [0], strategies=["prefetch", "hybrid"], fetch_share=0.3)}
    assert shares == {"prefetch": 1.0, "hybrid": 0.3}


# -- the runner ---------------------------------------------------------------------------------------


def tiny_samples(count: int, length: int = 48) -> list[Sample]:
    gen = torch.Generator().manual_seed(3)
    return [Sample(f"s{i}", torch.randint(1, 256, (1, length), generator=gen), None) for i in range(count)]


def test_run_grid_on_a_tiny_model(tiny_qwen2):
    cells = build_cells([1.0, 0.25], [0, 0.2], [0.0], ["streamingllm", "h2o"], recent_window=4, retier_every=4)
    runs = []
    rows, summary = run_grid(tiny_qwen2, tiny_samples(2), cells, 12, on_run=runs.append,
                             generation_kwargs={"pad_token_id": 0})
    assert len(runs) == 2 * (len(cells) + 1)
    assert [r["method"] for r in rows] == ["hierarchy"] * 4 + ["streamingllm", "h2o"]
    lossless = [r for r in rows if r["method"] == HIERARCHY and r["evict"] == 0]
    assert [r["hbm"] for r in lossless] == [1.0, 0.25]
    for row in lossless:
        assert row["exact_match"] == 1.0 and row["answer_agreement"] == 1.0
        assert row["mean_tokens_to_divergence"] == summary["mean_new_tokens"] == 12
    # The hbm 0.25 cells really offloaded (the lossless result is not a cache that did nothing).
    offloaded = [r for r in runs if r.cell is not None and r.cell.method == HIERARCHY and r.cell.hbm == 0.25]
    assert all(r.tier_counts["ddr"] > 0 for r in offloaded)
    assert all(r.tier_counts["evicted"] > 0 for r in offloaded if r.cell.config.evict > 0)
    # Random weights give no answers: agreement compares absent answers, accuracy has no ground truth.
    assert all(r["accuracy"] is None and r["full_cache_accuracy"] is None for r in rows)


def test_evicting_half_the_cache_changes_tiny_model_output(tiny_llama):
    # Not a property of the code alone, but it guards against a grid that silently runs the full cache.
    cells = build_cells([0.25], [0.5], [0.0], ["h2o"], recent_window=4, retier_every=4)
    rows, _ = run_grid(tiny_llama, tiny_samples(2), cells, 16, generation_kwargs={"pad_token_id": 0})
    assert all(r["exact_match"] < 1.0 for r in rows)
    assert all(r["mean_tokens_to_divergence"] < 16 for r in rows)


def test_eviction_zero_equals_full_cache_on_smollm2(smollm2):
    from tiersim.models import generation_kwargs
    from tiersim.prompts import load_prompts

    model, tokenizer = smollm2
    samples = prepare_samples(tokenizer, load_prompts(None, 2))
    cells = build_cells([1.0, 0.5, 0.25], [0.0], [0.0], [], recent_window=8, retier_every=4)
    runs = []
    rows, summary = run_grid(
        model, samples, cells, 24, decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        generation_kwargs=generation_kwargs(tokenizer), on_run=runs.append,
    )
    assert [r["hbm"] for r in rows] == [1.0, 0.5, 0.25]
    for row in rows:
        assert row["exact_match"] == 1.0, row
        assert row["answer_agreement"] == 1.0
        assert row["mean_tokens_to_divergence"] == summary["mean_new_tokens"]
        assert row["accuracy"] == row["full_cache_accuracy"] == summary["accuracy"]
    quarter = [r for r in runs if r.cell is not None and r.cell.hbm == 0.25]
    assert all(r.tier_counts["ddr"] > 0.5 * sum(r.tier_counts.values()) for r in quarter)


# -- the grid file --------------------------------------------------------------------------------------


def sample_document() -> dict:
    rows = [
        {"method": "hierarchy", "hbm": 0.5, "ddr": 0.47, "compressed": 0.0, "evict": 0.03, "hbm_effective": 0.5,
         "exact_match": 0.5, "mean_tokens_to_divergence": 12.5, "answer_agreement": 1.0, "accuracy": None,
         "full_cache_accuracy": None, "mean_new_tokens": 16.0, "tokens_per_s": 20.0},
        {"method": "rkv", "hbm": 0.5, "ddr": 0.0, "compressed": 0.0, "evict": 0.5, "hbm_effective": 0.5,
         "exact_match": 0.0, "mean_tokens_to_divergence": 3.0, "answer_agreement": 0.5, "accuracy": 0.5,
         "full_cache_accuracy": 1.0, "mean_new_tokens": 16.0, "tokens_per_s": 21.0},
    ]
    return grid_document(rows, model="m", n_prompts=2, max_new_tokens=16, full_cache={"accuracy": None})


@pytest.mark.parametrize("suffix", [".json", ".parquet"])
def test_grid_file_round_trip(tmp_path, suffix):
    document = sample_document()
    path = write_grid(tmp_path / f"grid{suffix}", document)
    back = read_grid(path)
    assert back["kind"] == KIND and back["schema_version"] == 1
    assert back["rows"] == document["rows"]
    assert back["model"] == "m" and back["max_new_tokens"] == 16
    assert [p.name for p in tmp_path.iterdir()] == [f"grid{suffix}"]  # no temporary left behind


def test_grid_file_refuses_foreign_and_newer(tmp_path):
    foreign = tmp_path / "other.json"
    foreign.write_text(json.dumps({"kind": "capacity", "schema_version": 1, "rows": []}))
    with pytest.raises(TiersimError, match="not a tiersim quality-grid file"):
        read_grid(foreign)
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**sample_document(), "schema_version": 99}))
    with pytest.raises(TiersimError, match="newer"):
        read_grid(newer)
    with pytest.raises(TiersimError, match="must end in"):
        write_grid(tmp_path / "grid.csv", sample_document())


# -- the CLI --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grid_json(tmp_path_factory, smollm2):
    from tiersim.cli.main import app

    out = tmp_path_factory.mktemp("grid") / "grid.parquet"
    args = ["grid", "--n", "1", "--max-new-tokens", "4", "--hbm", "0.5", "--evict", "0,0.1",
            "--baselines", "streamingllm", "--recent-window", "8", "--format", "json", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), out


def test_cli_json_prints_only_the_document(grid_json):
    document, _ = grid_json
    assert document["kind"] == KIND and document["n_prompts"] == 1 and document["max_new_tokens"] == 4
    assert [(r["method"], r["hbm"], r["evict"]) for r in document["rows"]] == [
        ("hierarchy", 0.5, 0.0), ("hierarchy", 0.5, 0.1), ("streamingllm", 0.5, 0.5)
    ]
    assert document["rows"][0]["exact_match"] == 1.0


def test_cli_out_parquet_matches_stdout(grid_json):
    document, out = grid_json
    back = read_grid(out)
    assert back["rows"] == document["rows"]
    assert back["prompt_ids"] == document["prompt_ids"]


def test_cli_table_output(tmp_path, smollm2):
    from tiersim.cli.main import app

    out, report = tmp_path / "grid.json", tmp_path / "grid.html"
    args = ["grid", "--n", "1", "--max-new-tokens", "2", "--hbm", "1.0", "--evict", "0,0.5",
            "--baselines", "none", "--out", str(out), "--report", str(report)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "exact" in result.stdout and "diverge" in result.stdout and "1 (0.5)" in result.stdout  # hbm 1.0 shrinks to 0.5 at 50% evicted
    assert read_grid(out)["rows"][0]["exact_match"] == 1.0
    html = report.read_text()
    assert "quality_heatmap" in html and "SmolLM2" in html


@pytest.mark.parametrize(
    "args, message",
    [
        (["--hbm", "1.5"], "--hbm"),
        (["--evict", "abc"], "--evict"),
        (["--baselines", "h2o,foo"], "unknown baseline 'foo'"),
        (["--format", "xml"], "--format"),
        (["--out", "grid.csv"], "--out"),
        (["--report", "grid.pdf"], "--report"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, message):
    proc = subprocess.run([sys.executable, "-m", "tiersim", "grid", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stdout == ""
