"""Token index helpers: where each tier's stored tokens sit in a layer's retained (token-ordered) view.

Every tier keeps its tokens in its own storage plus the slot each token occupies in the layer's
retained order; these helpers gather tokens by per-row index and scatter them back to their slots.
Rows of a batch may hold different numbers of tokens in a tier (left padding, per-row eviction), so
indices come padded with a ``valid`` mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def batch_rows(batch: int, device) -> torch.Tensor:
    """[B, 1] row numbers, for advanced indexing of one column set per row."""
    return torch.arange(batch, device=device)[:, None]


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D] at per-row token indices [B, m] -> [B, H, m, D] (a copy)."""
    if x.shape[0] == 1:
        return x.index_select(2, index[0])
    return x[batch_rows(x.shape[0], x.device), :, index].permute(0, 2, 1, 3)


def masked_index(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the True entries of each row ([B, N] bool, ``count`` per row), ascending: [B, count]."""
    # A stable sort of (not mask) puts each row's True entries first, in order.
    return torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :count]


def padded_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row indices of True entries when rows have different counts: ([B, m_max], valid [B, m_max]).

    Padding repeats the row's first index (or 0), so padded entries are harmless duplicates.
    """
    counts = mask.sum(dim=1)
    m_max = int(counts.max()) if mask.numel() else 0
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :m_max]
    valid = torch.arange(m_max, device=mask.device)[None, :] < counts[:, None]
    first = order[:, :1].expand_as(order) if m_max else order
    return torch.where(valid, order, first), valid


def scatter_tokens(keys, values, slot, src_k, src_v, rows=None) -> None:
    """Write ``src`` [B, H, m, D] into ``keys``/``values`` at per-row slots [B, m] (every entry valid).

    ``rows``: a [B, 1] :func:`batch_rows` made once (a captured CUDA graph then runs no arange per call)."""
    if src_k.shape[2] == 0:
        return
    if keys.shape[0] == 1:
        keys.index_copy_(2, slot[0], src_k)
        values.index_copy_(2, slot[0], src_v)
        return
    rows = batch_rows(keys.shape[0], keys.device) if rows is None else rows
    keys[rows, :, slot] = src_k.permute(0, 2, 1, 3)
    values[rows, :, slot] = src_v.permute(0, 2, 1, 3)


def empty_columns(batch: int, device, dtype=torch.long) -> torch.Tensor:
    """A [B, 0] tensor in its own (empty) storage: a zero-width *view* would keep its parent alive."""
    return torch.empty((batch, 0), dtype=dtype, device=device)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it owns its whole storage, else a copy (so a view does not keep a parent alive)."""
    return t if t.untyped_storage().nbytes() == nbytes(t) else t.clone()


@dataclass
class TokenIndex:
    """Where a tier's stored tokens go in the layer's retained (token-ordered) buffer: the one
    scatter index every tier uses (the compressed tier, its residual, each DDR chunk).

    Built once per re-tiering, not per step: ``all`` and ``nonzero`` sync the device, and the hot
    path (``scatter``/``clear``, every step) then runs with no sync and no per-token Python loop.
    When every entry is valid the slots are used as they are (one ``index_copy`` for one row);
    ragged rows (``valid`` False where a row holds fewer tokens) go through the flat (row, column,
    slot) triples of the valid entries.
    """

    valid: torch.Tensor  # [B, m] bool
    slot: torch.Tensor  # [B, m] long (garbage where not valid)
    dense_slots: torch.Tensor | None = None  # [B, m] when every entry is valid: a plain scatter
    flat_rows: torch.Tensor | None = None
    flat_cols: torch.Tensor | None = None
    flat_slots: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if bool(self.valid.all()):
            self.dense_slots = self.slot
            return
        self.flat_rows, self.flat_cols = torch.nonzero(self.valid, as_tuple=True)
        self.flat_slots = self.slot[self.flat_rows, self.flat_cols]

    def tensors(self) -> tuple:
        return (self.valid, self.slot, self.flat_rows, self.flat_cols, self.flat_slots)

    def scatter(self, keys: torch.Tensor, values: torch.Tensor, src_k: torch.Tensor, src_v: torch.Tensor) -> None:
        """Write the valid stored tokens ``src`` [B, H, m, D] into ``keys``/``values`` at their slots."""
        if self.dense_slots is not None:
            scatter_tokens(keys, values, self.dense_slots, src_k, src_v)
            return
        keys[self.flat_rows, :, self.flat_slots] = src_k[self.flat_rows, :, self.flat_cols]
        values[self.flat_rows, :, self.flat_slots] = src_v[self.flat_rows, :, self.flat_cols]

    def clear(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Zero ``keys``/``values`` at the valid entries' slots."""
        if self.dense_slots is not None:
            if keys.shape[0] == 1:
                keys.index_fill_(2, self.dense_slots[0], 0)
                values.index_fill_(2, self.dense_slots[0], 0)
            else:
                rows = batch_rows(keys.shape[0], keys.device)
                keys[rows, :, self.dense_slots] = 0
                values[rows, :, self.dense_slots] = 0
            return
        keys[self.flat_rows, :, self.flat_slots] = 0
        values[self.flat_rows, :, self.flat_slots] = 0
