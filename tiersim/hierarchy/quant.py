"""KIVI-style asymmetric uniform quantization for the compressed tier.

Keys are quantized per channel (each channel of a group of ``group`` consecutive tokens shares one
scale and minimum: key outliers live in fixed channels), values per token (each token's channels
in groups of ``group``). 4-bit codes are packed two per byte so the byte counts are the real ones.
Every value is reconstructed within half a quantization step of the original: |x - x̂| <= scale/2,
computed in float32; a bf16/fp16 tier then rounds x̂ once to its dtype (half an ulp more). Scales and
minimums are kept in float32 for that reason: rounded to bf16, a scale times a code of up to 255 would
miss by more than the step.

Ranges are computed on halves (``hi/2 - lo/2``, then doubled): a group spanning -3e38..3e38 has a
range beyond float32, so ``hi - lo`` would be inf and every code NaN. Halving and doubling are exact
in binary floating point, so for every range that fits the codes and scales are bit for bit those
of the plain formula. Non-finite input (NaN, inf) is refused: it would poison its whole group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiersim.errors import TiersimError
from tiersim.hierarchy import quant_layout


def _levels(bits: int) -> int:
    return (1 << bits) - 1


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., D] -> bytes; 4-bit codes go two per byte (D must be even)."""
    if bits == 8:
        return codes
    if codes.shape[-1] % 2:
        raise ValueError(f"4-bit packing needs an even last dimension, got {codes.shape[-1]}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def _half_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a - b) / 2 without overflow: exact halves of float32 values never leave the float32 range."""
    return a / 2 - b / 2


def _step(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """The quantization step (hi - lo) / levels, finite for every finite lo <= hi."""
    return _half_difference(hi, lo) / _levels(bits) * 2


def _quantize(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int):
    """Codes and (scale, minimum) for x given broadcastable per-group lo/hi (all float32)."""
    levels = _levels(bits)
    scale = _step(lo, hi, bits)
    # A constant group has scale 0; any positive scale reconstructs it exactly (code 0 -> lo).
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(_half_difference(x, lo) / (safe / 2)).clamp_(0, levels).to(torch.uint8)
    return codes, scale, lo


def _reconstruct(minimum: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """minimum + codes * scale in float32, on halves so that codes * scale (up to hi - lo) cannot overflow."""
    return torch.addcmul(minimum / 2, codes, scale / 2).mul_(2)


@dataclass
class QuantizedKV:
    """One layer's compressed tier: tokens [B, H, n, D] held as codes + scales.

    ``key_group`` [B, n] maps each stored token to its key scale group, so tokens can leave the
    tier (promotion, eviction) without re-quantizing the others (no drift from re-quantization);
    a group no token refers to any more is dropped (``select``), so the scales never outgrow the tokens.
    """

    bits: int
    group: int
    key_codes: torch.Tensor  # uint8 [B, H, n, D or D/2]
    key_scale: torch.Tensor  # float32 [B, H, G, D]
    key_min: torch.Tensor  # float32 [B, H, G, D]
    key_group: torch.Tensor  # long [B, n]
    value_codes: torch.Tensor  # uint8 [B, H, n, D or D/2]
    value_scale: torch.Tensor  # float32 [B, H, n, D/group]
    value_min: torch.Tensor  # float32 [B, H, n, D/group]
    dtype: torch.dtype = torch.float32  # of the tokens it stands for: dequantize returns this

    @property
    def num_tokens(self) -> int:
        return self.key_codes.shape[2]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor the tier holds (codes, scales, minimums, the token -> group map)."""
        return (self.key_codes, self.key_scale, self.key_min, self.key_group, self.value_codes, self.value_scale,
                self.value_min)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def dequantize(self, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Approximations of the keys and values in the tier's dtype, [B, H, n, D] each.

        codes * scale + min is computed in float32 and rounded to the dtype once at the end: in
        bf16 the product alone would already miss the half-step bound. ``rows``: the [B, 1] row numbers,
        made once by a caller that replays this in a CUDA graph.
        """
        if rows is None:
            rows = torch.arange(self.key_group.shape[0], device=self.key_group.device)[:, None]
        k_scale = self.key_scale[rows, :, self.key_group].permute(0, 2, 1, 3)  # [B, H, n, D]
        k_min = self.key_min[rows, :, self.key_group].permute(0, 2, 1, 3)
        keys = _reconstruct(k_min, _unpack(self.key_codes, self.bits).float(), k_scale)
        v_codes = _unpack(self.value_codes, self.bits).float()
        shape = v_codes.shape
        v = v_codes.reshape(*shape[:-1], -1, self.group)
        values = _reconstruct(self.value_min.unsqueeze(-1), v, self.value_scale.unsqueeze(-1)).reshape(shape)
        return keys.to(self.dtype), values.to(self.dtype)

    def select(self, index: torch.Tensor) -> "QuantizedKV":
        """Keep only stored tokens ``index`` ([B, m], per row): promotion/eviction leaves the rest as is.

        Key scale groups left without a token are dropped (per row; the group axis shrinks to the
        row that still needs the most).
        """
        rows = torch.arange(index.shape[0], device=index.device)[:, None]

        def take(t: torch.Tensor) -> torch.Tensor:
            return t[rows, :, index].permute(0, 2, 1, 3).contiguous()

        key_group = self.key_group[rows, index]
        key_scale, key_min = self.key_scale, self.key_min
        used = torch.zeros(key_group.shape[0], key_scale.shape[2], dtype=torch.bool, device=key_group.device)
        used.scatter_(1, key_group, True)
        n_used = int(used.sum(dim=1).max()) if used.numel() else 0
        if n_used < key_scale.shape[2]:
            # Each row's used groups, in order, first; renumber the tokens' groups to match.
            order = torch.sort((~used).to(torch.int8), dim=1, stable=True).indices[:, :n_used]
            renumber = torch.cumsum(used, dim=1) - 1
            key_group = renumber.gather(1, key_group)
            key_scale = take_groups(key_scale, order)
            key_min = take_groups(key_min, order)
        return QuantizedKV(
            self.bits,
            self.group,
            take(self.key_codes),
            key_scale,
            key_min,
            key_group,
            take(self.value_codes),
            take(self.value_scale),
            take(self.value_min),
            self.dtype,
        )

    @staticmethod
    def concat(a: "QuantizedKV | None", b: "QuantizedKV") -> "QuantizedKV":
        """Append b's tokens after a's, keeping both sets of key scales."""
        if a is None or a.num_tokens == 0 and a.key_scale.shape[2] == 0:
            return b
        offset = a.key_scale.shape[2]
        return QuantizedKV(
            a.bits,
            a.group,
            torch.cat((a.key_codes, b.key_codes), dim=2),
            torch.cat((a.key_scale, b.key_scale), dim=2),
            torch.cat((a.key_min, b.key_min), dim=2),
            torch.cat((a.key_group, b.key_group + offset), dim=1),
            torch.cat((a.value_codes, b.value_codes), dim=2),
            torch.cat((a.value_scale, b.value_scale), dim=2),
            torch.cat((a.value_min, b.value_min), dim=2),
            a.dtype,
        )


def take_groups(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t [B, H, G, D] at per-row group indices [B, m] -> [B, H, m, D]."""
    rows = torch.arange(index.shape[0], device=index.device)[:, None]
    return t[rows, :, index].permute(0, 2, 1, 3).contiguous()


def quantize_kv(keys: torch.Tensor, values: torch.Tensor, bits: int = 4, group: int = 32) -> QuantizedKV:
    """Quantize keys [B, H, n, D] per channel (token groups) and values per token (channel groups)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    batch, heads, n, dim = keys.shape
    if dim % group and group < dim:
        raise ValueError(f"head_dim {dim} is not a multiple of the quantization group {group}")
    value_group = quant_layout.value_group(group, dim)
    if not (bool(torch.isfinite(keys).all()) and bool(torch.isfinite(values).all())):
        raise TiersimError(
            "the compressed tier got non-finite keys or values (NaN or inf, e.g. a float16 overflow): "
            "quantization cannot represent them; use another dtype or compressed=0"
        )
    dtype = keys.dtype
    keys, values = keys.float(), values.float()  # codes and scales in float32 (see the module doc)
    # Keys: per channel over groups of `group` tokens. Pad the token axis by repeating the last
    # token so every group is full; padding never widens a group's range.
    n_groups = max(-(-n // group), 0)
    pad = n_groups * group - n
    k = keys
    if pad and n:
        k = torch.cat((keys, keys[:, :, -1:, :].expand(batch, heads, pad, dim)), dim=2)
    kg = k.reshape(batch, heads, n_groups, group, dim)
    k_lo = kg.amin(dim=3)
    k_hi = kg.amax(dim=3)
    key_group = (torch.arange(n, device=keys.device) // group).expand(batch, n).contiguous()
    k_codes, k_scale, k_min = _quantize(
        keys,
        k_lo.repeat_interleave(group, dim=2)[:, :, :n],
        k_hi.repeat_interleave(group, dim=2)[:, :, :n],
        bits,
    )
    # Values: per token over groups of channels.
    vg = values.reshape(batch, heads, n, dim // value_group, value_group)
    v_lo = vg.amin(dim=-1)
    v_hi = vg.amax(dim=-1)
    v_codes, v_scale, v_min = _quantize(vg, v_lo.unsqueeze(-1), v_hi.unsqueeze(-1), bits)
    return QuantizedKV(
        bits,
        value_group,
        _pack(k_codes, bits),
        _step(k_lo, k_hi, bits),
        k_lo,
        key_group,
        _pack(v_codes.reshape(batch, heads, n, dim), bits),
        v_scale.squeeze(-1),
        v_min.squeeze(-1),
        dtype,
    )


def error_bound(x: torch.Tensor, bits: int, group: int, per: str) -> torch.Tensor:
    """Half a quantization step for every element of x: the scheme's promised worst-case error."""
    batch, heads, n, dim = x.shape
    if per == "channel":
        n_groups = -(-n // group)
        pad = n_groups * group - n
        xp = torch.cat((x, x[:, :, -1:, :].expand(batch, heads, pad, dim)), dim=2) if pad else x
        g = xp.reshape(batch, heads, n_groups, group, dim)
        step = _step(g.amin(3), g.amax(3), bits)
        return (step.repeat_interleave(group, dim=2)[:, :, :n]) / 2
    vg = quant_layout.value_group(group, dim)
    g = x.reshape(batch, heads, n, dim // vg, vg)
    step = _step(g.amin(-1, keepdim=True), g.amax(-1, keepdim=True), bits)
    return (step.expand_as(g) / 2).reshape(x.shape)
