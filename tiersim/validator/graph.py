"""One decode step of a real model shape over static tier buffers, captured once as a CUDA graph and replayed.

The HF eager harness spends 30-64 ms of host time per 7B step where the GPU works ~8 ms, so it
measures the host. Here the step's kernels are recorded once and replayed with no Python in between:
the embedding, then per layer transformers' own decoder layer (norms, projections, RoPE, MLP: the
model's modules, so the math is the model's), whose ``cache.update`` lands in :class:`GraphStep`:
the new token is written into the layer's HBM tier, layer l+1's DDR tier is copied H2D into the
other staging buffer on a side stream (layer-ahead prefetch), the compute stream waits for layer l's
copy, the compressed tier is dequantized on the device, and HBM + staged + dequantized tokens are
scattered into token order for attention. Attention is the ``"tiersim"`` implementation (SDPA, plus
the scores the policy ranks by when tokens may leave HBM).

Two shapes of the same step:

* ``exact=True`` (eager only): attention reads exactly the tokens held (the retained ones, in token
  order), as ``TieredCache`` hands them over, so on CPU the attention output and logits are bit-identical
  to ``TieredCache`` (the tests), compressed and evicted shares included.
* ``exact=False`` (what the graph captures): attention reads the whole static buffer under a mask (the
  tokens seen, less the evicted ones), so shapes never change; equal to the exact step up to float
  rounding of the masked softmax.
  The attention is computed here (the listener's ``attend_split``): SDPA with the query heads of each
  KV head as query rows (grouped-query attention by reshape), because transformers' SDPA path repeats
  K and V per query head whenever a mask is given (7x the KV bytes for a 28/4-head model).

The graph wrapper (:class:`CapturedStep`) is CUDA-only; on CPU the same eager step runs. Strategies:
``prefetch`` here; host attention and hybrid in :mod:`tiersim.validator.graph_host` (``make_step`` picks).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tiersim.compat import cache_kwargs
from tiersim.errors import TiersimError
from tiersim.hierarchy import scoring
from tiersim.hierarchy.index import gather_tokens, masked_index, scatter_tokens
from tiersim.hierarchy.policy import EVICTED, HBM
from tiersim.validator.graph_tiers import TierBuffers
from tiersim.validator.operators_timing import recover_failed_capture

STRATEGIES = ("prefetch",)


def check_step_strategy(strategy: str, allowed=STRATEGIES) -> None:
    """Refuse a strategy this step class does not run (``allowed``: its ``STRATEGIES``); whether the graph
    executor runs it at all is :func:`tiersim.validator.graph_host.check_executor_strategy`."""
    if strategy not in allowed:
        raise TiersimError(f"--strategy {strategy}: {' and '.join(allowed)} only in this step "
                           "(tiersim.validator.graph_host.make_step picks the step for a strategy)")


class GraphStep:
    """The decode step over ``buffers`` for ``model`` (a transformers causal LM of a supported shape).

    It is the model's cache during the step (``update``) and the scoring attention's listener
    (``queries_to_score`` / ``observe_attention``), the two hooks ``TieredCache`` uses. ``STRATEGIES``: what
    the class runs (its subclass :class:`tiersim.validator.graph_host.HostStep`: host-attention and hybrid).
    ``copies=False`` drops the H2D copies and their waits (the same kernels on stale staging): its
    time is the GPU-busy time of the step, and the difference to the full step is the stall.
    """

    STRATEGIES = STRATEGIES

    def __init__(self, model, buffers: TierBuffers, exact: bool = False, copies: bool = True) -> None:
        self.model, self.buffers, self.exact, self.copies = model, buffers, exact, copies
        check_step_strategy(buffers.config.strategy, self.STRATEGIES)
        self.scoring = buffers.config.offloads  # the cache scores only when tokens may leave HBM
        if self.scoring and getattr(model.config, "_attn_implementation", None) != scoring.ATTN_IMPLEMENTATION:
            raise TiersimError("the graph executor needs the 'tiersim' attention to score tokens "
                               "(tiersim.validator.shapes.build_model sets it)")
        inner = model.model
        self.embed, self.rotary, self.decoders, self.norm = inner.embed_tokens, inner.rotary_emb, inner.layers, inner.norm
        self.lm_head = model.lm_head
        self.cache_arg = cache_kwargs(self.decoders[0], self)
        self.layers = [SimpleNamespace(step=1) for _ in self.decoders]  # read by the scoring attention
        self.ids = torch.zeros((buffers.batch, 1), dtype=torch.long, device=buffers.device)
        self.cuda = buffers.device.type == "cuda"
        self.side = torch.cuda.Stream(device=buffers.device) if self.cuda else None
        self.events = [torch.cuda.Event() for _ in self.decoders] if self.cuda else None
        self.offloaded = buffers.offloads  # static shape: decided once for the run
        self._kv = None  # the keys/values ``update`` handed out, for ``attend_split`` (static shape)
        self._kept = None  # the retained slots the exact step handed out, once tokens were evicted

    # -- the step ----------------------------------------------------------------------------------
    def forward(self) -> torch.Tensor:
        """Logits [B, 1, vocab] of the next token after ``self.ids``; advances the device counters."""
        buf = self.buffers
        for m in buf.masks:
            m.index_fill_(-1, buf.n_seen_t, True)  # the new token sees itself
        mask = None if self.exact else buf.mask if buf.assembles else buf.mask[..., : buf.cap_tokens]
        if self.offloaded and self.copies:
            self._prefetch(0)
        hidden = self.embed(self.ids)
        position_embeddings = self.rotary(hidden, buf.position)
        for decoder in self.decoders:
            out = decoder(hidden, attention_mask=mask, position_ids=buf.position,
                          position_embeddings=position_embeddings, use_cache=True, **self.cache_arg)
            hidden = out[0] if isinstance(out, tuple) else out
        logits = self.lm_head(self.norm(hidden)[:, -1:, :])
        buf.n_seen_t.add_(1)
        buf.hbm_len_t.add_(1)
        return logits

    def run(self) -> torch.Tensor:
        """One eager step; the host mirrors follow."""
        logits = self.forward()
        self.buffers.advanced()
        return logits

    # -- the cache hook ----------------------------------------------------------------------------
    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        """Write the new token into the layer's HBM tier; route the layer's attention here. Returns the layer."""
        buf = self.buffers
        lt = buf.layers[layer_idx]
        lt.hbm_k.index_copy_(2, buf.hbm_len_t, key_states)
        lt.hbm_v.index_copy_(2, buf.hbm_len_t, value_states)
        lt.hbm_slots.index_copy_(1, buf.hbm_len_t, buf.n_seen_t.expand(buf.batch, 1))
        lt.tiers.index_fill_(1, buf.n_seen_t, HBM)
        if self.scoring or not self.exact:
            scoring.set_listener(self, layer_idx)
        return lt

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        buf = self.buffers
        lt = self.append(key_states, value_states, layer_idx)
        n = buf.n_seen + 1
        self._kept = None
        if not buf.assembles or (self.exact and lt.n_hbm + 1 == n):
            # HBM holds every token in token order (nothing ever left it).
            if self.exact:
                return lt.hbm_k[:, :, :n], lt.hbm_v[:, :, :n]
            self._kv = (lt.hbm_k, lt.hbm_v, lt.mask[..., : buf.cap_tokens])
            return lt.hbm_k, lt.hbm_v
        if self.offloaded and self.copies:
            if layer_idx + 1 < len(self.decoders):
                self._prefetch(layer_idx + 1)  # while this layer computes
            self._wait(layer_idx)
        keys, values = buf.assembled
        rows = buf.rows
        n_h = lt.n_hbm + 1 if self.exact else buf.cap_hbm
        scatter_tokens(keys, values, lt.hbm_slots[:, :n_h], lt.hbm_k[:, :, :n_h], lt.hbm_v[:, :, :n_h], rows)
        if self.offloaded:
            n_d = lt.n_ddr if self.exact else buf.cap_ddr
            stage_k, stage_v = buf.staging[layer_idx % 2]
            scatter_tokens(keys, values, lt.ddr_slots[:, :n_d], stage_k[:, :, :n_d], stage_v[:, :, :n_d], rows)
        if lt.comp is not None and self.exact:  # the valid tokens, as the cache's device tiers hand them over
            for tier_k, tier_v, index in lt.comp.exact_tiers():
                index.scatter(keys, values, tier_k, tier_v)
        elif lt.comp is not None:  # the whole buffer, dequantized in the step; unused entries to the trash slot
            for tier_k, tier_v, slots in lt.comp.device_tiers(rows):
                scatter_tokens(keys, values, slots, tier_k, tier_v, rows)
        if not self.exact:
            self._kv = (keys, values, lt.mask)
            return keys, values
        if lt.n_evicted:  # the retained tokens, in token order, as the cache compacts them
            self._kept = masked_index(lt.tiers[:, :n] != EVICTED, n - lt.n_evicted)
            return gather_tokens(keys, self._kept), gather_tokens(values, self._kept)
        return keys[:, :, :n], values[:, :, :n]

    def _prefetch(self, layer_idx: int) -> None:
        """Copy the layer's DDR buffer into staging ``layer_idx % 2`` (side stream on CUDA)."""
        lt = self.buffers.layers[layer_idx]
        stage_k, stage_v = self.buffers.staging[layer_idx % 2]
        if not self.cuda:
            stage_k.copy_(lt.ddr_k)
            stage_v.copy_(lt.ddr_v)
            return
        # The staging buffer was last read two layers ago, on the compute stream: start after it.
        self.side.wait_stream(torch.cuda.current_stream(self.buffers.device))
        with torch.cuda.stream(self.side):
            stage_k.copy_(lt.ddr_k, non_blocking=True)
            stage_v.copy_(lt.ddr_v, non_blocking=True)
            self.events[layer_idx].record(self.side)

    def _wait(self, layer_idx: int) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.buffers.device).wait_event(self.events[layer_idx])

    def copy_all(self) -> None:
        """Only the step's H2D copies, layer by layer (the link's rate on this traffic, without compute)."""
        for i in range(len(self.decoders)):
            self._prefetch(i)
        if self.cuda:
            for i in range(len(self.decoders)):
                self._wait(i)

    # -- what the scoring attention calls (the TieredCache listener interface) --------------------
    def check_attention(self, layer_idx, module, kwargs) -> None:
        """The model was checked when it was built (``build_model``)."""

    def queries_to_score(self, layer_idx, q_len: int) -> int:
        return 1 if self.scoring else 0

    def attend_split(self, layer_idx: int, query: torch.Tensor, attention_mask, scaling: float, n_queries: int):
        """Exact shape: None (the stock SDPA path, as TieredCache). Static shape: the attention output
        [B, 1, Hq, D] over the whole buffers under the length mask, GQA by reshape; the scores go to
        ``observe_attention`` as the stock path would send them."""
        if self.exact:
            return None
        keys, values, mask = self._kv
        self._kv = None
        batch, q_heads, q_len, dim = query.shape
        kv_heads = keys.shape[1]
        grouped = query.reshape(batch, kv_heads, (q_heads // kv_heads) * q_len, dim)
        out = torch.nn.functional.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scaling)
        output = out.reshape(batch, q_heads, q_len, dim).transpose(1, 2).contiguous()
        if n_queries:
            probs = scoring.attention_probabilities(query, keys, mask, scaling, n_queries)
            self.observe_attention(layer_idx, probs)
        return output

    def prepare_attention(self, layer_idx, query, attention_mask):
        return attention_mask

    def observe_attention(self, layer_idx: int, probs: torch.Tensor, visible=None, scratch_bytes: int = 0) -> None:
        """Accumulate the step's attention (mean over query heads) into the tokens' scores, as the cache does."""
        last = probs[:, :, -1, :].mean(dim=1)
        cumulative = self.buffers.layers[layer_idx].cumulative
        if self._kept is not None:  # the exact step saw the retained tokens only: back to their slots
            cumulative.scatter_add_(1, self._kept, last)
        else:
            cumulative[:, : last.shape[-1]].add_(last)


class CapturedStep:
    """The step recorded once as a CUDA graph; ``replay`` runs it with no Python per kernel (CUDA only)."""

    def __init__(self, step: GraphStep, warmup: int = 2) -> None:
        if not step.cuda or step.exact:
            raise TiersimError("a CUDA graph needs the static step on a CUDA device")
        self.step = step
        device = step.buffers.device
        # Warm up on a side stream first (allocator pools, library handles), as torch's graph docs ask.
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(max(warmup, 1)):
                step.run()
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        self.graph = torch.cuda.CUDAGraph()
        self.pool = torch.cuda.graph_pool_handle()  # its own pool, as by default, but named: a failure releases it
        before = torch.cuda.current_stream(device)
        try:
            with torch.cuda.graph(self.graph, pool=self.pool):
                self.logits = step.forward()  # recorded, not run: the counters did not move
        except BaseException:
            recover_failed_capture(device, self.pool, before)
            raise
        self.warmup = max(warmup, 1)

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        self.step.buffers.advanced()
        return self.logits
