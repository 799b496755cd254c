"""host-attention vs prefetch on SmolLM2 (CPU): decode time, reassembly saved, and exactness vs DynamicCache.

Timing: decode tokens/s of TieredCache(hbm 0.5, ddr 0.5) with ``prefetch`` and ``host-attention``
(and DynamicCache for reference) on ``--timing-prompts`` prompts, interleaved. "Reassembled" is the
K+V bytes per generated token that the cache scattered into a layer-sized buffer for attention
(prefetch: the whole layer every step; host-attention: only at re-tiering points, for promotions).
Exactness (issue 17's target): host-attention vs DynamicCache over ``--tokens`` greedy steps on the
first ``--prompts`` bundled prompts: prompts with identical tokens and the largest |logit difference|.
Run: python benchmarks/bench_host_attention.py [--prompts 30] [--tokens 128] [--timing-prompts 3] [--timing-only]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _table import markdown_table, write_section
from transformers import DynamicCache

from tiersim.compat import cache_kwargs
from tiersim.hierarchy import TierConfig
from tiersim.hierarchy.cache import TieredCache, TieredLayer
from tiersim.models import format_prompt, load_model
from tiersim.prompts import load_prompts

CONFIG = dict(hbm=0.5, ddr=0.5)
REASSEMBLED = [0]


def _count_assembly():
    real = TieredLayer.assemble

    def assemble(self, staged):
        keys, values = real(self, staged)
        if keys is not self.hbm_k:
            REASSEMBLED[0] += 2 * keys.numel() * keys.element_size()
        return keys, values

    TieredLayer.assemble = assemble


def _generate(model, ids, cache, tokens, logits=False):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache),
                              max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                              output_logits=logits, return_dict_in_generate=True, pad_token_id=0)


def decode_seconds(model, ids, make_cache, tokens: int) -> float:
    """Seconds per generated token, the prefill (a one-token run) subtracted."""
    def run(n):
        start = time.perf_counter()
        _generate(model, ids, make_cache(), n)
        return time.perf_counter() - start

    prefill = run(1)
    return max(run(tokens) - prefill, 1e-9) / (tokens - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--timing-prompts", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timing-only", action="store_true", help="skip the exactness pass (prints only)")
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2")
    prompts = load_prompts(None, args.prompts)
    samples = [format_prompt(tokenizer, p.prompt) for p in prompts]
    _count_assembly()

    configs = {
        "DynamicCache": lambda: DynamicCache(),
        "prefetch": lambda: TieredCache(TierConfig(**CONFIG)),
        "host-attention": lambda: TieredCache(TierConfig(**CONFIG, strategy="host-attention")),
    }
    decode_seconds(model, samples[0], configs["DynamicCache"], 4)  # warm-up
    times = {name: [] for name in configs}
    reassembled = {name: 0 for name in configs}
    for _ in range(args.repeats):  # interleaved, so drift hits every config alike
        for ids in samples[: args.timing_prompts]:
            for name, make in configs.items():
                before = REASSEMBLED[0]
                times[name].append(decode_seconds(model, ids, make, args.tokens))
                reassembled[name] += REASSEMBLED[0] - before
    runs = args.repeats * min(args.timing_prompts, len(samples))
    base = statistics.median(times["prefetch"])
    timing_rows = []
    for name, values in times.items():
        med = statistics.median(values)
        per_token = reassembled[name] / runs / (2 * args.tokens - 1)  # both runs of decode_seconds
        timing_rows.append([name, f"{med * 1e3:.2f}", f"{(med / base - 1) * 100:+.1f}%", f"{per_token / 1e6:.2f}"])

    if args.timing_only:
        print(markdown_table(["cache", "ms / token", "vs prefetch", "reassembled MB / token"], timing_rows))
        return
    identical, worst, rows = 0, 0.0, []
    for prompt, ids in zip(prompts, samples):
        ref = _generate(model, ids, DynamicCache(), args.tokens, logits=True)
        out = _generate(model, ids, configs["host-attention"](), args.tokens, logits=True)
        same = torch.equal(out.sequences, ref.sequences)
        diff = max(float((a - b).abs().max()) for a, b in zip(out.logits, ref.logits))
        identical += same
        worst = max(worst, diff)
        rows.append((prompt.id, same, diff))
        print(f"{prompt.id}: tokens {'identical' if same else 'DIFFER'}, max |logit diff| {diff:.2e}", flush=True)
    body = (
        f"SmolLM2-135M-Instruct, float32, CPU, hbm 0.5 / ddr 0.5 (default policy), {args.tokens} new tokens.\n\n"
        f"Decode time per token, median of {runs} runs ({args.timing_prompts} prompts x {args.repeats}, "
        "interleaved); vs prefetch. Reassembled = K+V bytes per token scattered into a layer-sized "
        "buffer for attention.\n\n"
        + markdown_table(["cache", "ms / token", "vs prefetch", "reassembled MB / token"], timing_rows)
        + f"\n\nExactness of host-attention vs DynamicCache over {args.tokens} greedy steps: tokens identical on "
        f"{identical} of {len(rows)} bundled prompts; largest |logit difference| {worst:.2e} "
        "(targets: >= 29 of 30, <= 1e-4).\n"
    )
    print(body)
    write_section("host-attention vs prefetch (CPU)", "python benchmarks/bench_host_attention.py", body)


if __name__ == "__main__":
    main()
