"""The DDR tier's storage: chunks of host memory, one per demotion batch, compacted when holes grow.

A re-tier copies only the newly demoted tokens down (one chunk); promotions and evictions leave
holes (``valid`` False) instead of rewriting host memory, until the holes or the chunk count pass a
threshold and the older chunks are merged into one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiersim.hierarchy.index import TokenIndex, gather_tokens, padded_index

# Chunks of the DDR tier are compacted when padding/holes exceed this share, or when there are too many.
COMPACT_WASTE = 0.25
MAX_DDR_CHUNKS = 4


@dataclass
class DDRChunk:
    """Tokens of one demotion batch in host memory, [B, H, m, D]; ragged rows padded (``valid``)."""

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor  # [B, m] bool, on the compute device
    slot: torch.Tensor  # [B, m] long, slot in the retained order (garbage where not valid)
    ready: torch.cuda.Event | None = None  # D2H finished (CUDA only)
    index: TokenIndex | None = None  # the scatter index of ``valid``/``slot`` (set by ``refresh_index``)
    live_row0: int = 0  # row 0's tokens in the DDR tier (set with the index, once per re-tiering)
    bounds: tuple | None = None  # selective: per-page key (min, max) [B, H, pages, D] on the compute device

    def __getstate__(self) -> dict:
        """A copy waits for the copy-down to finish and leaves the CUDA event out (it cannot be copied)."""
        if self.ready is not None:
            self.ready.synchronize()
        return {**self.__dict__, "ready": None}

    def refresh_index(self) -> None:
        """Rebuild the scatter index of the valid entries (once per re-tiering, not per step), and
        row 0's live count: reading it from ``valid`` (on the GPU) every step would sync every layer."""
        self.live_row0 = int(self.valid[0].sum())
        self.index = TokenIndex(self.valid, self.slot)

    @property
    def nbytes(self) -> int:
        """Bytes allocated (and copied by a prefetch), padding and holes included."""
        return 2 * self.keys.numel() * self.keys.element_size()

    @property
    def live_nbytes(self) -> int:
        """Bytes of the tokens that are really in the DDR tier now."""
        per_token = 2 * self.keys.shape[1] * self.keys.shape[3] * self.keys.element_size()
        return int(self.valid.sum()) * per_token


def to_host(dk: torch.Tensor, dv: torch.Tensor):
    """(host keys, host values, ready event or None): pinned and asynchronous on CUDA, a copy on CPU."""
    if dk.device.type != "cuda":
        return dk.contiguous(), dv.contiguous(), None
    host_k = torch.empty(dk.shape, dtype=dk.dtype, pin_memory=True)
    host_v = torch.empty(dv.shape, dtype=dv.dtype, pin_memory=True)
    host_k.copy_(dk, non_blocking=True)
    host_v.copy_(dv, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(dk.device))
    return host_k, host_v, ready


def compact(chunks: list) -> list:
    """Merge all but the newest chunk into one when holes/padding or chunk count grow too large."""
    if len(chunks) < 2:
        return chunks
    stored = sum(c.keys.shape[2] for c in chunks)
    live = sum(int(c.valid[0].sum()) for c in chunks)
    if len(chunks) <= MAX_DDR_CHUNKS and stored - live <= COMPACT_WASTE * max(live, 1):
        return chunks
    old, newest = chunks[:-1], chunks[-1]
    for chunk in old:
        if chunk.ready is not None:
            chunk.ready.synchronize()  # written R steps ago: long finished
    all_k = torch.cat([c.keys for c in old], dim=2)
    all_v = torch.cat([c.values for c in old], dim=2)
    valid = torch.cat([c.valid for c in old], dim=1)
    slots = torch.cat([c.slot for c in old], dim=1)
    index, index_valid = padded_index(valid)
    host_index = index.to(all_k.device)
    merged_k = gather_tokens(all_k, host_index).contiguous()
    merged_v = gather_tokens(all_v, host_index).contiguous()
    if old[0].keys.is_pinned():
        merged_k, merged_v = merged_k.pin_memory(), merged_v.pin_memory()
    merged = DDRChunk(merged_k, merged_v, index_valid, slots.gather(1, index))
    return [merged, newest]


def pinned_down(stream, query: torch.Tensor, masks: list):
    """(query, masks, ready event) copied to pinned host memory on ``stream`` once the compute stream's
    work so far is done: what host-attention sends down for the host's part of attention."""
    stream.wait_stream(torch.cuda.current_stream(query.device))
    with torch.cuda.stream(stream):
        out = []
        for t in (query, *masks):
            if t is None:
                out.append(None)
                continue
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            out.append(host)
        ready = torch.cuda.Event()
        ready.record(stream)
    return out[0], out[1:], ready
