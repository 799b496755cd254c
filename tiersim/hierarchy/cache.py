"""TieredCache: a transformers ``Cache`` that keeps each layer's KV in four tiers.

Per layer the retained tokens (everything not evicted) keep their original order; each tier
stores its own tokens and the slot they occupy in that order:

* HBM: a device tensor, new tokens appended to it.
* DDR: host-memory chunks (pinned when the model is on CUDA). How they reach attention is the
  strategy's (:mod:`tiersim.hierarchy.access`): by default (``prefetch``) the chunks of layer l+1
  are copied into a device staging buffer on a side stream while layer l computes (two buffers,
  alternating), so the layer's attention sees them at full precision.
* compressed: KIVI-style int8/int4 codes on the device, dequantized for attention.
* evicted: gone; only a count remains.

Each :class:`TieredLayer` owns its tiers (append, assemble, re-tier); ``update`` hands the new
tokens to the layer. With ``prefetch`` the layer reassembles its keys and values in original order
(a scatter of each tier into one buffer): with ``compressed = evict = 0`` the tensor attention sees is element for
element the one ``DynamicCache`` would give, so generation is bit-identical whatever the HBM
ratio. The attention probabilities come back through ``observe_attention`` (see
:mod:`tiersim.hierarchy.scoring`); they accumulate into each token's score, and at the policy's
re-tiering points the layer is re-tiered right after its attention, so the next forward's mask
already sees the new length. Only newly demoted tokens are copied down to DDR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from tiersim.errors import TiersimError
from tiersim.hierarchy import scoring
from tiersim.hierarchy.access import make_access
from tiersim.hierarchy.config import TIERS, TierConfig
from tiersim.hierarchy.policy import COMPRESSED, DDR, EVICTED, HBM, LayerView, assign_tiers
from tiersim.hierarchy.quant import QuantizedKV, quantize_kv
from tiersim.hierarchy.registry import make_policy
from tiersim.hierarchy.record import StepRecord

# Chunks of the DDR tier are compacted when padding/holes exceed this share, or when there are too many.
_COMPACT_WASTE = 0.25
_MAX_DDR_CHUNKS = 4


def _rows(batch: int, device) -> torch.Tensor:
    return torch.arange(batch, device=device)[:, None]


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D] at per-row token indices [B, m] -> [B, H, m, D] (a copy)."""
    if x.shape[0] == 1:
        return x.index_select(2, index[0])
    return x[_rows(x.shape[0], x.device), :, index].permute(0, 2, 1, 3)


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
            _scatter(keys, values, self.dense_slots, src_k, src_v)
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
                rows = _rows(keys.shape[0], keys.device)
                keys[rows, :, self.dense_slots] = 0
                values[rows, :, self.dense_slots] = 0
            return
        keys[self.flat_rows, :, self.flat_slots] = 0
        values[self.flat_rows, :, self.flat_slots] = 0


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

    def __post_init__(self):
        CacheLayerMixin.__init__(self)

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, dim = key_states.shape
        empty = key_states.new_empty((batch, heads, 0, dim))
        self.hbm_k, self.hbm_v = empty, empty.clone()
        self.keys, self.values = self.hbm_k, self.hbm_v
        long_empty = torch.empty((batch, 0), dtype=torch.long, device=self.device)
        self.comp_slot = long_empty
        self.hbm_slot = long_empty
        self.positions = long_empty
        self.tiers = torch.empty((batch, 0), dtype=torch.uint8, device=self.device)
        self.cumulative = torch.empty((batch, 0), dtype=torch.float32, device=self.device)
        self.is_initialized = True

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

    @property
    def num_compressed(self) -> int:
        return int((self.tiers[0] == COMPRESSED).sum())

    def get_seq_length(self) -> int:
        """Tokens seen (evicted ones included): transformers derives new tokens and positions from it."""
        return self.context_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The mask spans the retained tokens (what attention gets) plus the new queries."""
        return self.num_retained + query_length, 0

    def get_max_length(self) -> int:
        return -1

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
            self.hbm_k, self.hbm_v = _own_storage(key_states), _own_storage(value_states)
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

    def assemble(self, staged: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's retained keys/values in original order, every tier at its slot."""
        n = self.num_retained
        if self.hbm_k.shape[2] == n:
            # Everything is in HBM and HBM is in slot order: nothing to reassemble.
            return self.hbm_k, self.hbm_v
        batch, heads, _, dim = self.hbm_k.shape
        keys = self.hbm_k.new_empty((batch, heads, n, dim))
        values = self.hbm_v.new_empty((batch, heads, n, dim))
        _scatter(keys, values, self.hbm_slot, self.hbm_k, self.hbm_v)
        if self.comp is not None:
            ck, cv = self.comp.dequantize()
            self.comp_index.scatter(keys, values, ck.to(keys.dtype), cv.to(values.dtype))
        if self.residual_index is not None:
            self.residual_index.scatter(keys, values, self.residual_k, self.residual_v)
        for chunk, (sk, sv) in zip(self.ddr, staged):
            chunk.index.scatter(keys, values, sk, sv)
        return keys, values

    def device_tiers(self):
        """The tiers on the device as (keys, values, slots [B, m], valid [B, m] or None), each in its own
        storage: HBM, the dequantized compressed tokens, their full-precision residual."""
        tiers = [(self.hbm_k, self.hbm_v, self.hbm_slot, None)]
        if self.comp is not None:
            ck, cv = self.comp.dequantize()
            tiers.append((ck.to(self.dtype), cv.to(self.dtype), self.comp_index.slot, self.comp_index.valid))
        if self.residual_index is not None:
            index = self.residual_index
            tiers.append((self.residual_k, self.residual_v, index.slot, index.valid))
        return tiers

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
        """Quantized tokens that stay keep their codes; arrivals wait at full precision (a residual,
        as in KIVI) until some row holds ``quant_group`` of them, then are quantized together.

        Quantizing each re-tier's few arrivals as their own key scale group would cost a float32
        scale and minimum per channel for every one or two tokens, as much as the tokens themselves.
        Rows may hold different numbers of quantized and residual tokens (padded, ``valid``).
        """
        if not bool((new == COMPRESSED).any()):
            self.comp, self.comp_slot, self.comp_index = None, new_slot_of_old[:, :0], None
            self.residual_k = self.residual_v = self.residual_index = None
            return
        group = self.config.quant_group

        def staying(index: TokenIndex) -> torch.Tensor:
            safe = torch.where(index.valid, index.slot, torch.zeros_like(index.slot))
            return index.valid & (new.gather(1, safe) == COMPRESSED)

        # The residual: tokens that stay, then the arrivals (slots in the old order until the end).
        res_k, res_v, res_slot, res_valid = [], [], [], []
        if self.residual_index is not None:
            res_k.append(self.residual_k)
            res_v.append(self.residual_v)
            res_slot.append(self.residual_index.slot)
            res_valid.append(staying(self.residual_index))
        arriving, arriving_valid = padded_index((new == COMPRESSED) & (old != COMPRESSED))
        if arriving.shape[1]:
            res_k.append(gather_tokens(keys, arriving))
            res_v.append(gather_tokens(values, arriving))
            res_slot.append(arriving)
            res_valid.append(arriving_valid)
        comp, comp_slot, comp_valid = self.comp, None, None
        if comp is not None:
            comp_slot, comp_valid = self.comp_index.slot, staying(self.comp_index)
        self.residual_k = self.residual_v = self.residual_index = None
        if res_k:
            index, valid = padded_index(torch.cat(res_valid, dim=1))
            rk = gather_tokens(torch.cat(res_k, dim=2), index)
            rv = gather_tokens(torch.cat(res_v, dim=2), index)
            rslot = torch.cat(res_slot, dim=1).gather(1, index)
            if index.shape[1] >= group:  # some row has a full group: quantize every row's residual
                fresh = quantize_kv(rk, rv, bits=self.config.compressed_bits, group=group)
                comp = QuantizedKV.concat(comp, fresh)
                comp_slot = rslot if comp_slot is None else torch.cat((comp_slot, rslot), dim=1)
                comp_valid = valid if comp_valid is None else torch.cat((comp_valid, valid), dim=1)
            elif index.shape[1]:
                self.residual_k, self.residual_v = rk, rv
                self.residual_index = TokenIndex(valid, new_slot_of_old.gather(1, rslot))
        self.comp, self.comp_index = None, None
        self.comp_slot = new_slot_of_old[:, :0]
        if comp is not None:
            index, valid = padded_index(comp_valid)
            if index.shape[1]:
                self.comp = comp.select(index)  # drops the tokens that left, and their empty groups
                self.comp_slot = new_slot_of_old.gather(1, comp_slot.gather(1, index))
                self.comp_index = TokenIndex(valid, self.comp_slot)

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
            host_k, host_v, ready = _to_host(dk, dv)
            chunk = DDRChunk(host_k, host_v, arriving_valid, new_slot_of_old.gather(1, arriving), ready)
            self.bytes_d2h += chunk.nbytes
            chunks.append(chunk)
        chunks = _compact(chunks)
        for chunk in chunks:
            chunk.refresh_index()
        self.ddr = chunks
        self.staged = None  # the next step prefetches the new chunks



