"""What the tiered cache can hold, checked before anything runs: one growing full-attention KV per
layer, and a head the compressed tier's groups can tile.

A cache that cannot hold a model must say so up front; a wrong answer later is silent.
"""

from __future__ import annotations

from tiersim.errors import TiersimError

FULL_ATTENTION_ONLY = "TieredCache supports full-attention decoders only"


def text_config(model_config):
    return model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config


def head_dim_of(model_config) -> int | None:
    config = text_config(model_config)
    head_dim = getattr(config, "head_dim", None)
    heads = getattr(config, "num_attention_heads", None)
    if head_dim is None and heads:
        head_dim = getattr(config, "hidden_size", 0) // heads or None
    return head_dim


def check_model_supported(model_config) -> None:
    """Refuse layer types whose cache is not one growing full-attention KV (sliding windows, linear attention)."""
    config = text_config(model_config)
    layer_types = getattr(config, "layer_types", None) or []
    odd = sorted({t for t in layer_types if t != "full_attention"})
    if odd:
        raise TiersimError(f"unsupported model: layer types {', '.join(odd)} ({FULL_ATTENTION_ONLY})")
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", window is not None)
    if window is not None and uses_window:
        raise TiersimError(
            f"unsupported model: sliding-window attention (sliding_window={window}); {FULL_ATTENTION_ONLY}"
        )
    if getattr(config, "attention_chunk_size", None):
        raise TiersimError(f"unsupported model: chunked attention; {FULL_ATTENTION_ONLY}")


def check_head_dim(tier_config, head_dim: int) -> None:
    """The compressed tier's channel groups must tile the head: refuse before the first re-tier does."""
    if tier_config.compressed <= 0:
        return
    group = tier_config.quant_group
    divisors = [d for d in range(1, head_dim + 1) if head_dim % d == 0 and d >= 8] or [head_dim]
    choices = f"pick one of {', '.join(map(str, divisors))}"
    if group > head_dim:
        # Values are quantized in groups of quant_group channels: a wider group would silently shrink to
        # the head, and the simulator, pricing the tier per quant_group, would charge the wrong bytes.
        raise TiersimError(
            f"TierConfig.quant_group={group} is wider than head_dim {head_dim}: the compressed tier quantizes "
            f"values in groups of quant_group channels ({choices})"
        )
    if head_dim % group:
        raise TiersimError(
            f"TierConfig.quant_group={group} does not divide head_dim {head_dim}: the compressed tier "
            f"quantizes values in groups of quant_group channels ({choices})"
        )
    if tier_config.compressed_bits == 4 and head_dim % 2:
        raise TiersimError(f"4-bit compression packs two codes per byte: head_dim {head_dim} must be even")


def check_attention_window(layer_idx: int, module, attention_kwargs: dict) -> None:
    """Refuse a sliding-window layer at its first attention (the cache keeps every token's slot).

    A cache built without ``model=`` has not seen the config; the ``"tiersim"`` attention passes the
    layer's module and arguments, where transformers passes the window.
    """
    window = attention_kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if window:
        raise TiersimError(
            f"unsupported model: sliding-window attention (sliding_window={window}) in layer {layer_idx}; "
            f"{FULL_ATTENTION_ONLY}"
        )
