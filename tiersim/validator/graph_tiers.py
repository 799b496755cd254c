"""Static-shape tier buffers for one (batch, context, split) point: what a captured CUDA graph reads and writes.

A CUDA graph replays fixed kernels on fixed addresses, so every tier lives in a buffer sized once for
the whole run (``context + max_steps`` tokens, each tier for its largest count in the run): per layer
the HBM tier on the device, the DDR tier in host memory (pinned on CUDA, so its H2D copies are DMA the
graph can hold), the compressed tier in the cache's quantized layout (:mod:`graph_compressed`) and, shared
by the layers, two device staging buffers (layer l+1 is copied into one while layer l reads the other),
the token-ordered buffer attention reads, the attention mask over it and the counters a step advances.
Unused capacity points at one extra "trash" slot that the mask always hides. Tokens keep their slot
(their position) for the whole run: an evicted token's slot is masked (per layer and row, since each
evicts its own tokens), not compacted away as the cache compacts its retained order.

Membership is the hierarchy's own: :func:`tiersim.hierarchy.policy.assign_tiers` (whose counts are
``tier_targets``) over the retained tokens' cumulative attention score, from the policy ``make_policy``
builds, exactly as :class:`~tiersim.hierarchy.cache.TieredCache` re-tiers; the compressed tier follows the
cache's rule (:func:`tiersim.hierarchy.compressed.retier`). Re-tiering rewrites the buffers in place
(same storage, so a captured graph stays valid) and moves across the link only what changed:
demotions D2H into the DDR tier's holes, promotions H2D.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiersim.errors import TiersimError
from tiersim.hierarchy.config import TierConfig, tier_targets
from tiersim.hierarchy.index import batch_rows, gather_tokens, masked_index, scatter_tokens
from tiersim.hierarchy.policy import COMPRESSED, DDR, EVICTED, HBM, LayerView, assign_tiers
from tiersim.hierarchy.registry import make_policy
from tiersim.hierarchy.support import check_head_dim
from tiersim.validator.graph_compressed import StaticCompressed


def protected_count(config: TierConfig, context: int) -> int:
    """Tokens pinned to HBM in an unpadded context of ``context`` tokens (sinks and recent window)."""
    return min(context, config.sink_tokens + config.recent_window)


def targets(config: TierConfig, context: int) -> dict[str, int]:
    """The policy's token count per tier at ``context`` tokens (``tier_targets``, unpadded batch)."""
    return tier_targets(config, context, protected_count(config, context))


def capacities(config: TierConfig, first: int, last: int) -> dict[str, int]:
    """The policy's largest count of each tier at any context length from ``first`` to ``last``."""
    caps = {t: 0 for t in ("hbm", "ddr", "compressed", "evicted")}
    for t in range(first, last + 1):
        for tier, n in targets(config, t).items():
            caps[tier] = max(caps[tier], n)
    return caps


HOST_STRATEGIES = ("host-attention", "hybrid")  # strategies whose step attends the DDR tier where it lives


def fetched_share(strategy: str, fetch_share: float = 1.0) -> float:
    """The share of the DDR tier a step of ``strategy`` fetches to the device, as a point records it whatever its
    strategy: all (prefetch, 1.0), none (host attention, 0.0; TierConfig's ``fetch_share`` keeps its unused
    default 1.0 there), or hybrid's ``fetch_share``."""
    if strategy == "hybrid":
        return float(fetch_share)
    return 0.0 if strategy in HOST_STRATEGIES else 1.0


def fetched_capacity(config: TierConfig, cap_ddr: int) -> int:
    """DDR buffer entries one layer's step copies to the device: all (prefetch), none (host attention), or hybrid's
    ``fetch_share`` of the buffer's capacity (static shapes: the capacity, not the tokens held; its unused entries
    are the buffer's tail, so the fetched part holds a little fewer tokens than the share of those held)."""
    if config.strategy == "hybrid":
        return round(config.fetch_share * cap_ddr)
    return 0 if config.strategy in HOST_STRATEGIES else cap_ddr


def check_config(config: TierConfig, head_dim: int) -> None:
    """Refuse, in one line, what the static buffers do not hold."""
    if config.policy != "hierarchy":
        raise TiersimError(f"the graph executor ranks by the hierarchy's score; policy {config.policy!r} is not built")
    check_head_dim(config, head_dim)


