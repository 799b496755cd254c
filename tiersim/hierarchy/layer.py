"""One layer of the tiered cache: its tiers' storage, its per-token bookkeeping, its scores and its re-tiering.

The transformers ``cache_utils`` shape: the :class:`~tiersim.hierarchy.cache.TieredCache` is a loop
over these layers. A layer appends each forward's tokens to HBM, hands attention what its strategy
(``access``) asks for, accumulates the attention it receives into each token's score, and, at the
policy's re-tiering points, moves tokens between tiers (only newly demoted tokens are copied down).
Tokens keep their original order across tiers: each tier stores its tokens and their slots in that
order, and :meth:`TieredLayer.assemble` scatters them back into one buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import CacheLayerMixin

from tiersim.errors import TiersimError
from tiersim.hierarchy import compressed
from tiersim.hierarchy.config import TierConfig
from tiersim.hierarchy.ddr import DDRChunk, compact, to_host
from tiersim.hierarchy.index import (
    TokenIndex,
    empty_columns,
    gather_tokens,
    masked_index,
    nbytes,
    own_storage,
    padded_index,
    scatter_tokens,
)
from tiersim.hierarchy.policy import COMPRESSED, DDR, EVICTED, HBM, LayerView, assign_tiers
from tiersim.hierarchy.quant import QuantizedKV


@dataclass
class TieredLayer(CacheLayerMixin):
    """One layer's tiers and the per-token bookkeeping the policy needs."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    hbm_k: torch.Tensor | None = None
    hbm_v: torch.Tensor | None = None
    ddr: list = field(default_factory=list)  # list[DDRChunk]
    comp: QuantizedKV | None = None
    comp_slot: torch.Tensor | None = None  # [B, n_comp] (padded where rows hold fewer)
    comp_index: TokenIndex | None = None
    # The compressed tier's full-precision residual: arrivals waiting for a full quantization group.
    residual_k: torch.Tensor | None = None
    residual_v: torch.Tensor | None = None
    residual_index: TokenIndex | None = None
    # Per-token columns live in buffers with spare capacity, so a decode step writes one column
    # in place instead of reallocating four tensors: positions [B, N] long, tiers [B, N] uint8,
    # cumulative [B, N] float32 (retained order) and hbm_slot [B, n_hbm] long.
    columns: dict = field(default_factory=dict)
    lengths: dict = field(default_factory=dict)
    recent: torch.Tensor | None = None  # [B, Hq, r, N] float32
    n_evicted: int = 0
    context_len: int = 0
    prompt_len: int = 0  # tokens fed before the first one-token forward (all chunks of a chunked prefill)
    step: int = 0
    q_len: int = 0  # tokens of the current forward
    first_real: torch.Tensor | None = None  # [B] position of each row's first real token (left padding)
    decoding: bool = False
    attention_checked: bool = False  # check_attention ran for this layer
    awaiting_scores: bool = False
    last_full: tuple | None = None
    staged: list | None = None  # device copies of the DDR chunks for this step (CUDA)
    prefetch_event: object | None = None
    index: int = 0  # the layer's index in the model
    config: TierConfig | None = None
    policy: object | None = None
    access: object | None = None  # DDRAccess: how the DDR tier reaches attention (shared by the cache's layers)
    bytes_d2h: int = 0  # demotions copied down to DDR
    peak_buffer: int = 0  # largest transient device buffer of one step (see ``note_buffer``)

    def __post_init__(self):
        CacheLayerMixin.__init__(self)

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, dim = key_states.shape
        empty = key_states.new_empty((batch, heads, 0, dim))
        self.hbm_k, self.hbm_v = empty, empty.clone()
        self.keys, self.values = self.hbm_k, self.hbm_v
        self.comp_slot = empty_columns(batch, self.device)
        self.hbm_slot = empty_columns(batch, self.device)
        self.positions = empty_columns(batch, self.device)
        self.tiers = empty_columns(batch, self.device, torch.uint8)
        self.cumulative = empty_columns(batch, self.device, torch.float32)
        self.is_initialized = True

    def __getstate__(self) -> dict:
        """A copy leaves out this step's staged prefetch (CUDA views and event): it prefetches anew."""
        return {**self.__dict__, "staged": None, "prefetch_event": None}

    def reset(self) -> None:
        """Refused: one layer cannot forget its tokens while the others and the mask remember them."""
        raise TiersimError("reset the whole TieredCache (cache.reset()), not one of its layers")

    @property
    def batch_size(self) -> int:
        return self.hbm_k.shape[0]

    # -- growable per-token columns --------------------------------------------------------------
    def _get(self, name: str) -> torch.Tensor:
        return self.columns[name][:, : self.lengths[name]]

    def _set(self, name: str, value: torch.Tensor) -> None:
        self.columns[name] = value
        self.lengths[name] = value.shape[1]

    def extend(self, name: str, count: int, fill) -> None:
        """Append ``count`` columns holding ``fill`` (a scalar, or a start value when fill is a range)."""
        buf, n = self.columns[name], self.lengths[name]
        if n + count > buf.shape[1]:
            grown = buf.new_empty((buf.shape[0], max(2 * buf.shape[1], n + count, 64)))
            grown[:, :n] = buf[:, :n]
            self.columns[name] = buf = grown
        target = buf[:, n : n + count]
        if isinstance(fill, range):
            if count == 1:
                target.fill_(fill.start)
            else:
                target.copy_(torch.arange(fill.start, fill.start + count, device=buf.device).expand_as(target))
        else:
            target.fill_(fill)
        self.lengths[name] = n + count

    positions = property(lambda self: self._get("positions"), lambda self, v: self._set("positions", v))
    tiers = property(lambda self: self._get("tiers"), lambda self, v: self._set("tiers", v))
    cumulative = property(lambda self: self._get("cumulative"), lambda self, v: self._set("cumulative", v))
    hbm_slot = property(lambda self: self._get("hbm_slot"), lambda self, v: self._set("hbm_slot", v))

    # -- sizes -------------------------------------------------------------------------------
    @property
    def num_retained(self) -> int:
        return self.lengths.get("positions", 0)

    @property
    def num_ddr(self) -> int:
        return sum(c.live_row0 for c in self.ddr)

    def get_seq_length(self) -> int:
        """Tokens seen (evicted ones included): transformers derives new tokens and positions from it."""
        return self.context_len

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        """The mask spans the retained tokens plus the new queries (a count, or before transformers 5.3
        the queries' ``cache_position`` tensor)."""
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.num_retained + query_length, 0

    def get_max_length(self) -> int:  # no fixed capacity; transformers before 5.3 asks get_max_cache_shape
        return -1

    get_max_cache_shape = get_max_length

    def update(self, key_states, value_states, *args, **kwargs):
        """Append the new tokens; return what attention gets (the layer's ``access`` decides)."""
        self.append(key_states, value_states)
        return self.access.attention_inputs(self)

    # -- the layer's own work: append, assemble, re-tier ------------------------------------
    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        q_len = key_states.shape[2]
        n = self.num_retained
        if self.hbm_k.shape[2] == 0:
            # Keep the tokens, not a larger buffer they may be a view of (a fused QKV projection).
            self.hbm_k, self.hbm_v = own_storage(key_states), own_storage(value_states)
        else:
            self.hbm_k = torch.cat((self.hbm_k, key_states), dim=2)
            self.hbm_v = torch.cat((self.hbm_v, value_states), dim=2)
        self.extend("hbm_slot", q_len, range(n, n + q_len))
        self.extend("positions", q_len, range(self.context_len, self.context_len + q_len))
        self.extend("tiers", q_len, HBM)
        self.extend("cumulative", q_len, 0.0)
        if self.recent is not None:
            pad = self.recent.new_zeros((*self.recent.shape[:3], q_len))
            self.recent = torch.cat((self.recent, pad), dim=3)
        self.q_len = q_len
        if q_len == 1 and self.step > 0:
            self.decoding = True
        if not self.decoding:
            self.prompt_len += q_len
        self.context_len += q_len
        self.keys, self.values = self.hbm_k, self.hbm_v

    def device_tiers(self) -> list:
        """Every tier on the device, in its own storage: HBM, the dequantized compressed tokens, their
        full-precision residual, as (keys, values, slots [B, m], valid [B, m] or None, TokenIndex or None).

        The one list of what attention must see besides the DDR tier: ``assemble`` scatters it, the
        strategies that attend where the tokens live (host-attention, hybrid) attend to it directly.
        """
        tiers = [(self.hbm_k, self.hbm_v, self.hbm_slot, None, None)]
        if self.comp is not None:
            ck, cv = self.comp.dequantize()
            index = self.comp_index
            tiers.append((ck.to(self.dtype), cv.to(self.dtype), index.slot, index.valid, index))
        if self.residual_index is not None:
            index = self.residual_index
            tiers.append((self.residual_k, self.residual_v, index.slot, index.valid, index))
        return tiers

    def assemble(self, staged: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's retained keys/values in original order: every device tier and the ``staged``
        device copies of the DDR chunks at their slots (DDR slots left unset when ``staged`` is empty)."""
        n = self.num_retained
        if self.hbm_k.shape[2] == n:
            # Everything is in HBM and HBM is in slot order: nothing to reassemble.
            return self.hbm_k, self.hbm_v
        batch, heads, _, dim = self.hbm_k.shape
        keys = self.hbm_k.new_empty((batch, heads, n, dim))
        values = self.hbm_v.new_empty((batch, heads, n, dim))
        self.note_buffer(2 * nbytes(keys))
        for tier_k, tier_v, slots, _, index in self.device_tiers():
            if index is None:
                scatter_tokens(keys, values, slots, tier_k, tier_v)
            else:
                index.scatter(keys, values, tier_k, tier_v)
        for chunk, (sk, sv) in zip(self.ddr, staged):
            chunk.index.scatter(keys, values, sk, sv)
        return keys, values

    def note_buffer(self, size: int) -> None:
        """Record a transient device buffer of ``size`` bytes the layer's step allocates (its peak is
        ``stats()['peak_bytes']['layer_buffer']``): every assembly, every per-step dequantized copy."""
        self.peak_buffer = max(self.peak_buffer, size)

    # -- scores ----------------------------------------------------------------------------------
    def accumulate_scores(self, probs: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
        """Add this step's attention [B, Hq, q, N] to each token's score; the last query's row [B, N].

        ``visible`` (prefill only) marks the keys the last query may see: the ones it hides are left
        padding, which the policy then never ranks above a real token.
        """
        n = self.num_retained
        probs = probs[..., :n]
        if self.step == 0 and visible is not None and not bool(visible.all()):
            self.first_real = visible[:, :n].to(torch.int8).argmax(dim=1)
        last = probs[:, :, -1, :].mean(dim=1)
        if self.step == 0 or probs.shape[2] > 1:
            # A prompt (or a prompt chunk, or the new tokens of a continuation): its last queries.
            window = self.policy.prefill_queries
            scored = probs if window is None else probs[:, :, -window:, :]
            self.cumulative.add_(scored.mean(dim=1).sum(dim=1))
        else:
            self.cumulative.add_(last)
        if self.policy.recent_queries:
            self.remember_queries(probs)
        return last

    def retier_if_due(self) -> tuple[dict | None, bool]:
        """Re-tier when the policy says this step is a re-tiering point: (moves or None, anything moved)."""
        if not (self.config.offloads or self.config.policy != "hierarchy") or not self.policy.due(self.step):
            return None, False
        keys, values = self.last_full or self.access.full_view(self)
        return self.retier(keys, values)

    def remember_queries(self, probs: torch.Tensor) -> None:
        r = self.policy.recent_queries
        rows = probs[:, :, -r:, :].float()
        if self.recent is None or self.step == 0:
            self.recent = rows
        else:
            self.recent = torch.cat((self.recent, rows), dim=2)[:, :, -r:, :]

    def retier(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[dict, bool]:
        """Move tokens between tiers per the policy, given the whole layer in token order (``keys``,
        ``values``); returns the moves (batch row 0) and whether anything moved."""
        view = LayerView(
            positions=self.positions,
            cumulative=self.cumulative,
            recent_probs=self.recent,
            keys=keys if self.policy.needs_keys else None,
            context_len=self.context_len,
            prompt_len=self.prompt_len,
            step=self.step,
            num_kv_heads=keys.shape[1],
            first_real=self.first_real,
        )
        old = self.tiers
        new = assign_tiers(self.policy, view, self.n_evicted)
        moves = {
            "hbm_to_ddr": int(((old[0] == HBM) & (new[0] == DDR)).sum()),
            "ddr_to_hbm": int(((old[0] == DDR) & (new[0] == HBM)).sum()),
            "to_compressed": int(((old[0] != COMPRESSED) & (new[0] == COMPRESSED)).sum()),
            "from_compressed": int(((old[0] == COMPRESSED) & (new[0] != COMPRESSED) & (new[0] != EVICTED)).sum()),
            "evicted": int((new[0] == EVICTED).sum()),
        }
        if torch.equal(old, new):
            return moves, False
        keep = new != EVICTED
        n_keep = int(keep[0].sum())
        new_slot_of_old = torch.cumsum(keep, dim=1) - 1

        # HBM: gathered from the assembled view (promotions arrived with this step's prefetch).
        hbm_idx = masked_index(new == HBM, int((new[0] == HBM).sum()))
        self.hbm_k = gather_tokens(keys, hbm_idx)
        self.hbm_v = gather_tokens(values, hbm_idx)
        self.hbm_slot = new_slot_of_old.gather(1, hbm_idx)

        self._retier_compressed(keys, values, old, new, new_slot_of_old)
        self._retier_ddr(keys, values, old, new, new_slot_of_old)

        self.positions = self.positions[keep].view(-1, n_keep)
        self.cumulative = self.cumulative[keep].view(-1, n_keep)
        if self.recent is not None:
            b, h, r, _ = self.recent.shape
            self.recent = self.recent.permute(0, 3, 1, 2)[keep].view(b, n_keep, h, r).permute(0, 2, 3, 1)
        self.tiers = new[keep].view(-1, n_keep)
        self.n_evicted += moves["evicted"]
        self.keys, self.values = self.hbm_k, self.hbm_v
        return moves, True

    def _retier_compressed(self, keys, values, old, new, new_slot_of_old) -> None:
        """The compressed tier's own rule (:func:`tiersim.hierarchy.compressed.retier`)."""
        state = compressed.retier(
            compressed.CompressedTier(self.comp, self.comp_index, self.residual_k, self.residual_v, self.residual_index),
            keys, values, old, new, new_slot_of_old, self.config.compressed_bits, self.config.quant_group,
        )
        self.comp, self.comp_index = state.comp, state.comp_index
        self.residual_k, self.residual_v, self.residual_index = state.residual_k, state.residual_v, state.residual_index
        self.comp_slot = state.comp_index.slot if state.comp_index is not None else empty_columns(new.shape[0], new.device)

    def _retier_ddr(self, keys, values, old, new, new_slot_of_old) -> None:
        chunks = []
        for chunk in self.ddr:
            safe_slot = torch.where(chunk.valid, chunk.slot, torch.zeros_like(chunk.slot))
            chunk.valid = chunk.valid & (new.gather(1, safe_slot) == DDR)
            chunk.slot = new_slot_of_old.gather(1, safe_slot)
            if bool(chunk.valid.any()):
                chunks.append(chunk)
        arriving, arriving_valid = padded_index((new == DDR) & (old != DDR))
        if arriving.shape[1]:
            dk = gather_tokens(keys, arriving)
            dv = gather_tokens(values, arriving)
            host_k, host_v, ready = to_host(dk, dv)
            chunk = DDRChunk(host_k, host_v, arriving_valid, new_slot_of_old.gather(1, arriving), ready)
            self.bytes_d2h += chunk.nbytes
            chunks.append(chunk)
        chunks = compact(chunks)
        for chunk in chunks:
            chunk.refresh_index()
        self.ddr = chunks
        self.staged = None  # the next step prefetches the new chunks
