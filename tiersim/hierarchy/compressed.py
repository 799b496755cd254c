"""The compressed tier's re-tiering: quantized tokens keep their codes, arrivals wait in a residual.

One function for every holder of the tier (the cache's :class:`~tiersim.hierarchy.layer.TieredLayer` and
the validator's static graph buffers), so both quantize the same tokens in the same groups and
dequantize to the same values. Quantizing each re-tier's few arrivals as their own key scale group would
cost a float32 scale and minimum per channel for every one or two tokens, as much as the tokens
themselves; so arrivals stay at full precision (a residual, as in KIVI) until some row holds
``group`` of them, then are quantized together. Rows may hold different numbers of quantized and
residual tokens (padded, ``valid``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiersim.hierarchy.index import TokenIndex, gather_tokens, padded_index
from tiersim.hierarchy.policy import COMPRESSED
from tiersim.hierarchy.quant import QuantizedKV, quantize_kv


@dataclass
class CompressedTier:
    """One layer's compressed tier: the quantized tokens and the full-precision residual, with the slots
    (in the layer's token order) each entry goes to."""

    comp: QuantizedKV | None = None
    comp_index: TokenIndex | None = None
    residual_k: torch.Tensor | None = None
    residual_v: torch.Tensor | None = None
    residual_index: TokenIndex | None = None


def retier(tier: CompressedTier, keys: torch.Tensor, values: torch.Tensor, old: torch.Tensor, new: torch.Tensor,
           new_slot_of_old: torch.Tensor, bits: int, group: int) -> CompressedTier:
    """The tier after a re-tiering from tier codes ``old`` to ``new`` ([B, N], the layer's order before it),
    ``keys``/``values`` [B, H, N, D] the layer in that order (arrivals are read there), ``new_slot_of_old``
    [B, N] where each token goes in the order after it (the identity when nothing is dropped)."""
    if not bool((new == COMPRESSED).any()):
        return CompressedTier()

    def staying(index: TokenIndex) -> torch.Tensor:
        safe = torch.where(index.valid, index.slot, torch.zeros_like(index.slot))
        return index.valid & (new.gather(1, safe) == COMPRESSED)

    # The residual: tokens that stay, then the arrivals (slots in the old order until the end).
    res_k, res_v, res_slot, res_valid = [], [], [], []
    if tier.residual_index is not None:
        res_k.append(tier.residual_k)
        res_v.append(tier.residual_v)
        res_slot.append(tier.residual_index.slot)
        res_valid.append(staying(tier.residual_index))
    arriving, arriving_valid = padded_index((new == COMPRESSED) & (old != COMPRESSED))
    if arriving.shape[1]:
        res_k.append(gather_tokens(keys, arriving))
        res_v.append(gather_tokens(values, arriving))
        res_slot.append(arriving)
        res_valid.append(arriving_valid)
    comp, comp_slot, comp_valid = tier.comp, None, None
    if comp is not None:
        comp_slot, comp_valid = tier.comp_index.slot, staying(tier.comp_index)
    out = CompressedTier()
    if res_k:
        index, valid = padded_index(torch.cat(res_valid, dim=1))
        rk = gather_tokens(torch.cat(res_k, dim=2), index)
        rv = gather_tokens(torch.cat(res_v, dim=2), index)
        rslot = torch.cat(res_slot, dim=1).gather(1, index)
        if index.shape[1] >= group:  # some row has a full group: quantize every row's residual
            fresh = quantize_kv(rk, rv, bits=bits, group=group)
            comp = QuantizedKV.concat(comp, fresh)
            comp_slot = rslot if comp_slot is None else torch.cat((comp_slot, rslot), dim=1)
            comp_valid = valid if comp_valid is None else torch.cat((comp_valid, valid), dim=1)
        elif index.shape[1]:
            out.residual_k, out.residual_v = rk, rv
            out.residual_index = TokenIndex(valid, new_slot_of_old.gather(1, rslot))
    if comp is not None:
        index, valid = padded_index(comp_valid)
        if index.shape[1]:
            out.comp = comp.select(index)  # drops the tokens that left, and their empty groups
            out.comp_index = TokenIndex(valid, new_slot_of_old.gather(1, comp_slot.gather(1, index)))
    return out
