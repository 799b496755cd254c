"""Paged KV memory of one serving engine: the block budget left in HBM, the pool, the on-full policies' names.

KV lives in blocks of :data:`BLOCK_TOKENS` tokens (vLLM's default), so a request holding ``t`` tokens in HBM
takes ``ceil(t / 16)`` blocks; a block table per request is a count here, since which physical block a token
sits in changes no cost. The budget is the HBM one TP rank has left after its weight shard, the activation
workspace of the largest step (``analytic.ACTIVATION_HIDDEN_MULTIPLE`` per row, logits per sequence) and the
preset's reserved bytes. The DDR side (swapped and spilled KV) is bounded by the host memory lent to the GPU.
Spilled tokens are read through two staging buffers of one layer each (real HBM, taken from the pool).

When the next step would not fit, ``--on-full`` says what gives (docs/serving.md, "Memory"):

* ``preempt-recompute``: the most recently admitted decoding request loses its KV and is prefilled again
  (prompt + generated tokens) when it is readmitted (vLLM's default);
* ``preempt-swap``: that request's KV crosses the link to DDR and back on readmission;
* ``queue``: a request is admitted only when its prompt + ``max_tokens`` can be reserved (it never overflows:
  the reservation rule of an engine that knows what the request asked for, not what it will generate);
  ``queue-oracle`` reserves the true output length instead (an oracle no engine has: the best a queueing
  engine could do; only when asked for by name);
* ``spill``: running requests keep running; the tier policy's DDR share of the longest ones' least-attended
  tokens (``hierarchy.config.tier_targets``: sinks and the recent window stay) moves to DDR and is read by
  ``--strategy`` each step until HBM frees up and it is brought back, as long as reading it costs the step at
  most :data:`SPILL_CAP` more than the same batch held in HBM; past that cap the step preempts (recompute).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tiersim.errors import TiersimError
from tiersim.hierarchy.config import TierConfig, tier_targets, tier_targets_array
from tiersim.simulator import analytic
from tiersim.simulator.presets import GB, GPU, Model

BLOCK_TOKENS = 16
#: The policies ``--on-full all`` compares: what a real engine can do.
ON_FULL = ("preempt-recompute", "preempt-swap", "queue", "spill")
#: Accepted by name only: ``queue`` with the true output lengths reserved (an oracle, labelled as one).
ORACLE = "queue-oracle"
POLICIES = ON_FULL + (ORACLE,)
RESERVING = ("queue", ORACLE)  # admission reserves the rest of the request: nothing to do when full
#: Blocks kept free at admission (vLLM's watermark, 1%), so a new prompt does not preempt at once.
WATERMARK = 0.01
#: Free share of the pool a spilled request needs before its DDR tokens come back (hysteresis: no thrash).
RESTORE_HEADROOM = 0.05
#: Spill's cap: the most a decode step may cost over the same batch held in HBM because it reads spilled tokens
#: (the step model's price under ``--strategy``), as a share. Past it the step preempts (recompute) instead:
#: uncapped, the spilled tokens' reads slowed every step 4-6x under overload and the queue behind starved
#: (docs/serving.md, "Spill's cap"). Caps 0-0.05 measured alike there under overload, larger ones worse; 0.05
#: leaves a strategy whose reads never fully hide a little room. Below the knee, where the reads hide behind the
#: step's compute, the cap never refuses and changes nothing.
SPILL_CAP = 0.05


def default_max_tokens(outputs, context: int | None = None) -> int:
    """``max_tokens`` when none is given: the smallest power of two that cuts no output of the workload (a
    service's cap set to cover its longest answers, the least a ``max_tokens`` reservation can hold), never past
    the model's ``context`` (when known): a cap beyond it reserves room no request can fill (outputs near a
    40,960-token context rounded up to 65,536 and a reserving queue refused a workload the model runs)."""
    longest = int(max(outputs, default=1))
    cap = 1 << max(longest - 1, 0).bit_length()
    return cap if context is None else min(cap, context)


def blocks(tokens) -> int:
    return -(-int(tokens) // BLOCK_TOKENS)


@dataclass(frozen=True)
class Budget:
    """What one TP rank can hold: HBM blocks for KV, the bytes of one block, the DDR bytes for KV."""

    blocks: int
    block_bytes: float
    ddr_bytes: float
    weights_bytes: float
    layers: int
    staged: float = 1.0  # share of DDR tokens the strategy stages in HBM (stepcost.StepPricer.staged_share)

    @property
    def kv_gb(self) -> float:
        return self.blocks * self.block_bytes / GB

    def staging_blocks(self, ddr_tokens: int) -> int:
        """HBM blocks the two one-layer staging buffers take while ``ddr_tokens`` tokens are read from DDR."""
        staged = int(-(-int(ddr_tokens) * self.staged // 1))
        return -(-2 * staged // (BLOCK_TOKENS * self.layers)) if staged else 0


def budget(model: Model, rank: Model, gpu: GPU, max_batch: int, token_budget: int) -> Budget:
    """The KV budget of one rank (``rank``: the TP shard of ``model``); one line when the weights leave none."""
    rows = max(max_batch, token_budget)
    activations = rows * analytic.ACTIVATION_HIDDEN_MULTIPLE * rank.hidden_size * 2 \
        + max_batch * rank.logits_bytes_per_sequence
    left = gpu.hbm_bytes - rank.weight_bytes - activations - gpu.reserved_bytes
    block_bytes = BLOCK_TOKENS * rank.kv_bytes_per_token
    if left < block_bytes and left + activations >= block_bytes:  # the weights fit: the step workspace is the cause
        knob, value = ("--token-budget", token_budget) if token_budget >= max_batch else ("--max-batch", max_batch)
        raise TiersimError(f"{model.name} on {gpu.name}: the step workspace of {knob} {value:,} "
                           f"({activations / GB:.1f} GB per GPU) leaves no HBM for KV beside the weights "
                           f"({rank.weight_bytes / GB:.1f} GB) in {gpu.hbm_bytes / GB:.0f} GB; use a smaller {knob}")
    if left < block_bytes:
        raise TiersimError(f"{model.name} on {gpu.name}: its weights ({rank.weight_bytes / GB:.1f} GB per GPU) and "
                           f"workspace leave no HBM for KV in {gpu.hbm_bytes / GB:.0f} GB; use a larger --tp")
    return Budget(int(left // block_bytes), block_bytes, gpu.host_bytes, rank.weight_bytes, model.num_layers)


def spill_tokens(tiers: TierConfig, context: int, spilled: int) -> int:
    """More tokens of a request holding ``context`` to move to DDR under the tier split (0: nothing more)."""
    target = tier_targets(tiers, int(context), tiers.sink_tokens + tiers.recent_window)["ddr"]
    return max(target - int(spilled), 0)


def spill_tokens_many(tiers: TierConfig, contexts: np.ndarray, spilled: np.ndarray) -> np.ndarray:
    """:func:`spill_tokens` over arrays of requests (``tier_targets_array``, the same counts): the engine weighs
    every decoding request at each spill."""
    return np.maximum(tier_targets_array(tiers, contexts)["ddr"].astype(np.int64) - spilled, 0)


def blocks_many(tokens: np.ndarray) -> np.ndarray:
    """:func:`blocks` over an array."""
    return -(-tokens // BLOCK_TOKENS)


class Unservable(TiersimError):
    """A request of the workload can never run under this policy (it would wait forever): the policy has no
    answer for the workload, while another (spill, a larger TP) may."""


def reservation(on_full: str, output: int, max_tokens: int) -> int:
    """Output tokens a reserving policy holds room for at admission: ``max_tokens`` (queue), the truth (oracle)."""
    return output if on_full == ORACLE else max_tokens


def check_fits(budget: Budget, tiers: TierConfig, on_full: str, prompt: int, output: int, index: int,
               max_tokens: int) -> None:
    """:class:`Unservable` (one line) if a single request could never run alone under ``on_full``."""
    if output > max_tokens:
        raise TiersimError(f"request {index + 1} asks for {output:,} output tokens, more than max_tokens "
                           f"{max_tokens:,}")
    reserved = on_full in RESERVING
    longest = prompt + (reservation(on_full, output, max_tokens) if reserved else output) - 1
    need = blocks(longest)
    if on_full == "spill":
        moved = spill_tokens(tiers, longest, 0)
        need = blocks(longest - moved) + budget.staging_blocks(moved)
    if need > budget.blocks or blocks(prompt) > budget.blocks:
        gb = need * budget.block_bytes / GB
        held = f", reserving max_tokens {max_tokens:,}" if on_full == "queue" else ""
        raise Unservable(f"request {index + 1} ({prompt:,} prompt + {output:,} output tokens{held}) needs {gb:.1f} GB of "
                           f"KV per GPU, more than the {budget.kv_gb:.1f} GB left beside the weights; use a larger "
                           f"--tp{'' if on_full == 'spill' else ' or --on-full spill'}"
                           f"{' or a smaller --max-tokens' if on_full == 'queue' else ''}")


class Pool:
    """The rank's HBM blocks: ``used`` by requests, ``reserved`` for admitted requests' future tokens (queue),
    ``staging`` for the spill buffers."""

    def __init__(self, total: int):
        self.total, self.used, self.reserved, self.staging = int(total), 0, 0, 0

    @property
    def free(self) -> int:
        return self.total - self.used - self.reserved - self.staging

    def take(self, n: int) -> None:
        if n > self.free:
            raise AssertionError(f"pool overdrawn: {n} blocks wanted, {self.free} free")
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n
        if self.used < 0:
            raise AssertionError("pool: more blocks returned than taken")


def check_on_full(name: str) -> str:
    if name not in POLICIES:
        raise TiersimError(f"--on-full must be one of {', '.join(POLICIES)}, got {name!r}")
    return name

