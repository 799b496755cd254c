"""The compressed tier of one layer in static buffers: the cache's quantized layout, sized once for a run.

A captured CUDA graph reads fixed addresses, so the codes, scales, minimums and the token -> key-group
map of :class:`~tiersim.hierarchy.quant.QuantizedKV` (the cache's quantizer, the bytes
``quant_layout`` prices) live in buffers sized for the tier's largest count in the run, and so does
the full-precision residual (fewer than ``quant_group`` tokens). Re-tiering (between replays) runs the
cache's own rule, :func:`tiersim.hierarchy.compressed.retier`, on views of these buffers and copies
its result back in place; the step dequantizes the whole buffer on the device (``QuantizedKV.dequantize``)
and scatters it to the tokens' slots, unused entries to the always-masked trash slot.
"""

from __future__ import annotations

import math

import torch

from tiersim.errors import TiersimError
from tiersim.hierarchy import compressed, quant_layout
from tiersim.hierarchy.index import TokenIndex
from tiersim.hierarchy.quant import QuantizedKV


#: Per layer, the most bytes of key scales and minimums sized for as many groups as tokens (the bound that never
#: overflows: a group holds at least one token); above it the buffers hold group_capacity's estimate.
FULL_BOUND_BYTES = 32 << 20


def group_capacity(tokens: int, group: int, retiers: int) -> int:
    """Key scale groups the buffers hold when the full bound is too large: whole groups of the tier's tokens,
    plus room for each re-tiering's last partial group and for the groups promotions thin out."""
    return min(tokens, 2 * math.ceil(tokens / group) + 2 * retiers + 2)


class StaticCompressed:
    """One layer's compressed tier: static codes/scales (``static``) and residual, plus the cache-shaped
    state (``state``, a :class:`~tiersim.hierarchy.compressed.CompressedTier` of views into them)."""

    def __init__(self, config, batch: int, heads: int, head_dim: int, tokens: int, retiers: int, device, dtype,
                 trash: int) -> None:
        self.bits, self.group = config.compressed_bits, config.quant_group
        self.trash, self.dtype = trash, dtype
        packed = head_dim // 2 if self.bits == 4 else head_dim
        n_vg = head_dim // quant_layout.value_group(self.group, head_dim)
        full = 2 * batch * heads * tokens * head_dim * 4  # float32 scales and minimums, one group per token
        cap_g = tokens if full <= FULL_BOUND_BYTES else group_capacity(tokens, self.group, retiers)
        b, h, dev, f32 = batch, heads, device, torch.float32
        self.static = QuantizedKV(
            self.bits, quant_layout.value_group(self.group, head_dim),
            torch.zeros((b, h, tokens, packed), dtype=torch.uint8, device=dev),
            torch.zeros((b, h, cap_g, head_dim), dtype=f32, device=dev),
            torch.zeros((b, h, cap_g, head_dim), dtype=f32, device=dev),
            torch.zeros((b, tokens), dtype=torch.long, device=dev),
            torch.zeros((b, h, tokens, packed), dtype=torch.uint8, device=dev),
            torch.zeros((b, h, tokens, n_vg), dtype=f32, device=dev),
            torch.zeros((b, h, tokens, n_vg), dtype=f32, device=dev),
            dtype,
        )
        self.slots = torch.full((b, tokens), trash, dtype=torch.long, device=dev)  # trash where not valid
        cap_r = min(self.group - 1, tokens)
        self.res_k = torch.zeros((b, h, cap_r, head_dim), dtype=dtype, device=dev)
        self.res_v = torch.zeros((b, h, cap_r, head_dim), dtype=dtype, device=dev)
        self.res_slots = torch.full((b, cap_r), trash, dtype=torch.long, device=dev)
        self.state = compressed.CompressedTier()

    def nbytes(self) -> int:
        """Device bytes of the static buffers (what the run holds for this tier)."""
        own = (self.slots, self.res_k, self.res_v, self.res_slots)
        return self.static.nbytes() + sum(t.numel() * t.element_size() for t in own)

    def retier(self, keys, values, old, new, new_slot_of_old) -> None:
        """The cache's rule on the current state; the result is copied into the static buffers."""
        self.store(compressed.retier(self.state, keys, values, old, new, new_slot_of_old, self.bits, self.group))

    def store(self, state: compressed.CompressedTier) -> None:
        """Copy ``state`` into the buffers; keep it as views of them (the cache's shapes, for the next re-tier
        and the exact step)."""
        st = self.static
        comp, index = state.comp, state.comp_index
        m = comp.num_tokens if comp is not None else 0
        groups = comp.key_scale.shape[2] if m else 0
        if groups > st.key_scale.shape[2]:  # refused before anything is overwritten
            raise TiersimError(f"the compressed tier holds {groups} key scale groups, its static buffer "
                               f"{st.key_scale.shape[2]}: run fewer decode steps, a smaller batch or a larger "
                               "quant_group")
        self.slots.fill_(self.trash)
        if m:
            for name in ("key_codes", "value_codes", "value_scale", "value_min"):  # [B, H, n, *]
                getattr(st, name)[:, :, :m].copy_(getattr(comp, name))
            st.key_group[:, :m].copy_(comp.key_group)
            st.key_scale[:, :, :groups].copy_(comp.key_scale)
            st.key_min[:, :, :groups].copy_(comp.key_min)
            self.slots[:, :m] = torch.where(index.valid, index.slot, self.trash)
            comp = QuantizedKV(self.bits, st.group, st.key_codes[:, :, :m], st.key_scale[:, :, :groups],
                               st.key_min[:, :, :groups], st.key_group[:, :m], st.value_codes[:, :, :m],
                               st.value_scale[:, :, :m], st.value_min[:, :, :m], self.dtype)
        r = state.residual_k.shape[2] if state.residual_index is not None else 0
        self.res_slots.fill_(self.trash)
        res_k = res_v = None
        if r:
            self.res_k[:, :, :r].copy_(state.residual_k)
            self.res_v[:, :, :r].copy_(state.residual_v)
            ri = state.residual_index
            self.res_slots[:, :r] = torch.where(ri.valid, ri.slot, self.trash)
            res_k, res_v = self.res_k[:, :, :r], self.res_v[:, :, :r]
        self.state = compressed.CompressedTier(comp if m else None, index if m else None, res_k, res_v,
                                               state.residual_index if r else None)

    def device_tiers(self, rows=None):
        """What the static step scatters: the whole dequantized buffer and the residual, with their slots
        [B, m] (trash where unused)."""
        ck, cv = self.static.dequantize(rows)
        return ((ck, cv, self.slots), (self.res_k, self.res_v, self.res_slots))

    def exact_tiers(self) -> list[tuple[torch.Tensor, torch.Tensor, TokenIndex]]:
        """What the exact step scatters, as the cache's ``device_tiers`` hands it: the valid tokens only."""
        out = []
        if self.state.comp is not None:
            ck, cv = self.state.comp.dequantize()
            out.append((ck, cv, self.state.comp_index))
        if self.state.residual_index is not None:
            out.append((self.state.residual_k, self.state.residual_v, self.state.residual_index))
        return out
