"""Selective's predictor: per-page key bounds of a DDR chunk and the pages each batch row fetches.

A page is ``PAGE`` stored tokens of a chunk. Its per-channel key minimum and maximum bound the logit any of
its keys can give a query (``sum_d max(q_d * min_d, q_d * max_d)``), so ranking pages by that bound and
fetching from the top picks the pages that can matter most, without reading their keys
(:class:`tiersim.hierarchy.access.Selective` runs it once the query is known).
"""

from __future__ import annotations

import torch

PAGE = 16  # stored tokens per page


def page_bounds(chunk, device, page: int = PAGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-page key (min, max) of a chunk, [B, H, pages, D] each, on ``device`` (computed once per chunk)."""
    if chunk.bounds is None:
        if chunk.ready is not None:
            chunk.ready.synchronize()
        k = chunk.keys
        batch, heads, m, dim = k.shape
        pages = -(-m // page)
        pad = pages * page - m
        # Padding repeats the last token: a page's bounds stay those of its own tokens.
        kp = torch.cat((k, k[:, :, -1:].expand(batch, heads, pad, dim)), dim=2) if pad else k
        kp = kp.float().reshape(batch, heads, pages, page, dim)
        chunk.bounds = (kp.amin(dim=3).to(device), kp.amax(dim=3).to(device))
    return chunk.bounds


def live_per_page(chunk, pages: int, page: int = PAGE) -> torch.Tensor:
    """[B, pages]: the chunk's tokens still in the DDR tier, per page."""
    valid = chunk.valid
    pad = pages * page - valid.shape[1]
    if pad:
        valid = torch.cat((valid, valid.new_zeros((valid.shape[0], pad))), dim=1)
    return valid.reshape(valid.shape[0], pages, page).sum(dim=2)


def upper_bound(query: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """[B, pages]: an upper bound of q·k over each page's keys, the largest over heads and queries."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads = lo.shape[1]
    q = query.float().reshape(batch, kv_heads, (q_heads // kv_heads) * q_len, 1, dim)
    bound = torch.maximum(q * lo[:, :, None], q * hi[:, :, None]).sum(-1)  # [B, Hkv, g*q, pages]
    return bound.amax(dim=(1, 2))


def choose(scores: torch.Tensor, live: torch.Tensor, share: float) -> torch.Tensor:
    """[B, pages] bool: per row, the highest-bound pages until they hold ``share`` of its live DDR tokens
    (at least one page)."""
    order = scores.argsort(dim=1, descending=True)
    live_sorted = live.gather(1, order)
    before = live_sorted.cumsum(dim=1) - live_sorted
    take_sorted = before < share * live.sum(dim=1, keepdim=True)
    take_sorted[:, 0] = True
    return torch.zeros_like(take_sorted).scatter_(1, order, take_sorted)
