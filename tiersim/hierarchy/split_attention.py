"""Attention split into parts over disjoint key sets, merged exactly with their log-sum-exp.

Softmax attention over keys K = K_1 ∪ K_2 is, per query, ``sum_i exp(lse_i - lse) * out_i`` where
``out_i`` is the attention over K_i alone, ``lse_i`` its log-sum-exp of logits and
``lse = logaddexp(lse_1, lse_2)``. So one part can run where its keys live (the DDR tier in host
memory) and only its output and lse travel. Each part computes in float32; the merge in float64,
so the only difference from one softmax over all keys is float32 rounding inside each part.

A part is a list of segments (keys, values, allowed) whose logits are softmaxed together; the
segments of one part are the device tiers (HBM, dequantized compressed tokens, their residual) or
the DDR chunks, each in its own storage, so no tier is copied into a layer-sized buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiersim.hierarchy.masks import allowed_keys


@dataclass
class Segment:
    """Keys/values [B, Hkv, m, D] of one tier, ``allowed`` [B, 1 or Hq, q, m] bool (None: all visible)."""

    keys: torch.Tensor
    values: torch.Tensor
    allowed: torch.Tensor | None = None


@dataclass
class Partial:
    """One part's attention: output [B, Hq, q, D] float32 (normalised within the part), lse [B, Hq, q]
    float32 (-inf where a query sees none of the part's keys) and, when asked, the within-part
    probabilities of the last queries per segment ([B, Hq, n, m] float32)."""

    out: torch.Tensor
    lse: torch.Tensor
    probs: list | None = None


def partial_attention(query: torch.Tensor, segments: list, scaling: float, n_probs: int = 0) -> Partial:
    """Softmax attention of ``query`` [B, Hq, q, D] over the segments' keys together (GQA by reshape)."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads = segments[0].keys.shape[1]
    group = q_heads // kv_heads
    q = query.float().reshape(batch, kv_heads, group * q_len, dim)
    logits = []
    for seg in segments:
        lg = torch.matmul(q, seg.keys.float().transpose(-1, -2)).mul_(scaling)
        lg = lg.reshape(batch, q_heads, q_len, -1)
        if seg.allowed is not None:
            lg = lg.masked_fill(~seg.allowed, float("-inf"))
        logits.append(lg)
    joined = torch.cat(logits, dim=-1) if len(logits) > 1 else logits[0]
    lse = torch.logsumexp(joined, dim=-1)
    # exp(-inf - -inf) would be NaN for a query that sees no key here: its weights are 0.
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(joined - safe[..., None])
    out = None
    probs_out = [] if n_probs else None
    start = 0
    for seg, lg in zip(segments, logits):
        m = lg.shape[-1]
        p = probs[..., start : start + m]
        start += m
        pv = torch.matmul(p.reshape(batch, kv_heads, group * q_len, m), seg.values.float())
        out = pv if out is None else out.add_(pv)
        if n_probs:
            probs_out.append(p[:, :, q_len - n_probs :, :])
    out = out.reshape(batch, q_heads, q_len, dim)
    return Partial(out, lse, probs_out)


def merge(parts: list) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Exact combination of partial attentions over disjoint keys: (output [B, Hq, q, D] float64,
    lse [B, Hq, q] float64, each part's weight exp(lse_i - lse) [B, Hq, q] float64).

    A query that sees no key at all (a left-pad query) gets a zero output, not NaN: its output
    feeds only pad positions, which no real token attends to.
    """
    lses = torch.stack([p.lse.double() for p in parts])
    lse = torch.logsumexp(lses, dim=0)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    weights = [torch.where(finite, torch.exp(p.lse.double() - safe), torch.zeros_like(safe)) for p in parts]
    out = None
    for part, w in zip(parts, weights):
        term = part.out.double() * w[..., None]
        out = term if out is None else out.add_(term)
    return out, lse, weights


def merged_probabilities(parts: list, slots_of: list, weights: list, q_len: int, n_probs: int,
                         n_keys: int) -> torch.Tensor:
    """The merged attention's probabilities of the last ``n_probs`` queries over the ``n_keys`` retained slots,
    [B, Hq, n, n_keys] float32: each part's within-part probabilities (``Partial.probs``, one per segment)
    times its merge weight (:func:`merge`), scattered to the slots its
    segments hold (``slots_of``: per part, per segment (slots [B, m], valid [B, m] or None)). Sync-free, so a
    captured graph (tiersim.validator.graph_host) can hold it."""
    first = parts[0].probs[0]
    batch, q_heads = first.shape[:2]
    full = torch.zeros((batch, q_heads, n_probs, n_keys + 1), dtype=torch.float32, device=first.device)
    for part, slots, w in zip(parts, slots_of, weights):
        for p, (slot, valid) in zip(part.probs, slots):
            target = torch.where(valid, slot, torch.full_like(slot, n_keys)) if valid is not None else slot
            index = target[:, None, None, :].expand(batch, q_heads, n_probs, target.shape[1])
            full.scatter_(-1, index, (p.double() * w[:, :, q_len - n_probs :, None]).float())
    return full[..., :n_keys]


def allowed_columns(attention_mask: torch.Tensor | None, slots: torch.Tensor, valid: torch.Tensor | None,
                    q_len: int, n_keys: int) -> torch.Tensor | None:
    """The mask's verdict for the keys at ``slots`` [B, m] (the retained order): [B, 1|Hq, q, m] bool.

    The mask is read by :func:`tiersim.hierarchy.masks.allowed_keys` (the model's mask over the
    ``n_keys`` slots, or causal without one); ``valid`` hides padded entries of ragged tiers.
    """
    batch, m = slots.shape
    allowed = allowed_keys(attention_mask, batch, q_len, n_keys, slots=slots)
    if valid is not None and not bool(valid.all()):
        v = valid[:, None, None, :]
        allowed = v.expand(batch, 1, q_len, m) if allowed is None else allowed & v
    return allowed
