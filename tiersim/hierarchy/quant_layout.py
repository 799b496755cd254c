"""What one token of the compressed tier occupies, as ``quant.QuantizedKV`` stores it; standard library only.

The cache's quantizer (``quant.quantize_kv``) and the simulator's pricing of the compressed tier
(``simulator.analytic.compressed_bytes_per_token_layer``) both read this, so the bytes the simulator
charges are the bytes the cache keeps (tested bit for bit against ``QuantizedKV.nbytes``): per element
its ``bits``-bit code; a float32 scale and minimum per group (keys: per channel over ``group`` tokens;
values: per token over :func:`value_group` channels); per token one int64 index of its key group.
"""

from __future__ import annotations

SCALE_BYTES = 4  # float32 scales and minimums (quant.py says why not bf16)
KEY_GROUP_INDEX_BYTES = 8  # int64


def value_group(group: int, head_dim: int) -> int:
    """Channels per value group: ``group``, or the whole head when it is narrower."""
    return min(group, head_dim)


def bytes_per_token_layer(kv_heads: int, head_dim: int, bits: int, group: int) -> float:
    """Bytes one token of one layer takes in the compressed tier (keys and values, every KV head), whole
    key groups assumed (the cache quantizes ``group`` tokens at a time)."""
    half = kv_heads * head_dim  # the keys' (or the values') elements of one token
    scales = 2 * 8 * SCALE_BYTES  # the bits of one scale and one minimum
    keys = half * (bits + scales / group) / 8
    values = half * (bits + scales / value_group(group, head_dim)) / 8
    return keys + values + KEY_GROUP_INDEX_BYTES