@dataclass
class LayerTiers:
    """One layer's tiers in static buffers; entries past ``n_hbm`` / ``n_ddr`` are unused (slot = trash)."""

    hbm_k: torch.Tensor  # device [B, H, cap_hbm, D]
    hbm_v: torch.Tensor
    hbm_slots: torch.Tensor  # device long [B, cap_hbm]: the token (slot) each HBM entry holds
    ddr_k: torch.Tensor  # host [B, H, cap_ddr, D], pinned on CUDA
    ddr_v: torch.Tensor
    ddr_slots: torch.Tensor  # device long [B, cap_ddr]
    tiers: torch.Tensor  # device uint8 [B, cap_tokens]: tier code per token
    cumulative: torch.Tensor  # device float32 [B, cap_tokens + 1]: score per token (+ the trash slot)
    mask: torch.Tensor  # device bool [B or 1, 1, 1, cap_tokens + 1]: the tokens attention sees
    comp: StaticCompressed | None = None
    n_hbm: int = 0
    n_ddr: int = 0
    n_evicted: int = 0


class TierBuffers:
    """Every buffer of one point, allocated once; :meth:`load` places a prefill, :meth:`retier` re-places.

    ``host(shape, dtype)``, when given, hands out the DDR tier's host tensors (uninitialised), e.g. views of one
    pinned arena shared by a grid's points; by default each is its own (pinned on CUDA) allocation.
    """

    def __init__(self, config: TierConfig, num_layers: int, batch: int, kv_heads: int, head_dim: int,
                 context: int, max_steps: int, device, dtype, host=None) -> None:
        check_config(config, head_dim)
        self.config, self.policy = config, make_policy(config)
        self.device, self.dtype = torch.device(device), dtype
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self.context, self.prompt_len = context, context
        self.cap_tokens = context + max_steps
        self.trash = self.cap_tokens  # the slot unused entries write to; always masked
        caps = capacities(config, context, self.cap_tokens)
        self.cap_ddr, self.cap_comp = caps["ddr"], caps["compressed"]
        # HBM gains one token a step and gives tokens up only at a re-tiering: size it for the fewest elsewhere.
        self.cap_hbm = self.cap_tokens - min(t - targets(config, t)["hbm"] for t in range(context, self.cap_tokens + 1))
        self.evicts = caps["evicted"] > 0
        self.pinned = self.device.type == "cuda"
        self._host = host  # (shape, dtype) -> a zeroed host tensor (graph_run's pinned arena), or None
        dev, b, h, d = self.device, batch, kv_heads, head_dim
        slots = self.cap_tokens + 1
        self.mask = torch.zeros((1, 1, 1, slots), dtype=torch.bool, device=dev)  # every layer's, without eviction
        self.rows = batch_rows(batch, dev)  # made once: the captured step indexes rows with it
        retiers = 1 + max_steps // config.retier_every
        self.layers = [self._layer(retiers) for _ in range(num_layers)]
        self.masks = [lt.mask for lt in self.layers] if self.evicts else [self.mask]
        # Device buffers only the step that reads them gets (at batch 64 x 8K each is ~1 GB): staging for what is
        # fetched (none for host attention, hybrid's share), the token-ordered buffer for prefetch's attention (the
        # host strategies attend the tiers in place; their re-tiering assembles a layer in a transient one).
        self.n_stage = fetched_capacity(config, self.cap_ddr)
        self.staging = [(torch.zeros((b, h, self.n_stage, d), device=dev, dtype=dtype),
                         torch.zeros((b, h, self.n_stage, d), device=dev, dtype=dtype))
                        for _ in range(2 if self.n_stage else 0)]
        self.assembled = None
        if self.assembles and config.strategy not in HOST_STRATEGIES:
            self.assembled = self._token_ordered()
        self.n_seen = 0  # tokens in the cache (host mirror of n_seen_t)
        self.n_seen_t = torch.zeros(1, dtype=torch.long, device=dev)
        self.hbm_len_t = torch.zeros(1, dtype=torch.long, device=dev)  # every layer holds as many HBM tokens
        self.position = self.n_seen_t.view(1, 1)  # the next token's position id (a view: advances with it)
        self.retiers, self.bytes_d2h, self.bytes_h2d_retier = 0, 0, 0

    def _token_ordered(self):
        """K and V [B, H, cap_tokens + 1, D] on the device, zeroed: a layer in token order (slot = position)."""
        shape = (self.batch, self.kv_heads, self.cap_tokens + 1, self.head_dim)
        return tuple(torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(2))

    def _layer(self, retiers: int) -> LayerTiers:
        dev, b, h, d, dt = self.device, self.batch, self.kv_heads, self.head_dim, self.dtype

        def host(shape):
            if self._host is not None:
                return self._host(shape, dt)
            return torch.zeros(shape, dtype=dt, pin_memory=self.pinned)

        comp = None
        if self.cap_comp:
            comp = StaticCompressed(self.config, b, h, d, self.cap_comp, retiers, dev, dt, self.trash)
        return LayerTiers(
            hbm_k=torch.zeros((b, h, self.cap_hbm, d), device=dev, dtype=dt),
            hbm_v=torch.zeros((b, h, self.cap_hbm, d), device=dev, dtype=dt),
            hbm_slots=torch.full((b, self.cap_hbm), self.trash, dtype=torch.long, device=dev),
            ddr_k=host((b, h, self.cap_ddr, d)), ddr_v=host((b, h, self.cap_ddr, d)),
            ddr_slots=torch.full((b, self.cap_ddr), self.trash, dtype=torch.long, device=dev),
            tiers=torch.zeros((b, self.cap_tokens), dtype=torch.uint8, device=dev),
            cumulative=torch.zeros((b, self.cap_tokens + 1), dtype=torch.float32, device=dev),
            mask=(torch.zeros((b, 1, 1, self.cap_tokens + 1), dtype=torch.bool, device=dev) if self.evicts
                  else self.mask),
            comp=comp,
        )

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def offloads(self) -> bool:
        """Whether any layer may hold DDR tokens during the run (the step's copies; decided once)."""
        return self.cap_ddr > 0

    @property
    def assembles(self) -> bool:
        """Whether a token may be anywhere but HBM (then attention reads the token-ordered buffer)."""
        return bool(self.cap_ddr or self.cap_comp or self.evicts)

    @property
    def token_bytes(self) -> int:
        """K + V bytes of one token of one layer, whole batch."""
        return 2 * self.batch * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def staged_bytes(self) -> int:
        """Bytes one step copies H2D: each layer's whole DDR buffer (static shape: capacity, not live tokens)."""
        return len(self.layers) * self.cap_ddr * self.token_bytes

    def counts(self, layer: int = 0) -> dict[str, int]:
        """Tokens per tier now (every row holds the same counts)."""
        lt = self.layers[layer]
        n_comp = int((lt.tiers[0, : self.n_seen] == COMPRESSED).sum()) if lt.comp is not None else 0
        return {"hbm": lt.n_hbm, "ddr": lt.n_ddr, "compressed": n_comp, "evicted": lt.n_evicted}

    # -- placing tokens ----------------------------------------------------------------------------
    def _assign(self, lt: LayerTiers, step: int) -> torch.Tensor:
        """The policy's tier codes for every token seen, [B, n] (EVICTED for the tokens gone), from a view of
        the retained tokens as the cache holds them."""
        n = self.n_seen
        if lt.n_evicted:
            positions = masked_index(lt.tiers[:, :n] != EVICTED, n - lt.n_evicted)
            cumulative = lt.cumulative.gather(1, positions)
        else:
            positions, cumulative = torch.arange(n, device=self.device).expand(self.batch, n), lt.cumulative[:, :n]
        view = LayerView(positions=positions, cumulative=cumulative, recent_probs=None, keys=None, context_len=n,
                         prompt_len=self.prompt_len, step=step, num_kv_heads=self.kv_heads)
        kept = assign_tiers(self.policy, view, lt.n_evicted)
        if not lt.n_evicted:
            return kept
        return torch.full((self.batch, n), EVICTED, dtype=torch.uint8, device=self.device).scatter_(1, positions, kept)

    def load(self, index: int, keys: torch.Tensor, values: torch.Tensor, cumulative: torch.Tensor) -> None:
        """Place a prefill of layer ``index``: K/V [B, H, T, D] in token order, scores [B, T] (float32)."""
        lt, t = self.layers[index], keys.shape[2]
        if t != self.context:
            raise TiersimError(f"layer {index}: a prefill of {t} tokens into buffers sized for {self.context}")
        self.n_seen = t
        lt.cumulative[:, :t] = cumulative
        old = torch.full((self.batch, t), HBM, dtype=torch.uint8, device=self.device)
        self._place(lt, old, self._assign(lt, 0), keys, values, {})
        self._sync_counters()

    def _sync_counters(self) -> None:
        self.n_seen_t.fill_(self.n_seen)
        self.hbm_len_t.fill_(self.layers[0].n_hbm)
        if not self.evicts:
            self.mask.zero_()
            self.mask[..., : self.n_seen] = True

    def advanced(self) -> None:
        """The host mirrors after one decode step (the step advanced the device counters itself)."""
        self.n_seen += 1
        for lt in self.layers:
            lt.n_hbm += 1

    def due(self, step: int) -> bool:
        """Re-tier after decode step ``step``? The policy's rule, and only when tokens may leave HBM."""
        return self.config.offloads and self.policy.due(step)

    def retier(self, step: int) -> dict:
        """Re-place every layer by the policy (between replays); returns the tokens moved: ``demoted`` (into
        DDR, D2H), ``promoted`` (out of DDR, H2D), ``compressed`` (into the compressed tier), ``evicted``."""
        moved = {"demoted": 0, "promoted": 0, "compressed": 0, "evicted": 0}
        ordered = self.assembled  # host strategies have none: one transient for every layer (prefetch reuses its own)
        for lt in self.layers:
            new = self._assign(lt, step)
            old = lt.tiers[:, : self.n_seen]
            if torch.equal(new, old):
                continue
            if ordered is None:
                ordered = self._token_ordered()
            keys, values = self._assemble(lt, old, new, ordered)
            self._place(lt, old.clone(), new, keys, values, moved)
        if any(moved.values()):
            self.retiers += 1
        per_token = self.token_bytes // self.batch
        self.bytes_d2h += moved["demoted"] * per_token
        self.bytes_h2d_retier += moved["promoted"] * per_token
        self.hbm_len_t.fill_(self.layers[0].n_hbm)
        return moved

    def _assemble(self, lt: LayerTiers, old: torch.Tensor, new: torch.Tensor, ordered):
        """The layer in token order as the last step's attention saw it (HBM, the compressed tier dequantized, its
        residual), with the DDR tokens that leave DDR for the device copied H2D, written into ``ordered`` (the
        step's token-ordered buffer, or the re-tiering's transient one when the step has none): the cache re-tiers
        from that."""
        keys, values = ordered
        n_h = lt.n_hbm
        scatter_tokens(keys, values, lt.hbm_slots[:, :n_h], lt.hbm_k[:, :, :n_h], lt.hbm_v[:, :, :n_h], self.rows)
        if lt.comp is not None:
            for tier_k, tier_v, index in lt.comp.exact_tiers():
                index.scatter(keys, values, tier_k, tier_v)
        if lt.n_ddr:
            ds = lt.ddr_slots[:, : lt.n_ddr]
            leaving = new.gather(1, ds)
            up = (leaving == HBM) | (leaving == COMPRESSED)
            if bool(up.any()):
                rows, cols = torch.nonzero(up, as_tuple=True)
                rows_h, cols_h = rows.cpu(), cols.cpu()
                keys[rows, :, ds[rows, cols]] = lt.ddr_k[rows_h, :, cols_h].to(self.device)
                values[rows, :, ds[rows, cols]] = lt.ddr_v[rows_h, :, cols_h].to(self.device)
        return keys, values

    def _place(self, lt: LayerTiers, old, new, keys, values, moved: dict) -> None:
        """Re-place layer ``lt`` from tier codes ``old`` to ``new`` [B, n], ``keys``/``values`` the layer in token
        order (slot = position); adds the tokens moved to ``moved``."""
        n = new.shape[1]
        n_h = int((new[0] == HBM).sum())
        hbm_idx = masked_index(new == HBM, n_h)  # HBM stays in token order, as the cache keeps it
        lt.hbm_k[:, :, :n_h] = gather_tokens(keys, hbm_idx)
        lt.hbm_v[:, :, :n_h] = gather_tokens(values, hbm_idx)
        lt.hbm_slots[:, :n_h] = hbm_idx
        lt.hbm_slots[:, n_h:] = self.trash
        if lt.comp is not None:
            identity = torch.arange(n, device=self.device).expand(self.batch, n)
            lt.comp.retier(keys, values, old, new, identity)
        self._place_ddr(lt, old, new, keys, values, moved)
        for name, code in (("compressed", COMPRESSED), ("evicted", EVICTED)):
            moved[name] = moved.get(name, 0) + int(((new == code) & (old != code)).sum())
        lt.tiers[:, :n] = new
        lt.n_hbm, lt.n_evicted = n_h, int((new[0] == EVICTED).sum())
        if self.evicts:
            lt.mask.zero_()
            lt.mask[:, 0, 0, :n] = new != EVICTED

    def _place_ddr(self, lt: LayerTiers, old, new, keys, values, moved: dict) -> None:
        """DDR: arrivals (D2H) fill the holes the leavers left, then append; when the tier shrinks, entries past
        its new end move into the holes left below it. The host writes only the tokens that move."""
        n_d, n_d_new = lt.n_ddr, int((new[0] == DDR).sum())
        if not (n_d or n_d_new):
            return
        now = new.gather(1, lt.ddr_slots[:, :n_d])  # each DDR entry's new tier
        keep = now == DDR
        moved["promoted"] = moved.get("promoted", 0) + int(((now == HBM) | (now == COMPRESSED)).sum())
        arriving = (new == DDR) & (old != DDR)
        n_arr = arriving.sum(dim=1)
        a = int(n_arr.max())
        moved["demoted"] = moved.get("demoted", 0) + int(n_arr.sum())
        arr_slots = masked_index(arriving, a)
        if n_d == 0:
            # The whole buffer in one contiguous copy (a DMA into pinned memory, not a strided host copy);
            # unused entries, staged to the trash slot every step, must be finite (weight 0 x NaN = NaN): zeros.
            for host, src in ((lt.ddr_k, keys), (lt.ddr_v, values)):
                block = torch.zeros(host.shape, dtype=self.dtype, device=self.device)
                block[:, :, :a] = gather_tokens(src, arr_slots)
                host.copy_(block)
            lt.ddr_slots[:, :a] = arr_slots
            lt.n_ddr = n_d_new
            return
        free = masked_index(torch.cat((~keep, torch.ones((self.batch, a), dtype=torch.bool, device=self.device)),
                                      dim=1), a)  # per row: its holes, then the entries past the tier's end
        rows, cols = torch.nonzero(torch.arange(a, device=self.device)[None, :] < n_arr[:, None], as_tuple=True)
        at = free[rows, cols]
        src = arr_slots[rows, cols]
        rows_h, at_h = rows.cpu(), at.cpu()
        lt.ddr_k[rows_h, :, at_h] = keys[rows, :, src].cpu()
        lt.ddr_v[rows_h, :, at_h] = values[rows, :, src].cpu()
        lt.ddr_slots[rows, at] = src
        if n_d_new < n_d:
            occupied = keep.clone()
            occupied[rows, at] = True
            ends = torch.arange(n_d, device=self.device)[None, :] >= n_d_new
            movers, holes = occupied & ends, ~occupied & ~ends  # as many of each in every row
            n_mov = movers.sum(dim=1)
            m = int(n_mov.max())
            if m:
                r, c = torch.nonzero(torch.arange(m, device=self.device)[None, :] < n_mov[:, None], as_tuple=True)
                s_e, d_e = masked_index(movers, m)[r, c], masked_index(holes, m)[r, c]
                r_h, s_h, d_h = r.cpu(), s_e.cpu(), d_e.cpu()
                lt.ddr_k[r_h, :, d_h] = lt.ddr_k[r_h, :, s_h]
                lt.ddr_v[r_h, :, d_h] = lt.ddr_v[r_h, :, s_h]
                lt.ddr_slots[r, d_e] = lt.ddr_slots[r, s_e]
        lt.ddr_slots[:, n_d_new:] = self.trash
        lt.n_ddr = n_d_new
