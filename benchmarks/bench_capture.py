"""Capture overhead on CPU: plain generation (DynamicCache) vs trace capture (TieredCache + recorder).

Target (issue #3): capture costs under 25% over plain generation.
Run: python benchmarks/bench_capture.py [--n 4] [--tokens 128]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache

from _table import markdown_table, write_section
from tiersim.compat import cache_kwargs
from tiersim.cli.cmd_capture import HEADLINE
from tiersim.hierarchy import TierConfig
from tiersim.models import describe_model, format_prompt, load_model
from tiersim.prompts import load_prompts
from tiersim.traces.capture import capture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2")
    prompts = load_prompts(None, args.n)
    config = TierConfig(**HEADLINE)

    def plain() -> float:
        start = time.perf_counter()
        for p in prompts:
            ids = format_prompt(tokenizer, p.prompt)
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, DynamicCache()),
                               max_new_tokens=args.tokens, do_sample=False)
        return time.perf_counter() - start

    def captured() -> float:
        start = time.perf_counter()
        capture(model, tokenizer, prompts, config, args.tokens, describe_model(model))
        return time.perf_counter() - start

    plain()  # warm-up
    t_plain = min(plain(), plain())
    t_capture = min(captured(), captured())
    overhead = (t_capture / t_plain - 1) * 100
    body = (
        f"SmolLM2-135M-Instruct, float32, {args.n} bundled prompts × {args.tokens} new tokens, headline config "
        f"(hbm 0.5 / ddr 0.47 / evict 0.03), best of 2. Target: under 25%.\n\n"
        + markdown_table(["run", "seconds", "overhead"],
                         [["plain generate (DynamicCache)", f"{t_plain:.2f}", "—"],
                          ["tiersim capture (TieredCache + recorder)", f"{t_capture:.2f}", f"{overhead:+.1f}%"]])
    )
    print(body)
    write_section("Capture overhead (CPU)", "python benchmarks/bench_capture.py", body)


if __name__ == "__main__":
    main()
