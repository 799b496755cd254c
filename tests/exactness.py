"""What each strategy claims about its output, per dtype, and the comparison that holds it to the claim.

``prefetch`` (and ``selective`` at fetch share 1, the same code path) reassemble the layer and run the
stock kernel: bit for bit the cache without the DDR tier. ``host-attention`` and ``hybrid`` compute the
split attention in float32 and merge in float64, then round once: in float32 identical tokens (logits
within 1e-4); in bf16/fp16 the kernel's own rounding differs, so the claim is the largest |logit
difference| measured by benchmarks/bench_host_attention_dtypes.py (docs/benchmarks.md, docs/quality.md)
on the tiny model these tests use, up to the first token that differs.
"""

from __future__ import annotations

import torch

HOST_ATTENTION_BOUND = {torch.float32: 1e-4, torch.bfloat16: 0.16, torch.float16: 0.0234}


def logit_error_until_divergence(out, ref) -> tuple[float, bool]:
    """(largest |logit difference| at the steps both runs decoded from the same tokens, all tokens identical).

    Every batch row is compared; a row stops counting after its first differing token (from then on the two
    runs condition on different text).
    """
    steps = len(ref.logits)
    new_out, new_ref = out.sequences[:, -steps:], ref.sequences[:, -steps:]
    alive = torch.ones(new_ref.shape[0], dtype=torch.bool)
    worst = 0.0
    for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
        if not alive.any():
            break
        diff = (a.float() - b.float()).abs().amax(dim=-1)
        worst = max(worst, float(diff[alive].max()))
        alive &= new_out[:, step] == new_ref[:, step]
    return worst, bool(torch.equal(out.sequences, ref.sequences))
