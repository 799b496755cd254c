"""One engine iteration priced by the simulator's own step model: no serving-specific physics; numpy only.

An iteration of a continuous-batching engine is a set of decode rows (each reading its request's KV, part
of it perhaps in DDR) plus prefill chunks (Sarathi-style, mixed into the same forward). It is priced as:

* the decode part by ``step.price`` on one tensor-parallel rank's shard (``parallel.shard``): the same
  :class:`~tiersim.simulator.step.StepCosts` the batch planner uses, so DDR tokens are read by the chosen
  ``--strategy`` (prefetch, host attention, ...) and spill demotions cross the link's D2H engine after each
  layer; timed by the closed form (``step.closed_form``);
* the prefill chunks by ``prefill.mixed_layer_s`` / ``mixed_step_s`` (GEMMs over decode + prefill rows at
  once, attention per chunk over its own prompt), added to that step's compute: the difference between the
  mixed step and the decode-only step, both as ``prefill`` states them;
* tensor parallel by ``parallel.layer_allreduce_s`` over every row (the model's all-reduces per layer,
  ``parallel.allreduces_per_layer``: two, one for Falcon's parallel block);
* one-off KV moves (a swap out or in, a spill brought back) by ``link.copy_s`` on each rank's own link,
  serial with the step (vLLM swaps before the forward).

The pricing offload is the all-HBM split with the DDR token counts given explicitly: a paged engine attends
the staged DDR blocks in place, so the reference cache's reassembly passes (``analytic.extra_kv_bytes``) are
not charged to every request of the batch.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from tiersim.hierarchy.config import TierConfig
from tiersim.simulator import analytic, parallel, prefill, step
from tiersim.simulator.link import COPY_CALLS_PER_LAYER, copy_s
from tiersim.simulator.presets import GPU, Model


class StepPricer:
    """Prices iterations of one model on ``tp`` GPUs of ``gpu``, DDR tokens read by ``strategy``."""

    def __init__(self, model: Model, gpu: GPU, tp: int = 1, strategy: str = "prefetch"):
        self.model, self.gpu, self.tp, self.strategy = model, gpu, parallel.check_tp(model, tp), strategy
        self.rank = parallel.shard(model, self.tp)
        if self.tp > 1:
            parallel.link_line(gpu, self.tp)  # no NVLink data for this GPU: one line now, not mid-run
        self.offload = analytic.Offload(TierConfig())
        self.layers = model.num_layers
        self.kv_per_token = self.rank.kv_bytes_per_token  # one rank's bytes per token, all layers
        self.kv_per_token_layer = self.rank.kv_bytes_per_token_layer

    def staged_share(self) -> float:
        """Share of the DDR tokens the strategy stages in HBM (sets the staging buffers): the step model's own
        answer (``StepCosts.staged``) at a representative step; 0 for host attention, 1 for prefetch."""
        return float(self.decode_costs(8, 8_000.0, 8_000.0).staged)

    def _allreduce(self, rows):
        return parallel.layer_allreduce_s(self.model, self.gpu, self.tp, rows) if self.tp > 1 else 0.0

    def decode_costs(self, batch: int, hbm, ddr=0.0, demoted=0.0) -> step.StepCosts:
        """StepCosts of decode steps: ``batch`` rows attending ``hbm`` + ``ddr`` tokens (batch totals per layer,
        numbers or arrays over steps), ``demoted`` tokens per layer copied down at the step."""
        costs = step.price(self.rank, self.gpu, self.offload, batch, hbm, ddr, demoted=demoted, strategy=self.strategy)
        if self.tp > 1:
            costs = replace(costs, compute=costs.compute + self._allreduce(batch))
        return costs

    def decode_s(self, batch: int, hbm, ddr=0.0, demoted=0.0) -> np.ndarray:
        """Seconds per decode step (arrays over steps): the closed form of :meth:`decode_costs`."""
        return step.closed_form(self.decode_costs(batch, hbm, ddr, demoted), self.layers)[0]

    def _chunk_layer_s(self, batch: int, kv_bytes: float, attended: float, chunks) -> tuple[float, float]:
        """(per-layer seconds the chunks add to the decode rows' layer, per-step seconds they add after the layers)."""
        sizes = np.array([c[0] for c in chunks], dtype=float)
        contexts = np.array([c[1] for c in chunks], dtype=float)
        total, first = float(sizes.sum()), float(contexts[0])
        done = any(c[2] for c in chunks)
        rank, gpu = self.rank, self.gpu
        # GEMMs over every row at once; attention per chunk (the mixed layer prices one chunk's), in one packed
        # variable-length kernel call: its fixed cost is paid once, as prefill.prefill_attention_s(sequences=n) does.
        calls = max(int(np.count_nonzero(sizes)), 1)
        attention = float(np.sum(prefill.prefill_attention_s(rank, gpu, sizes, contexts)))
        attention -= (calls - 1) * gpu.attn_kernel_s
        attention -= float(prefill.prefill_attention_s(rank, gpu, total, first))
        mixed = float(prefill.mixed_layer_s(rank, gpu, batch, kv_bytes, total, first, attended=attended)) + attention
        alone = float(prefill.mixed_layer_s(rank, gpu, batch, kv_bytes, 0.0, attended=attended)) if batch else 0.0
        layer = mixed - alone + (float(self._allreduce(batch + total)) - float(self._allreduce(batch)))
        # After the layers: the embedding gather of the chunk's rows, the LM head's extra sampled row, host work.
        with_chunk = float(prefill.mixed_step_s(rank, gpu, batch, kv_bytes, total, first, done))
        without = float(prefill.mixed_step_s(rank, gpu, batch, kv_bytes, 0.0)) if batch else 0.0
        after = (with_chunk - self.layers * (mixed - attention)) - (without - self.layers * alone if batch else 0.0)
        return layer, after

    def step_s(self, batch: int, hbm: float, ddr: float = 0.0, chunks=(), demoted: float = 0.0) -> float:
        """Seconds of one iteration: ``batch`` decode rows over ``hbm`` + ``ddr`` tokens and ``chunks``, a list of
        ``(tokens, context, ends_prompt)`` prefill chunks (context: the prompt's tokens already cached)."""
        if not chunks:
            return float(self.decode_s(batch, hbm, ddr, demoted)[0]) if batch else 0.0
        if batch == 0:
            layer, after = self._chunk_layer_s(0, 0.0, 0.0, chunks)  # an engine's host floor holds here too
            return max(self.layers * layer + after, self.gpu.step_host_floor)
        costs = self.decode_costs(batch, hbm, ddr, demoted)
        kv = (hbm + ddr) * self.kv_per_token_layer
        layer, after = self._chunk_layer_s(batch, kv, hbm + ddr, chunks)
        costs = replace(costs, compute=costs.compute + layer,
                        step_extra=np.asarray(costs.step_extra, dtype=float) + after)
        return float(step.closed_form(costs, self.layers)[0][0])

    def move_s(self, tokens: float, direction: str) -> float:
        """One rank's KV of ``tokens`` tokens over its own link, every layer (keys and values per layer)."""
        if tokens <= 0:
            return 0.0
        return float(copy_s(self.gpu, tokens * self.kv_per_token, direction,
                            calls=COPY_CALLS_PER_LAYER * self.layers))
