"""Static-shape tier buffers for one (batch, context, split) point: what a captured CUDA graph reads and writes.

A CUDA graph replays fixed kernels on fixed addresses, so every tier lives in a buffer sized once for
the whole run (``context + max_steps`` tokens): per layer the HBM tier on the device, the DDR tier in
host memory (pinned on CUDA, so its H2D copies are DMA the graph can hold), and, shared by the layers,
two device staging buffers (layer l+1 is copied into one while layer l reads the other), the
token-ordered buffer attention reads, the attention mask over it and the counters a step advances.
Unused capacity points at one extra "trash" slot that the mask always hides.

Membership is the hierarchy's own: :func:`tiersim.hierarchy.policy.assign_tiers` (whose counts are
``tier_targets``) over the cumulative attention score, from the policy ``make_policy`` builds, exactly
as :class:`~tiersim.hierarchy.cache.TieredCache` re-tiers. Re-tiering rewrites the buffers in place
(same storage, so a captured graph stays valid) and moves only what changed: demotions D2H,
promotions H2D. Lossless splits only (``compressed = evict = 0``); the compressed tier is not built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiersim.errors import TiersimError
from tiersim.hierarchy.config import TierConfig, tier_targets
from tiersim.hierarchy.policy import DDR, HBM, LayerView, assign_tiers
from tiersim.hierarchy.registry import make_policy


def protected_count(config: TierConfig, context: int) -> int:
    """Tokens pinned to HBM in an unpadded context of ``context`` tokens (sinks and recent window)."""
    return min(context, config.sink_tokens + config.recent_window)


def targets(config: TierConfig, context: int) -> dict[str, int]:
    """The policy's token count per tier at ``context`` tokens (``tier_targets``, unpadded batch)."""
    return tier_targets(config, context, protected_count(config, context))


def check_config(config: TierConfig) -> None:
    """Refuse, in one line, what the static buffers do not hold."""
    if not config.is_lossless:
        raise TiersimError("the graph executor runs lossless splits only (compressed = evict = 0); "
                           f"got compressed={config.compressed}, evict={config.evict}")
    if config.policy != "hierarchy":
        raise TiersimError(f"the graph executor ranks by the hierarchy's score; policy {config.policy!r} is not built")


