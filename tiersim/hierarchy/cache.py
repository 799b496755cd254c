"""TieredCache: a transformers ``Cache`` that keeps each layer's KV in four tiers.

Per layer the retained tokens (everything not evicted) keep their original order; each tier
stores its own tokens and the slot they occupy in that order:

* HBM: a device tensor, new tokens appended to it.
* DDR: host-memory chunks (pinned when the model is on CUDA, :mod:`tiersim.hierarchy.ddr`). How they
  reach attention is the strategy's (:mod:`tiersim.hierarchy.access`): by default (``prefetch``) the
  chunks of layer l+1 are copied into a device staging buffer on a side stream while layer l
  computes (two buffers, alternating), so the layer's attention sees them at full precision.
* compressed: KIVI-style int8/int4 codes on the device, dequantized for attention.
* evicted: gone; only a count remains.

This class is the loop over layers the transformers ``Cache`` API wants: each
:class:`~tiersim.hierarchy.layer.TieredLayer` owns its tiers, scores and re-tiering; the model-support
checks live in :mod:`~tiersim.hierarchy.support`, trace records in :mod:`~tiersim.hierarchy.recording`,
memory accounting in :mod:`~tiersim.hierarchy.accounting`. With ``prefetch`` and ``compressed = evict = 0``
the tensor attention sees is element for element the one ``DynamicCache`` would give, so generation is
bit-identical whatever the HBM ratio. The attention probabilities come back through
``observe_attention`` (see :mod:`tiersim.hierarchy.scoring`); at the policy's re-tiering points the
layer is re-tiered right after its attention, so the next forward's mask already sees the new length.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers.cache_utils import Cache

from tiersim.errors import TiersimError
from tiersim.hierarchy import accounting, recording, scoring, support
from tiersim.hierarchy.access import make_access
from tiersim.hierarchy.config import TierConfig
from tiersim.hierarchy.index import TokenIndex
from tiersim.hierarchy.layer import TieredLayer
from tiersim.hierarchy.record import StepRecord
from tiersim.hierarchy.registry import make_policy
from tiersim.hierarchy.support import check_model_supported

__all__ = ["TieredCache", "TieredLayer", "TokenIndex", "check_model_supported"]


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
            head_dim = support.head_dim_of(model_config)
            if head_dim is not None:
                support.check_head_dim(self.config, head_dim)
        self._start()

    def _start(self) -> None:
        """The state of a cache that has seen no token (the constructor's, and ``reset``'s)."""
        self.layers.clear()
        self.access = make_access(self.config.strategy, self.config.fetch_share)
        self.tokens_moved = dict.fromkeys(recording.MOVE_KINDS, 0)
        self.retiers = 0
        self._peak_scoring = 0  # largest scratch of one layer's scoring

    def reset(self) -> None:
        """Forget every token, counter and buffer: the cache is as new (same config, same recorder).

        The inherited ``Cache.reset`` would zero the HBM tensors in place and keep the tiers and the
        token count, so a later ``generate`` would continue a context that no longer exists.
        """
        self._start()

    # -- transformers Cache API --------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(
                TieredLayer(index=len(self.layers), config=self.config, policy=self.policy, access=self.access)
            )
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            support.check_head_dim(self.config, key_states.shape[-1])
            layer.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != layer.batch_size:
            raise TiersimError(
                f"TieredCache holds a batch of {layer.batch_size} sequences; this forward has {key_states.shape[0]}: "
                "use a new cache (or cache.reset()) for a new batch"
            )
        if layer.awaiting_scores and self.needs_scores:
            raise TiersimError(
                f"TieredCache got no attention scores for layer {layer_idx}: the model's attention never called "
                "the 'tiersim' attention (load the model with attn_implementation='tiersim', as "
                "tiersim.models.load_model does, or call tiersim.hierarchy.scoring.enable_scoring(model))"
            )
        if self.needs_scores:
            scoring.set_listener(self, layer_idx)
            layer.awaiting_scores = True
        elif not layer.attention_checked:
            scoring.set_listener(self, layer_idx)  # once, so check_attention sees the layer
        keys, values = layer.update(key_states, value_states)
        full = keys.shape[2] == layer.num_retained  # the whole layer in token order (not host-attention's part)
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

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        """(keys the mask spans, offset); ``query_length`` is the queries' count, or before transformers 5.3
        their ``cache_position`` tensor (``TieredLayer.get_mask_sizes`` reads either)."""
        if layer_idx >= len(self.layers):
            return (query_length.shape[0] if isinstance(query_length, torch.Tensor) else query_length), 0
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
    def check_attention(self, layer_idx: int, module, attention_kwargs: dict) -> None:
        """Refuse a sliding-window layer at its first attention (:func:`support.check_attention_window`)."""
        if layer_idx >= len(self.layers) or self.layers[layer_idx].attention_checked:
            return
        support.check_attention_window(layer_idx, module, attention_kwargs)
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
        if not layer.awaiting_scores:
            return
        if probs.shape[-1] != layer.num_retained:
            raise TiersimError(
                f"layer {layer_idx}'s attention saw {probs.shape[-1]} keys, the cache holds {layer.num_retained}: "
                "the keys attention got did not come from this cache's update"
            )
        self._peak_scoring = max(self._peak_scoring, scratch_bytes)
        layer.awaiting_scores = False
        step = layer.step
        last = layer.accumulate_scores(probs, visible)
        mass = recording.mass_by_tier(layer, last) if self.recorder is not None else None
        fetched = self.access.fetched_this_step(layer) if mass is not None else None
        if fetched is not None:
            # DDR tokens this step's attention saw (batch row 0); the row's n_ddr is counted after re-tiering
            mass["ddr_fetched"] = fetched
        if self.record_attention:
            mass["attn_positions"] = layer.positions[0].tolist()
            mass["attn_probs"] = last[0].tolist()
        moves, moved = layer.retier_if_due()
        if moved:
            self.retiers += 1
            for key, value in moves.items():
                self.tokens_moved[key] += value * layer.tiers.shape[0]
        layer.last_full = None
        if self.recorder is not None:
            self.recorder(recording.step_record(layer_idx, layer, step, mass, moves))
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
        return recording.tier_counts(self.layers[layer_idx] if layer_idx < len(self.layers) else None)

    def stats(self) -> dict:
        """Bytes held now (whole batch, all layers) and bytes moved so far.

        ``bytes`` splits what the cache holds by role (:mod:`~tiersim.hierarchy.accounting` walks every
        tensor the cache reaches, so nothing it keeps alive goes uncounted). On the compute device:
        ``hbm`` (the HBM tier), ``compressed`` (codes, scales, minimums, token -> group map,
        full-precision residual), ``staging`` (the DDR prefetch buffers), ``predictor`` (selective's
        per-page key bounds), ``bookkeeping`` (per-token positions / tiers / scores / slots with their
        spare capacity, kept attention rows, tier indices); ``device_resident`` is their sum. On the
        host: ``ddr`` counts the tokens in the DDR tier, ``ddr_allocated`` adds the holes left by
        promotions until the chunks are compacted (the prefetch copies those too). Every figure is
        storage actually allocated (a view, even a zero-width one, counts its whole buffer, once).

        ``peak_bytes`` holds what a step allocates on the device for a while, the largest so far:
        ``layer_buffer`` (one layer's reassembled K+V, for its attention or for a re-tier, or the
        per-step dequantized and fetched copies host-attention reads; 0 while everything is in HBM),
        ``scoring`` (the float32 copies, logits and probabilities of one
        layer's scoring) and ``device`` = ``device_resident`` + both (layers run one at a time).
        """
        held = accounting.held_bytes(self)
        peak = {"layer_buffer": max((layer.peak_buffer for layer in self.layers), default=0),
                "scoring": self._peak_scoring}
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
