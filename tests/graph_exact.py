"""The CUDA check both graph-executor test files make: an exact step, fed the tokens a TieredCache decodes,
re-tiered when due, gives the cache's logits. Shared so that prefetch (test_graph_executor) and the host
strategies (test_graph_host) hold one loop; each says what "the same" means for its step. Imports torch
only: the GPU run collects these files with the CLI libraries unimportable (tests/test_graph_gpu_script.py)."""

from __future__ import annotations

from typing import Callable

import torch


def assert_exact_step_follows_the_cache(model, cache, buffers, step, check: Callable, steps: int = 6) -> None:
    """Decode ``steps`` random tokens through ``cache`` (the reference) and ``step`` over ``buffers``;
    ``check(out, ref, i)`` compares step ``i``'s logits, then the buffers re-tier when due."""
    from tiersim.compat import cache_kwargs

    ids = torch.randint(model.config.vocab_size, (steps, *step.ids.shape), device=step.ids.device)
    with torch.inference_mode():
        for i in range(steps):
            ref = model(input_ids=ids[i], **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits
            step.ids.copy_(ids[i])
            check(step.run(), ref, i)
            if buffers.due(i + 1):
                buffers.retier(i + 1)
