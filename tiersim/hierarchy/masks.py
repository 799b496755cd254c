"""The model's attention mask read as which keys each query may see: one reading for every user.

transformers hands attention a 4-D mask, bool or additive (0 visible, the dtype's minimum hidden),
or none at all when SDPA takes its causal shortcut. The cache reads it in three places (the
columns a tier's keys occupy in split attention, the keys ``selective`` leaves visible, the
padding the prefill's last query hides); they must agree, so the reading is written once here.
"""

from __future__ import annotations

import torch


def allowed_keys(attention_mask: torch.Tensor | None, batch: int, q_len: int, n_keys: int,
                 slots: torch.Tensor | None = None, device=None) -> torch.Tensor | None:
    """May query i see key j: [B, 1|Hq, q_len, m] bool, True where visible; None: every key is visible.

    The queries are the forward's last ``q_len``, query i at slot ``n_keys - q_len + i`` of the
    ``n_keys`` retained slots. Keys are the slots ``slots`` [B, m] (clamped into range; padded
    entries are the caller's to hide), or all ``n_keys`` slots in order when ``slots`` is None.
    Without a mask (SDPA's causal shortcut) a query sees the slots up to its own, and a lone query
    sees every key (None). ``device`` is where that causal mask is built when neither the mask nor
    ``slots`` says.
    """
    if attention_mask is not None:
        mask = attention_mask[..., -q_len:, :]
        if mask.dtype != torch.bool:
            mask = mask > torch.finfo(mask.dtype).min / 2
        if slots is None:
            return mask.expand(batch, mask.shape[1], q_len, n_keys)
        m = slots.shape[1]
        mask = mask.expand(batch, mask.shape[1], q_len, mask.shape[-1])
        index = slots.clamp(0, max(n_keys - 1, 0))[:, None, None, :].expand(batch, mask.shape[1], q_len, m)
        return mask.gather(-1, index)
    if q_len == 1:
        return None
    if slots is None:
        columns = torch.arange(n_keys, device=device)[None, :].expand(batch, n_keys)
    else:
        columns = slots.clamp(0, max(n_keys - 1, 0))
    rows = torch.arange(n_keys - q_len, n_keys, device=columns.device)
    return columns[:, None, None, :] <= rows[None, None, :, None]
