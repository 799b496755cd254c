"""Greedy `generate` with a given cache, returning logits too: what the exactness tests compare."""

from __future__ import annotations

import torch

from tiersim.compat import cache_kwargs


def generate(model, ids, cache, new_tokens):
    with torch.inference_mode():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            **cache_kwargs(model, cache),
            max_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )


def assert_identical(out, ref):
    """Same tokens and the same logits bit for bit at every step."""
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.logits) == len(ref.logits)
    for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
        assert torch.equal(a, b), f"logits differ at step {step}"


def random_prompt(model, length, seed=0, batch=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size, (batch, length), generator=gen)