class TieredCache(Cache):
    """A transformers Cache placing each layer's tokens in HBM / DDR / compressed / evicted tiers.

    Usage: ``model.generate(ids, cache=TieredCache(TierConfig(hbm=0.5, ddr=0.5)))`` (``past_key_values=``
    before transformers 5.24; ``tiersim.compat.cache_kwargs`` picks the name).
    The model must use the ``"tiersim"`` attention implementation (``tiersim.models.load_model``
    sets it) whenever tokens leave HBM, since the policy ranks by attention scores.

    ``recorder``, when given, is called after every layer's attention with a :class:`StepRecord`
    (tier counts, moves, attention mass per tier): trace capture uses it. With
    ``record_attention`` the record also carries the step's attention row (positions and
    probabilities of the retained tokens, batch row 0) so other policies can be replayed offline.
    """

    def __init__(
        self,
        config: TierConfig | None = None,
        model=None,
        recorder: Callable[[StepRecord], None] | None = None,
        record_attention: bool = False,
    ):
        super().__init__(layers=[])
        self.config = config if config is not None else TierConfig()
        if not isinstance(self.config, TierConfig):
            raise TiersimError(f"TieredCache needs a TierConfig, got {type(self.config).__name__}")
        self.policy = make_policy(self.config)
        self.recorder = recorder
        self.record_attention = record_attention and recorder is not None
        self.needs_scores = self.config.offloads or recorder is not None or self.config.policy != "hierarchy"
        if model is not None:
            model_config = getattr(model, "config", model)
            check_model_supported(model_config)
            head_dim = _head_dim(model_config)
            if head_dim is not None:
                self._check_head_dim(head_dim)
        self.access = make_access(self.config.strategy, self.config.fetch_share)
        self.tokens_moved = {"hbm_to_ddr": 0, "ddr_to_hbm": 0, "to_compressed": 0, "from_compressed": 0, "evicted": 0}
        self.retiers = 0
        self._peak_layer_buffer = 0  # largest per-layer assembled K+V (one layer's buffer lives at a time)
        self._peak_scoring = 0  # largest scratch of one layer's scoring

    # -- transformers Cache API --------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(
                TieredLayer(index=len(self.layers), config=self.config, policy=self.policy, access=self.access)
            )
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            self._check_head_dim(key_states.shape[-1])
            layer.lazy_initialization(key_states, value_states)
        if layer.awaiting_scores and self.needs_scores:
            raise TiersimError(
                "TieredCache got no attention scores: load the model with attn_implementation='tiersim' "
                "(tiersim.models.load_model does; or call tiersim.hierarchy.enable_scoring(model))"
            )
        if self.needs_scores:
            scoring.set_listener(self, layer_idx)
            layer.awaiting_scores = True
        elif not layer.attention_checked:
            scoring.set_listener(self, layer_idx)  # once, so check_attention sees the layer
        keys, values = layer.update(key_states, value_states)
        full = keys.shape[2] == layer.num_retained  # the whole layer in token order (not host-attention's part)
        if keys is not layer.hbm_k:
            self._peak_layer_buffer = max(self._peak_layer_buffer, _nbytes(keys) + _nbytes(values))
        if self.needs_scores and full and self.access.complete_view:
            layer.last_full = (keys, values)
        nxt = layer_idx + 1 if layer_idx + 1 < len(self.layers) else 0
        if nxt != layer_idx:
            self.access.prefetch(self.layers[nxt])  # while this layer computes
        return keys, values

    @property
    def bytes_h2d(self) -> int:
        """Bytes sent host -> device so far (on CPU: what a GPU would move)."""
        return self.access.bytes_h2d

    @property
    def bytes_d2h(self) -> int:
        return self.access.bytes_d2h + sum(layer.bytes_d2h for layer in self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far, evicted ones included.

        transformers reads this as "tokens already processed": ``generate`` feeds only the tokens
        after it when a cache is reused, and a forward without ``position_ids`` starts RoPE there.
        The mask geometry uses the retained count instead (``get_mask_sizes``, ``get_query_offset``).
        """
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].context_len

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Slot of the first new query in the mask: after the retained tokens, not the tokens seen.

        The causal mask compares query and key slots; the keys attention gets are the retained
        ones followed by the new tokens, so the queries start at the retained count.
        """
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].num_retained

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        if layer_idx >= len(self.layers):
            return query_length, 0
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def reorder_cache(self, beam_idx):
        raise TiersimError("TieredCache does not support beam search (num_beams > 1); use greedy or sampling")

    def batch_repeat_interleave(self, repeats: int):
        raise TiersimError("TieredCache does not support num_return_sequences > 1 or beam expansion")

    def batch_select_indices(self, indices):
        raise TiersimError("TieredCache does not support batch selection (contrastive search, beams)")

    def crop(self, tokens_to_remove: int):
        raise TiersimError("TieredCache cannot be cropped (assisted/speculative decoding is not supported)")

    # -- checks --------------------------------------------------------------------------------
    def _check_head_dim(self, head_dim: int) -> None:
        """The compressed tier's channel groups must tile the head: refuse before the first re-tier does."""
        if self.config.compressed <= 0:
            return
        group = self.config.quant_group
        if head_dim % group and group < head_dim:
            divisors = [d for d in range(1, head_dim + 1) if head_dim % d == 0 and d >= 8] or [head_dim]
            raise TiersimError(
                f"TierConfig.quant_group={group} does not divide head_dim {head_dim}: the compressed tier "
                f"quantizes values in groups of quant_group channels (pick one of {', '.join(map(str, divisors))})"
            )
        if self.config.compressed_bits == 4 and head_dim % 2:
            raise TiersimError(f"4-bit compression packs two codes per byte: head_dim {head_dim} must be even")

    def check_attention(self, layer_idx: int, module, attention_kwargs: dict) -> None:
        """Refuse a sliding-window layer at its first attention (the cache keeps every token's slot).

        A cache built without ``model=`` has not seen the config; the ``"tiersim"`` attention calls
        this with the layer's module and arguments, where transformers passes the window.
        """
        if layer_idx >= len(self.layers) or self.layers[layer_idx].attention_checked:
            return
        window = attention_kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        if window:
            raise TiersimError(
                f"unsupported model: sliding-window attention (sliding_window={window}) in layer {layer_idx}; "
                "TieredCache supports full-attention decoders only"
            )
        self.layers[layer_idx].attention_checked = True

    # -- the scoring hook ----------------------------------------------------------------------
    def queries_to_score(self, layer_idx: int | None, q_len: int) -> int:
        """How many of this forward's queries the scoring attention should return probabilities for."""
        if not self.needs_scores or layer_idx is None or layer_idx >= len(self.layers):
            return 0
        layer = self.layers[layer_idx]
        if not layer.awaiting_scores:
            return 0
        if layer.step == 0 or layer.q_len > 1:
            wanted = self.policy.prefill_queries
            wanted = q_len if wanted is None else wanted
            return max(min(q_len, max(wanted, self.policy.recent_queries)), 1)
        return max(min(q_len, max(1, self.policy.recent_queries)), 1)

    def observe_attention(
        self, layer_idx: int, probs: torch.Tensor, visible: torch.Tensor | None = None, scratch_bytes: int = 0
    ) -> None:
        """Accumulate this step's attention into the scores; re-tier the layer when the policy says so.

        ``visible`` ([B, N] bool, optional) marks the keys the step's last query may see: at the
        prefill, the keys it hides are left padding, which the policy then never ranks above a real token.
        ``scratch_bytes`` is what computing ``probs`` allocated (float32 copies, logits, probabilities).
        """
        layer = self.layers[layer_idx]
        if not layer.awaiting_scores or probs.shape[-1] != layer.num_retained:
            return
        self._peak_scoring = max(self._peak_scoring, scratch_bytes)
        layer.awaiting_scores = False
        n = layer.num_retained
        probs = probs[..., :n]
        step = layer.step
        if step == 0 and visible is not None and not bool(visible.all()):
            layer.first_real = visible[:, :n].to(torch.int8).argmax(dim=1)
        if step == 0 or probs.shape[2] > 1:
            # A prompt (or a prompt chunk, or the new tokens of a continuation): its last queries.
            window = self.policy.prefill_queries
            scored = probs if window is None else probs[:, :, -window:, :]
            layer.cumulative.add_(scored.mean(dim=1).sum(dim=1))
            last = probs[:, :, -1, :].mean(dim=1)
        else:
            last = probs[:, :, -1, :].mean(dim=1)
            layer.cumulative.add_(last)
        if self.policy.recent_queries:
            layer.remember_queries(probs)
        mass = self._mass_by_tier(layer, last) if self.recorder is not None else None
        fetched = self.access.fetched_this_step(layer) if mass is not None else None
        if fetched is not None:
            # DDR tokens this step's attention saw (batch row 0); the row's n_ddr is counted after re-tiering
            mass["ddr_fetched"] = fetched
        if self.record_attention:
            mass["attn_positions"] = layer.positions[0].tolist()
            mass["attn_probs"] = last[0].tolist()
        moves = None
        if self.config.offloads or self.config.policy != "hierarchy":
            if self.policy.due(step):
                keys, values = layer.last_full or self.access.full_view(layer)
                moves, moved = layer.retier(keys, values)
                if moved:
                    self.retiers += 1
                    for key, value in moves.items():
                        self.tokens_moved[key] += value * layer.tiers.shape[0]
        layer.last_full = None
        if self.recorder is not None:
            self.recorder(self._record(layer_idx, layer, step, mass, moves))
        layer.step += 1

    def attend_split(self, layer_idx: int, query: torch.Tensor, attention_mask, scaling: float, n_queries: int):
        """The layer's attention output [B, q, Hq, D] when its strategy attends to the DDR tier where it
        lives (the probabilities, if wanted, go to ``observe_attention``); None: the stock attention."""
        layer = self.layers[layer_idx]
        if not self.access.host_attention or not layer.ddr:
            return None
        output, probs = self.access.attend(layer, query, attention_mask, scaling, n_queries)
        if n_queries:
            n = layer.num_retained
            visible = scoring.visible_keys(attention_mask, query.shape[0], n) if layer.step == 0 else None
            scratch = 2 * probs.numel() * probs.element_size() * max(1, query.shape[2] // n_queries)
            self.observe_attention(layer_idx, probs, visible=visible, scratch_bytes=scratch)
        return output

    def prepare_attention(self, layer_idx: int, query: torch.Tensor, attention_mask):
        """The mask attention should use: the strategy may fetch part of the DDR tier now that the query
        is known (``selective``) and hide the rest; otherwise ``attention_mask`` unchanged."""
        layer = self.layers[layer_idx]
        if not layer.ddr:
            return attention_mask
        return self.access.prepare(layer, query, attention_mask)

    # -- public inspection -------------------------------------------------------------------
    def tier_counts(self, layer_idx: int) -> dict[str, int]:
        """Tokens per tier for one layer (batch row 0; every row has the same counts)."""
        if layer_idx >= len(self.layers) or not self.layers[layer_idx].is_initialized:
            return {t: 0 for t in TIERS}
        layer = self.layers[layer_idx]
        tiers = layer.tiers[0]
        return {
            "hbm": int((tiers == HBM).sum()),
            "ddr": int((tiers == DDR).sum()),
            "compressed": int((tiers == COMPRESSED).sum()),
            "evicted": layer.n_evicted,
        }

    def stats(self) -> dict:
        """Bytes held now (whole batch, all layers) and bytes moved so far.

        ``bytes`` splits what the cache holds by role. On the compute device: ``hbm`` (the HBM
        tier), ``compressed`` (codes, scales, minimums, token -> group map, full-precision residual),
        ``staging`` (the DDR prefetch buffers), ``bookkeeping`` (per-token positions / tiers / scores /
        slots with their spare capacity, kept attention rows, tier indices); ``device_resident`` is
        their sum. On the host: ``ddr`` counts the tokens in the DDR tier, ``ddr_allocated`` adds the
        holes left by promotions until the chunks are compacted (the prefetch copies those too).
        Every figure is storage actually allocated (a view counts its whole buffer, once).

        ``peak_bytes`` holds what a step allocates on the device for a while, the largest so far:
        ``layer_buffer`` (one layer's reassembled K+V, alive while that layer attends; 0 while
        everything is in HBM), ``scoring`` (the float32 copies, logits and probabilities of one
        layer's scoring) and ``device`` = ``device_resident`` + both (layers run one at a time).
        """
        held = dict.fromkeys(("hbm", "compressed", "staging", "bookkeeping", "ddr", "ddr_allocated"), 0)
        seen: set[int] = set()

        def add(role: str, *tensors) -> None:
            for t in tensors:
                if t is None or t.numel() == 0:
                    continue
                storage = t.untyped_storage()
                if storage.data_ptr() in seen:
                    continue
                seen.add(storage.data_ptr())
                held[role] += storage.nbytes()

        for layer in self.layers:
            if not layer.is_initialized:
                continue
            add("hbm", layer.hbm_k, layer.hbm_v)
            if layer.comp is not None:
                add("compressed", *layer.comp.tensors())
            add("compressed", layer.residual_k, layer.residual_v)
            add("bookkeeping", *layer.columns.values(), layer.recent, layer.comp_slot, layer.first_real)
            for index in (layer.comp_index, layer.residual_index):
                if index is not None:
                    add("bookkeeping", *index.tensors())
            for chunk in layer.ddr:
                held["ddr"] += chunk.live_nbytes
                add("ddr_allocated", chunk.keys, chunk.values)
                add("bookkeeping", *chunk.index.tensors())
        for buffers in getattr(self.access, "staging", ()):
            if buffers is not None:
                add("staging", *buffers)
        held["device_resident"] = held["hbm"] + held["compressed"] + held["staging"] + held["bookkeeping"]
        peak = {"layer_buffer": self._peak_layer_buffer, "scoring": self._peak_scoring}
        peak["device"] = held["device_resident"] + peak["layer_buffer"] + peak["scoring"]
        return {
            "bytes": held,
            "peak_bytes": peak,
            "bytes_h2d": self.bytes_h2d,
            "bytes_d2h": self.bytes_d2h,
            "tokens_moved": dict(self.tokens_moved),
            "retiers": self.retiers,
            "ddr_fetched_share": self.access.fetched_share,
            "context_len": self.layers[0].context_len if self.layers else 0,
        }

    # -- internals: appending and assembling -----------------------------------------------------
    # -- internals: scores ----------------------------------------------------------------------
    @staticmethod
    def _mass_by_tier(layer: TieredLayer, last: torch.Tensor) -> dict:
        tiers = layer.tiers[0]
        p = last[0]
        ddr_p = p[tiers == DDR]
        mass = {
            "mass_hbm": float(p[tiers == HBM].sum()),
            "mass_ddr": float(ddr_p.sum()),
            "mass_compressed": float(p[tiers == COMPRESSED].sum()),
        }
        cover90 = cover99 = 0
        if ddr_p.numel():
            sorted_p = torch.sort(ddr_p, descending=True).values
            cum = torch.cumsum(sorted_p.double(), 0)
            total = cum[-1]
            if total > 0:
                cover90 = int(torch.searchsorted(cum, 0.9 * total)) + 1
                cover99 = int(torch.searchsorted(cum, 0.99 * total)) + 1
                cover90, cover99 = min(cover90, ddr_p.numel()), min(cover99, ddr_p.numel())
        mass["ddr_cover90"], mass["ddr_cover99"] = cover90, cover99
        return mass

    def _record(self, layer_idx: int, layer: TieredLayer, step: int, mass: dict, moves: dict | None) -> StepRecord:
        counts = self.tier_counts(layer_idx)
        moves = moves or {k: 0 for k in self.tokens_moved}
        return StepRecord(
            step=step,
            layer=layer_idx,
            context_len=layer.context_len,
            n_hbm=counts["hbm"],
            n_ddr=counts["ddr"],
            n_compressed=counts["compressed"],
            n_evicted=counts["evicted"],
            hbm_to_ddr=moves["hbm_to_ddr"],
            ddr_to_hbm=moves["ddr_to_hbm"],
            to_compressed=moves["to_compressed"],
            from_compressed=moves["from_compressed"],
            newly_evicted=moves["evicted"],
            **mass,
        )

def _scatter(keys, values, slot, src_k, src_v) -> None:
    if src_k.shape[2] == 0:
        return
    if keys.shape[0] == 1:
        keys.index_copy_(2, slot[0], src_k)
        values.index_copy_(2, slot[0], src_v)
        return
    rows = _rows(keys.shape[0], keys.device)
    keys[rows, :, slot] = src_k.permute(0, 2, 1, 3)
    values[rows, :, slot] = src_v.permute(0, 2, 1, 3)

def _to_host(dk: torch.Tensor, dv: torch.Tensor):
    if dk.device.type != "cuda":
        return dk.contiguous(), dv.contiguous(), None
    host_k = torch.empty(dk.shape, dtype=dk.dtype, pin_memory=True)
    host_v = torch.empty(dv.shape, dtype=dv.dtype, pin_memory=True)
    host_k.copy_(dk, non_blocking=True)
    host_v.copy_(dv, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(dk.device))
    return host_k, host_v, ready

def _compact(chunks: list) -> list:
    """Merge all but the newest chunk into one when holes/padding or chunk count grow too large."""
    if len(chunks) < 2:
        return chunks
    stored = sum(c.keys.shape[2] for c in chunks)
    live = sum(int(c.valid[0].sum()) for c in chunks)
    if len(chunks) <= _MAX_DDR_CHUNKS and stored - live <= _COMPACT_WASTE * max(live, 1):
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


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    return t if t.untyped_storage().nbytes() == _nbytes(t) else t.clone()


def _head_dim(model_config) -> int | None:
    text_config = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
    head_dim = getattr(text_config, "head_dim", None)
    heads = getattr(text_config, "num_attention_heads", None)
    if head_dim is None and heads:
        head_dim = getattr(text_config, "hidden_size", 0) // heads or None
    return head_dim


def check_model_supported(model_config) -> None:
    """Refuse layer types whose cache is not one growing full-attention KV (sliding windows, linear attention)."""
    text_config = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
    layer_types = getattr(text_config, "layer_types", None) or []
    odd = sorted({t for t in layer_types if t != "full_attention"})
    if odd:
        raise TiersimError(
            f"unsupported model: layer types {', '.join(odd)} (TieredCache supports full-attention decoders only)"
        )
    window = getattr(text_config, "sliding_window", None)
    uses_window = getattr(text_config, "use_sliding_window", window is not None)
    if window is not None and uses_window:
        raise TiersimError(
            f"unsupported model: sliding-window attention (sliding_window={window}); "
            "TieredCache supports full-attention decoders only"
        )
    if getattr(text_config, "attention_chunk_size", None):
        raise TiersimError("unsupported model: chunked attention; TieredCache supports full-attention decoders only")
