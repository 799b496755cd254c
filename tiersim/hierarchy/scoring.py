"""Attention scores beside the stock SDPA output: the signal the policy ranks tokens by.

SDPA returns no attention weights, so tiersim registers its own attention implementation,
``"tiersim"``: it computes the output with transformers' own SDPA function (so logits are
bit-identical to ``attn_implementation="sdpa"``) and, when a :class:`~tiersim.hierarchy.cache.TieredCache`
is listening, the float32 attention probabilities of the step's queries, which it hands to the
cache. The cache registers itself as the listener in ``update`` (called just before attention
for the same layer), so no model code changes.
"""

from __future__ import annotations

import threading

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tiersim.errors import TiersimError
from tiersim.hierarchy.masks import allowed_keys

ATTN_IMPLEMENTATION = "tiersim"

_listener = threading.local()


def set_listener(cache, layer_idx: int) -> None:
    """Route the next attention call of ``layer_idx`` to ``cache.observe_attention`` (once).

    The cache calls this in ``update``, right before the same layer's attention runs. The
    attention consumes it, so a later forward with another cache (or none) never reports to a
    stale cache, even when a previous forward stopped halfway.
    """
    _listener.target = (cache, layer_idx)


def clear_listener() -> None:
    _listener.target = None


def attention_probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    n_queries: int | None = None,
    scratch: list | None = None,
) -> torch.Tensor:
    """Softmax probabilities of the last ``n_queries`` queries, float32, shape [B, Hq, q, kv].

    Grouped-query heads are matched to their KV head by reshaping, without copying the keys.
    The causal mask is applied when the model passed none (SDPA's is_causal shortcut).
    ``scratch``, when given, receives the bytes of every tensor this allocates (float32 copies of
    the queries and keys, the logits, the probabilities), all alive at once at the softmax.
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if n_queries is not None and n_queries < q_len:
        query = query[:, :, q_len - n_queries :, :]
        if attention_mask is not None and attention_mask.shape[-2] == q_len:
            attention_mask = attention_mask[..., q_len - n_queries :, :]
    q_used = query.shape[2]
    group = q_heads // kv_heads
    q = query.float().reshape(batch, kv_heads, group * q_used, head_dim)
    k = key.float()
    logits = torch.matmul(q, k.transpose(-1, -2)).mul_(scaling)
    logits = logits.reshape(batch, q_heads, q_used, kv_len)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            logits.masked_fill_(~attention_mask, float("-inf"))
        else:
            logits.add_(attention_mask)
    elif q_used > 1 or q_len > 1:
        # Causal: query i (absolute index kv_len - q_len + i) sees keys up to itself.
        first = kv_len - q_len + (q_len - q_used)
        rows = torch.arange(first, first + q_used, device=key.device)[:, None]
        cols = torch.arange(kv_len, device=key.device)[None, :]
        logits.masked_fill_(cols > rows, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if scratch is not None:
        for made, source in ((q, query), (k, key), (logits, None), (probs, None)):
            if source is None or made.data_ptr() != source.data_ptr():
                scratch.append(made.numel() * made.element_size())
    # A query that may see no key at all (a left-pad query in a padded batch) gives 0/0 = NaN rows;
    # it attends to nothing, so it gives no token any score.
    return probs.nan_to_num_(nan=0.0)


def visible_keys(attention_mask: torch.Tensor | None, batch: int, kv_len: int) -> torch.Tensor | None:
    """[B, kv] bool: the keys the last query may see (left padding hides the pad tokens), or None."""
    if attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[-1] != kv_len:
        return None
    return allowed_keys(attention_mask, batch, 1, kv_len)[:, 0, -1, :]


def tiersim_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA output, plus the probabilities handed to the listening cache (if any).

    When the listening cache attends to part of the layer elsewhere (``host-attention``), the cache
    computes the output itself (``attend_split``) and reports the probabilities.
    """
    target = getattr(_listener, "target", None)
    _listener.target = None
    layer_idx = getattr(module, "layer_idx", None)
    cache = target[0] if target is not None and target[1] == layer_idx else None
    if cache is not None:
        cache.check_attention(layer_idx, module, kwargs)
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        n_queries = cache.queries_to_score(layer_idx, query.shape[2])
        split = cache.attend_split(layer_idx, query, attention_mask, scaling, n_queries)
        if split is not None:
            return split, None
        attention_mask = cache.prepare_attention(layer_idx, query, attention_mask)
    output = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )
    if cache is not None and n_queries:
        scratch = []
        probs = attention_probabilities(query, key, attention_mask, scaling, n_queries, scratch)
        # Only the prompt's forward reads which keys are padding (it places the sinks after the pads).
        first = cache.layers[layer_idx].step == 0
        visible = visible_keys(attention_mask, key.shape[0], key.shape[2]) if first else None
        cache.observe_attention(layer_idx, probs, visible=visible, scratch_bytes=sum(scratch))
    return output


def tiersim_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """SDPA's mask, refusing a padded batch once the cache has evicted tokens.

    transformers reads the 2D padding mask by slot (slot i = the i-th token seen); after eviction a
    layer's slots are a per-layer subset of the tokens seen, so the padding columns would land on the
    wrong tokens and generation would be silently wrong. Unpadded batches, and any batch whose
    cache only offloads (DDR, compressed), keep one slot per token seen and are unaffected.
    """
    kv_length, kv_offset = kwargs.get("kv_length"), kwargs.get("kv_offset", 0)
    if (
        attention_mask is not None
        and kv_length is not None
        and attention_mask.shape[-1] > kv_offset + kv_length
        and not bool(attention_mask.all())
    ):
        raise TiersimError(
            "a padded batch cannot evict tokens (the padding mask no longer lines up with the retained "
            "tokens): generate these prompts one at a time, or with evict=0"
        )
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, tiersim_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, tiersim_mask)


def enable_scoring(model) -> None:
    """Switch a loaded model to the scoring attention (same output as SDPA)."""
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(ATTN_IMPLEMENTATION)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = ATTN_IMPLEMENTATION