def _ascending(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Per row, the indices of the True entries of ``mask`` [B, N] (``count`` each), ascending."""
    return torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :count]


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D] at per-row token indices [B, m] -> [B, H, m, D]."""
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    return x[rows, :, index].permute(0, 2, 1, 3)


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
    n_hbm: int = 0
    n_ddr: int = 0


class TierBuffers:
    """Every buffer of one point, allocated once; :meth:`load` places a prefill, :meth:`retier` re-places.

    ``host(shape, dtype)``, when given, hands out the DDR tier's host tensors (uninitialised), e.g. views of one
    pinned arena shared by a grid's points; by default each is its own (pinned on CUDA) allocation.
    """

    def __init__(self, config: TierConfig, num_layers: int, batch: int, kv_heads: int, head_dim: int,
                 context: int, max_steps: int, device, dtype, host=None) -> None:
        check_config(config)
        self.config, self.policy = config, make_policy(config)
        self.device, self.dtype = torch.device(device), dtype
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self.context, self.prompt_len = context, context
        self.cap_tokens = context + max_steps
        self.trash = self.cap_tokens  # the slot unused entries write to; always masked
        # DDR only grows with the context (floor(ddr * T)); HBM holds the rest, so it peaks with the fewest DDR.
        self.cap_ddr = targets(config, self.cap_tokens)["ddr"]
        self.cap_hbm = self.cap_tokens - targets(config, context)["ddr"]
        self.pinned = self.device.type == "cuda"
        self._host = host  # (shape, dtype) -> a zeroed host tensor (graph_run's pinned arena), or None
        dev, b, h, d = self.device, batch, kv_heads, head_dim
        self.layers = [self._layer() for _ in range(num_layers)]
        self.staging = [(torch.zeros((b, h, self.cap_ddr, d), device=dev, dtype=dtype),
                         torch.zeros((b, h, self.cap_ddr, d), device=dev, dtype=dtype))
                        for _ in range(2 if self.cap_ddr else 0)]
        slots = self.cap_tokens + 1
        self.assembled = ((torch.zeros((b, h, slots, d), device=dev, dtype=dtype),
                           torch.zeros((b, h, slots, d), device=dev, dtype=dtype)) if self.cap_ddr else None)
        self.mask = torch.zeros((1, 1, 1, slots), dtype=torch.bool, device=dev)
        self.n_seen = 0  # tokens in the cache (host mirror of n_seen_t)
        self.n_seen_t = torch.zeros(1, dtype=torch.long, device=dev)
        self.hbm_len_t = torch.zeros(1, dtype=torch.long, device=dev)  # every layer holds as many HBM tokens
        self.position = self.n_seen_t.view(1, 1)  # the next token's position id (a view: advances with it)
        self.retiers, self.bytes_d2h, self.bytes_h2d_retier = 0, 0, 0

    def _layer(self) -> LayerTiers:
        dev, b, h, d, dt = self.device, self.batch, self.kv_heads, self.head_dim, self.dtype

        def host(shape):
            if self._host is not None:
                return self._host(shape, dt)
            return torch.zeros(shape, dtype=dt, pin_memory=self.pinned)

        return LayerTiers(
            hbm_k=torch.zeros((b, h, self.cap_hbm, d), device=dev, dtype=dt),
            hbm_v=torch.zeros((b, h, self.cap_hbm, d), device=dev, dtype=dt),
            hbm_slots=torch.full((b, self.cap_hbm), self.trash, dtype=torch.long, device=dev),
            ddr_k=host((b, h, self.cap_ddr, d)), ddr_v=host((b, h, self.cap_ddr, d)),
            ddr_slots=torch.full((b, self.cap_ddr), self.trash, dtype=torch.long, device=dev),
            tiers=torch.zeros((b, self.cap_tokens), dtype=torch.uint8, device=dev),
            cumulative=torch.zeros((b, self.cap_tokens + 1), dtype=torch.float32, device=dev),
        )

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def offloads(self) -> bool:
        """Whether any layer may hold DDR tokens during the run (decides the step's shape once)."""
        return self.cap_ddr > 0

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
        return {"hbm": lt.n_hbm, "ddr": lt.n_ddr, "compressed": 0, "evicted": 0}

    # -- placing tokens ----------------------------------------------------------------------------
    def _view(self, lt: LayerTiers, step: int) -> LayerView:
        n = self.n_seen
        positions = torch.arange(n, device=self.device).expand(self.batch, n)
        return LayerView(positions=positions, cumulative=lt.cumulative[:, :n], recent_probs=None, keys=None,
                         context_len=n, prompt_len=self.prompt_len, step=step, num_kv_heads=self.kv_heads)

    def load(self, index: int, keys: torch.Tensor, values: torch.Tensor, cumulative: torch.Tensor) -> None:
        """Place a prefill of layer ``index``: K/V [B, H, T, D] in token order, scores [B, T] (float32)."""
        lt, t = self.layers[index], keys.shape[2]
        if t != self.context:
            raise TiersimError(f"layer {index}: a prefill of {t} tokens into buffers sized for {self.context}")
        self.n_seen = t
        lt.cumulative[:, :t] = cumulative
        new = assign_tiers(self.policy, self._view(lt, 0), 0)
        lt.tiers[:, :t] = new
        n_h, n_d = int((new[0] == HBM).sum()), int((new[0] == DDR).sum())
        hbm_idx, ddr_idx = _ascending(new == HBM, n_h), _ascending(new == DDR, n_d)
        lt.hbm_k[:, :, :n_h] = _gather(keys, hbm_idx)
        lt.hbm_v[:, :, :n_h] = _gather(values, hbm_idx)
        lt.hbm_slots[:, :n_h] = hbm_idx
        if self.cap_ddr:
            # The whole buffer in one contiguous copy (a DMA into pinned memory, not a strided host copy);
            # unused entries, staged to the trash slot every step, must be finite (weight 0 x NaN = NaN): zeros.
            for host, src in ((lt.ddr_k, keys), (lt.ddr_v, values)):
                block = torch.zeros(host.shape, dtype=self.dtype, device=self.device)
                block[:, :, :n_d] = _gather(src, ddr_idx)
                host.copy_(block)
            lt.ddr_slots[:, :n_d] = ddr_idx
        lt.n_hbm, lt.n_ddr = n_h, n_d
        self._sync_counters()

    def _sync_counters(self) -> None:
        self.n_seen_t.fill_(self.n_seen)
        self.hbm_len_t.fill_(self.layers[0].n_hbm)
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
        """Re-place every layer by the policy (between replays); returns the tokens and bytes moved."""
        moved = {"demoted": 0, "promoted": 0}
        for lt in self.layers:
            new = assign_tiers(self.policy, self._view(lt, step), 0)
            n = self.n_seen
            if torch.equal(new, lt.tiers[:, :n]):
                continue
            demoted, promoted = self._move(lt, new)
            moved["demoted"] += demoted
            moved["promoted"] += promoted
            lt.tiers[:, :n] = new
        if moved["demoted"] or moved["promoted"]:
            self.retiers += 1
        per_token = self.token_bytes // self.batch
        self.bytes_d2h += moved["demoted"] * per_token
        self.bytes_h2d_retier += moved["promoted"] * per_token
        self.hbm_len_t.fill_(self.layers[0].n_hbm)
        return moved

    def _move(self, lt: LayerTiers, new: torch.Tensor) -> tuple[int, int]:
        """Move what changed, every row at once. Rows may swap different tokens, but every row ends with
        the same counts, so the DDR tier grows by the same ``g`` in each: promotions leave holes in the host
        buffer that the first demotions fill, the other ``g`` demotions are appended (the host writes only
        the moved tokens); the HBM tier is compacted on the device."""
        n_h, n_d = lt.n_hbm, lt.n_ddr
        n_h_new, n_d_new = int((new[0] == HBM).sum()), int((new[0] == DDR).sum())
        if n_d_new < n_d:
            raise AssertionError("the DDR target never shrinks as the context grows")  # pragma: no cover
        hs, ds = lt.hbm_slots[:, :n_h], lt.ddr_slots[:, :n_d]
        keep_h, keep_d = new.gather(1, hs) == HBM, new.gather(1, ds) == DDR
        n_dem, n_pro = (~keep_h).sum(dim=1), (~keep_d).sum(dim=1)  # per row; n_dem - n_pro = n_d_new - n_d
        q, p = int(n_dem.max()), int(n_pro.max())
        dem_idx, pro_idx = _ascending(~keep_h, q), _ascending(~keep_d, p)  # entries, valid below n_dem / n_pro
        # Promotions first (their host entries are about to be overwritten): host gather, then H2D.
        pro_host = pro_idx.cpu()
        prom_k = _gather(lt.ddr_k, pro_host).to(self.device)
        prom_v = _gather(lt.ddr_v, pro_host).to(self.device)
        prom_slots = ds.gather(1, pro_idx)
        # Demotions: device gather, then D2H.
        dem_k, dem_v = _gather(lt.hbm_k, dem_idx).cpu(), _gather(lt.hbm_v, dem_idx).cpu()
        dem_slots = hs.gather(1, dem_idx)
        # HBM: the staying entries and the promotions, compacted in place of the old tier.
        cols = torch.arange(p, device=self.device)[None, :]
        valid = torch.cat((keep_h, cols < n_pro[:, None]), dim=1)
        sel = _ascending(valid, n_h_new)
        for buf, arrived in ((lt.hbm_k, prom_k), (lt.hbm_v, prom_v)):
            buf[:, :, :n_h_new] = _gather(torch.cat((buf[:, :, :n_h], arrived), dim=2), sel)
        lt.hbm_slots[:, :n_h_new] = torch.cat((hs, prom_slots), dim=1).gather(1, sel)
        lt.hbm_slots[:, n_h_new:] = self.trash
        # DDR: demotion j of a row fills that row's j-th hole while there are holes, then is appended.
        j = torch.arange(q, device=self.device)[None, :]
        appended = n_d + j - n_pro[:, None]
        if p:
            hole = pro_idx.gather(1, j.clamp(max=p - 1).expand(self.batch, q))
            target = torch.where(j < n_pro[:, None], hole, appended)
        else:
            target = appended.expand(self.batch, q)
        rows, cols = torch.nonzero(j < n_dem[:, None], as_tuple=True)
        at = target[rows, cols]
        rows_h, cols_h, at_h = rows.cpu(), cols.cpu(), at.cpu()
        lt.ddr_k[rows_h, :, at_h] = dem_k[rows_h, :, cols_h]
        lt.ddr_v[rows_h, :, at_h] = dem_v[rows_h, :, cols_h]
        lt.ddr_slots[rows, at] = dem_slots[rows, cols]
        lt.n_hbm, lt.n_ddr = n_h_new, n_d_new
        return int(n_dem.sum()), int(n_pro.sum())
