"""Wall time of the quality grid on CPU: 3x3 hierarchy cells + 2 baselines, SmolLM2, n prompts x T tokens.

Target (issue #6): hbm {1, 0.5, 0.25} x evict {0, 0.03, 0.1} + H2O and R-KV, 10 prompts x 64 new
tokens, under 10 minutes on CPU (model load included).
Run: python benchmarks/bench_grid.py [--n 10] [--tokens 64]   (rewrites its section of docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from _table import markdown_table, write_section
from tiersim.models import generation_kwargs, load_model
from tiersim.prompts import load_prompts
from tiersim.quality.grid import build_cells, prepare_samples, run_grid

TARGET_S = 600.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    start = time.perf_counter()
    model, tokenizer = load_model("smollm2")
    load_s = time.perf_counter() - start
    samples = prepare_samples(tokenizer, load_prompts(None, args.n))
    cells = build_cells([1.0, 0.5, 0.25], [0.0, 0.03, 0.1], [0.0], ["h2o", "rkv"])
    seconds: dict[str, float] = defaultdict(float)
    tokens: dict[str, int] = defaultdict(int)

    def on_run(run) -> None:
        key = "full cache" if run.cell is None else ("hierarchy" if run.method == "hierarchy" else run.method)
        seconds[key] += run.seconds
        tokens[key] += len(run.token_ids)

    rows, _ = run_grid(
        model, samples, cells, args.tokens, decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        generation_kwargs=generation_kwargs(tokenizer), on_run=on_run,
    )
    total_s = time.perf_counter() - start
    runs = len(samples) * (len(cells) + 1)

    timing = markdown_table(
        ["part", "generations", "tokens", "seconds", "tokens/s"],
        [["model load", "—", "—", f"{load_s:.1f}", "—"]]
        + [[k, len(samples) * _count(cells, k), tokens[k], f"{seconds[k]:.1f}", f"{tokens[k] / max(seconds[k], 1e-9):.1f}"]
           for k in ("full cache", "hierarchy", "h2o", "rkv")]
        + [["**total (wall)**", runs, sum(tokens.values()), f"**{total_s:.1f}**", f"{sum(tokens.values()) / total_s:.1f}"]],
    )
    verdict = "meets" if total_s < TARGET_S else "MISSES"
    quality = markdown_table(
        ["method", "hbm", "evict", "exact match", "tokens to divergence", "answer agreement"],
        [[r["method"], f"{r['hbm']:g}", f"{r['evict']:g}", f"{r['exact_match']:.2f}",
          f"{r['mean_tokens_to_divergence']:.1f}", f"{r['answer_agreement']:.2f}"] for r in rows],
    )
    body = (
        f"SmolLM2-135M-Instruct, float32, {len(samples)} bundled prompts x {args.tokens} new tokens (greedy); "
        f"grid hbm {{1, 0.5, 0.25}} x evict {{0, 0.03, 0.1}} (9 cells) + H2O and R-KV at hbm 0.5 and 0.25 "
        f"(4 cells) + the full cache: {runs} generations. Target: under {TARGET_S / 60:.0f} minutes, "
        f"model load included — **{verdict} it ({total_s / 60:.1f} min)**. Generations that hit EOS early "
        "make fewer tokens, so tokens/s, not tokens, compares the parts.\n\n"
        f"{timing}\n\nThe quality numbers of this run (not the documented grid, see docs/quality.md):\n\n{quality}\n"
    )
    print(body)
    write_section("Quality grid (CPU)", f"python benchmarks/bench_grid.py --n {args.n} --tokens {args.tokens}", body)


def _count(cells, key: str) -> int:
    if key == "full cache":
        return 1
    return sum(1 for c in cells if c.method == key)


if __name__ == "__main__":
    main()
