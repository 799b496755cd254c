"""Decode throughput on CPU: DynamicCache vs TieredCache (hbm 0.5, ddr 0.5) on SmolLM2.

Target (issue #2): the tiered cache's bookkeeping costs under 15% of decode time on CPU.
Run: python benchmarks/bench_cache.py [--tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from _table import markdown_table, write_section
from tiersim.compat import cache_kwargs
from tiersim.hierarchy import TierConfig
from tiersim.hierarchy.cache import TieredCache
from tiersim.models import format_prompt, load_model
from tiersim.prompts import load_prompts


def decode_rate(model, ids, make_cache, tokens: int) -> float:
    """Generated tokens per second, prefill excluded (timed separately and subtracted)."""
    def run(n):
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, make_cache()),
                           max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start

    prefill = run(1)
    return (tokens - 1) / max(run(tokens) - prefill, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2")
    ids = format_prompt(tokenizer, load_prompts(None, 1)[0].prompt)
    configs = {
        "DynamicCache": lambda: DynamicCache(),
        "TieredCache hbm=1.0": lambda: TieredCache(TierConfig()),
        "TieredCache hbm=0.5 ddr=0.5": lambda: TieredCache(TierConfig(hbm=0.5, ddr=0.5)),
        "TieredCache hbm=0.5 ddr=0.47 evict=0.03": lambda: TieredCache(TierConfig(hbm=0.5, ddr=0.47, evict=0.03)),
        "TieredCache hbm=0.5 ddr=0.3 int4=0.2": lambda: TieredCache(TierConfig(hbm=0.5, ddr=0.3, compressed=0.2)),
    }
    decode_rate(model, ids, configs["DynamicCache"], 8)  # warm-up
    rates = {name: [] for name in configs}
    for _ in range(args.repeats):  # interleave so drift hits every config alike
        for name, make in configs.items():
            rates[name].append(decode_rate(model, ids, make, args.tokens))
    base = statistics.median(rates["DynamicCache"])
    rows = []
    for name, values in rates.items():
        med = statistics.median(values)
        rows.append([name, f"{med:.1f}", f"{(base / med - 1) * 100:+.1f}%"])
    body = (
        f"SmolLM2-135M-Instruct, float32, prompt of {ids.shape[1]} tokens, {args.tokens} new tokens, "
        f"median of {args.repeats} interleaved runs. Overhead = extra decode time per token vs DynamicCache "
        "(target: under 15% for hbm 0.5 / ddr 0.5).\n\n"
        + markdown_table(["cache", "decode tokens/s", "overhead"], rows)
    )
    print(body)
    write_section("Tiered cache decode overhead (CPU)", "python benchmarks/bench_cache.py", body)


if __name__ == "__main__":
    main()
