"""The batch workload, the memory model, per-layer costs and the closed-form step time; numpy only.

The SimPy engine adds what the closed form cannot: contention between the two link directions
under a shared ceiling, queueing on the copy engines and per-step variation. Where neither
applies, the two agree (tested to 1%).

Workload: B batch slots run sequences back to back (continuous batching). Each slot has its
own generated length (log-normal around the chosen reasoning length) and a random phase, so the
batch is staggered. At every step the split's token counts per tier are computed for each slot
with the same rule the cache uses (``tier_targets``, re-tiered every R steps, new tokens in HBM
in between), then summed over the batch: the event count does not grow with B.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from tiersim.hierarchy import quant_layout
from tiersim.hierarchy.config import TierConfig, tier_targets_array
from tiersim.simulator import physics
from tiersim.simulator.link import COPY_CALLS_PER_LAYER, copy_s  # noqa: F401  (COPY_CALLS_PER_LAYER: its old home)
from tiersim.simulator.presets import GB, GPU, Model
from tiersim.simulator.step import StepCosts, closed_form  # noqa: F401  (closed_form: its old home)

if TYPE_CHECKING:  # pragma: no cover
    from tiersim.simulator.profile import OperatorTable

#: The compressed tier's layout is the cache's (tiersim.hierarchy.quant_layout), imported, not restated.
SCALE_BYTES, KEY_GROUP_INDEX_BYTES = quant_layout.SCALE_BYTES, quant_layout.KEY_GROUP_INDEX_BYTES
#: Activation workspace per sequence, in units of hidden_size elements of 2 bytes (residual,
#: attention and MLP intermediates live briefly; logits are counted separately).
ACTIVATION_HIDDEN_MULTIPLE = 48
#: Extra passes over a layer's retained KV that tiersim's own TieredCache makes once tokens leave
#: HBM: the scatter into one ordered buffer (read the tiers, write the buffer: 2 passes) and the
#: float32 scoring of every key (half the KV: 0.5). A kernel attending over the tiers in place
#: would not pay them; the validator measures the cache as it is, so the simulator charges them.
ASSEMBLY_KV_PASSES = 2.5
#: Former name of :class:`tiersim.simulator.step.StepCosts` (what analytic's per-layer costs are).
LayerCosts = StepCosts


def compressed_bytes_per_token_layer(model: Model, bits: int, group: int) -> float:
    """Bytes one token of one layer takes in the compressed tier (keys and values, every KV head), as the
    cache stores it (``quant_layout.bytes_per_token_layer``)."""
    return quant_layout.bytes_per_token_layer(model.num_kv_heads, model.head_dim, bits, group)


def compressed_ratio(model: Model, tiers: TierConfig, bits: int | None = None) -> float:
    """Compressed bytes per full-precision byte, for ``tiers``' bits (or ``bits``) and quantization group."""
    nbytes = compressed_bytes_per_token_layer(model, bits or tiers.compressed_bits, tiers.quant_group)
    return nbytes / model.kv_bytes_per_token_layer


@dataclass(frozen=True)
class Offload:
    """What the simulator prices: a tier split (the cache's own :class:`TierConfig`, which also carries
    the sinks, window, re-tier interval and compressed bits) and the share of its DDR tier fetched.

    ``prefetch`` sits beside the split rather than in it because it is the simulator's knob, not the
    cache's: an oracle selective prefetch read from a trace's DDR cover, which the strategies and the
    planner vary per strategy on one fixed split (``dataclasses.replace(offload, prefetch=...)``).
    TierConfig's own ``fetch_share`` is what the real cache runs and is validated against its
    strategy; folding the two would make every simulated split pretend to be a cache strategy.
    """

    tiers: TierConfig
    #: Share of the DDR tier fetched before each layer's attention: 1.0 is the exact hierarchy; less
    #: is an oracle selective prefetch (the trace's DDR cover counts), which drops attention mass.
    prefetch: float = 1.0


@dataclass
class Workload:
    """Batch totals per simulated step (arrays of length S); tokens are per layer (equal on all layers)."""

    batch: int
    steps: np.ndarray
    context: np.ndarray  # retained tokens summed over the batch
    full_context: np.ndarray  # tokens a full cache would hold (nothing evicted)
    hbm: np.ndarray
    ddr: np.ndarray
    compressed: np.ndarray
    demoted: np.ndarray  # tokens copied HBM -> DDR at this step (per layer)
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def context_mean(self) -> float:
        return float(self.full_context.mean() / self.batch)


def workload_from_counts(batch: int, hbm, ddr, compressed=0.0, demoted=0.0, context=None,
                         full_context=None) -> Workload:
    """A :class:`Workload` from the batch's token counts per layer (numbers: one step; arrays: one per step)."""
    hbm, ddr, compressed, demoted = np.broadcast_arrays(*(np.atleast_1d(np.asarray(x, dtype=float))
                                                          for x in (hbm, ddr, compressed, demoted)))
    context = hbm + ddr + compressed if context is None else np.broadcast_to(np.asarray(context, dtype=float), hbm.shape)
    full = context if full_context is None else np.broadcast_to(np.asarray(full_context, dtype=float), hbm.shape)
    return Workload(batch=batch, steps=np.arange(len(hbm)), context=np.array(context), full_context=np.array(full),
                    hbm=np.array(hbm), ddr=np.array(ddr), compressed=np.array(compressed), demoted=np.array(demoted))


def sample_lengths(batch: int, mean_length: float, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Generated lengths per slot, log-normal with the given mean."""
    mu = np.log(mean_length) - sigma**2 / 2
    return np.maximum(np.round(rng.lognormal(mu, sigma, batch)), 2).astype(np.int64)


def build_workload(
    offload: Offload,
    batch: int,
    lengths: np.ndarray,
    prompt_len: int,
    steps: int,
    churn: tuple[float, float] = (0.0, 0.0),
    seed: int = 0,
    lockstep: bool = False,
) -> Workload:
    """Staggered batch of ``batch`` slots over ``steps`` decode steps.

    ``lengths`` holds each slot's generated length (cycled: a finished slot starts a new sequence
    of the same length). ``churn = (a, b)`` adds ``a * T**b * T`` swapped tokens per slot at each
    re-tiering point on top of the net count change (fitted on a captured trace). ``lockstep``
    starts every slot at its first decode step together (a static batch: fixed-context runs and
    the validator's measurements), so step s holds ``prompt_len + 1 + s`` tokens, instead of at a
    random phase.
    """
    lengths = np.asarray(lengths, dtype=np.int64)[:batch]
    phase = slot_phases(lengths, seed, lockstep)
    table = position_counts(offload, int(lengths.max()), prompt_len, churn)
    totals = np.zeros((len(COUNT_KEYS), steps))
    for p, n in zip(phase.tolist(), lengths.tolist()):
        add_slot(totals, table, p, n)
    return Workload(batch=batch, steps=np.arange(steps), lengths=lengths, **dict(zip(COUNT_KEYS, totals)))


#: What :func:`position_counts` tabulates per decode index, in this order (all per layer, in tokens).
COUNT_KEYS = ("context", "full_context", "hbm", "ddr", "compressed", "demoted")


def slot_phases(lengths: np.ndarray, seed: int, lockstep: bool) -> np.ndarray:
    """Each slot's decode index at step 0: random (a staggered batch) or 1 for all (lockstep).

    Drawn slot by slot from ``seed``, so the first B phases of a larger batch are this batch's: batch B + 1
    is batch B plus one slot (what makes the largest-batch search exact)."""
    if lockstep:
        return np.ones(len(lengths), dtype=np.int64)
    return (np.random.default_rng(seed).random(len(lengths)) * lengths).astype(np.int64)


def position_counts(offload: Offload, positions: int, prompt_len: int, churn: tuple[float, float]) -> np.ndarray:
    """``[len(COUNT_KEYS), positions]``: what one slot holds at each decode index of its sequence.

    A slot's counts depend only on where it is in its sequence, so they are tabulated once and every slot
    and step looks its index up: the policy's rule runs over the longest sequence, not over batch x steps.
    Index 0 is the prefill step; decode starts at 1 (index 0 repeats index 1). ``churn = (a, b)`` adds
    ``a * T**b * T`` swapped tokens at each re-tiering point on top of the net count change.
    """
    pos = np.maximum(np.arange(max(positions, 1)), 1)
    t = (prompt_len + pos).astype(float)
    r = offload.tiers.retier_every
    last = pos - pos % r
    tg = tier_targets_array(offload.tiers, (prompt_len + last).astype(float))
    hbm = tg["hbm"] + (pos - last)
    at_retier = pos % r == 0
    prev = tier_targets_array(offload.tiers, np.maximum(prompt_len + last - r, prompt_len).astype(float))
    a, b = churn
    swap = np.where(at_retier, np.minimum(np.round(a * t**b * t), prev["ddr"]), 0.0)
    demoted = np.where(at_retier, np.maximum(tg["ddr"] - prev["ddr"], 0.0), 0.0) + swap
    retained = t - tg["evicted"]
    return np.stack([retained, t, hbm, tg["ddr"], tg["compressed"], demoted])


def add_slot(totals: np.ndarray, table: np.ndarray, phase: int, length: int) -> None:
    """Add one slot's counts at every step to ``totals`` (in place, ``[columns, steps]``; ``table`` is
    ``[columns, positions]``).

    The slot runs ``table[phase:length]``, then starts its sequence over (``table[0:length]``) until the
    steps run out: a few contiguous slice additions per slot, so a workload costs ~batch x steps / length
    numpy calls and no index arrays. Counts are whole numbers, so the sums are exact in any order.
    """
    step, pos, steps = 0, phase % length, totals.shape[-1]
    while step < steps:
        n = min(length - pos, steps - step)
        totals[..., step:step + n] += table[..., pos:pos + n]
        step, pos = step + n, 0


@dataclass
class Memory:
    """Peak HBM use and its parts, and the DDR tier in host memory; bytes."""

    weights: float
    kv_full: float
    kv_hbm: float
    compressed: float
    staging: float
    activations: float
    reserved: float
    ddr: float = 0.0  # pinned host memory the DDR tier occupies at peak

    @property
    def peak(self) -> float:
        return self.weights + self.kv_hbm + self.compressed + self.staging + self.activations + self.reserved

    def fit_flags(self, gpu: GPU):
        """(HBM peak within the GPU's HBM, DDR tier within the host memory lent to it): the one definition of
        "fits" (``capacity.fits`` is both); elementwise where the fields are arrays over batch sizes."""
        return np.asarray(self.peak) <= gpu.hbm_bytes, np.asarray(self.ddr) <= gpu.host_bytes

    @property
    def saved(self) -> float:
        """HBM a full cache would use for KV minus what this config uses (tier, compressed, staging)."""
        return self.kv_full - self.kv_hbm - self.compressed - self.staging


def memory(model: Model, gpu: GPU, offload: Offload, work: Workload) -> Memory:
    return memory_at_peaks(model, gpu, offload, work.batch, float(work.full_context.max()), float(work.hbm.max()),
                           float(work.compressed.max()), float(work.ddr.max()))


def memory_at_peaks(model: Model, gpu: GPU, offload: Offload, batch, full, hbm, compressed, ddr) -> Memory:
    """:class:`Memory` from the batch's peak token counts per layer (numbers, or arrays: one per batch size,
    for the largest-batch search; the same arithmetic either way, so both give the same bits)."""
    per_token = model.kv_bytes_per_token
    per_layer = model.kv_bytes_per_token_layer
    comp_ratio = compressed_ratio(model, offload.tiers)
    return Memory(
        weights=model.weight_bytes,
        kv_full=full * per_token,
        kv_hbm=hbm * per_token,
        compressed=compressed * per_token * comp_ratio,
        # Double-buffered staging for one layer's fetched DDR tokens (the batch's).
        staging=2 * ddr * offload.prefetch * per_layer,
        activations=batch * (ACTIVATION_HIDDEN_MULTIPLE * model.hidden_size * 2 + model.logits_bytes_per_sequence),
        reserved=gpu.reserved_bytes,
        ddr=ddr * per_token,
    )


def extra_kv_bytes(model: Model, offload: Offload, work: Workload) -> np.ndarray:
    """Per-layer bytes beyond attention's own KV read: the compressed tier's dequantized copy (written
    and read back: no fused dequant-attention kernel assumed), the cache's float32 scoring pass once
    tokens may leave HBM (0.5) and its reassembly in token order when some are not in HBM (2 passes)."""
    per_layer = model.kv_bytes_per_token_layer
    extra = work.compressed * per_layer * 2.0
    if offload.tiers.hbm < 1.0:
        passes = 0.5 + (ASSEMBLY_KV_PASSES - 0.5 if offload.tiers.ddr > 0 or offload.tiers.compressed > 0 else 0.0)
        extra = extra + passes * work.context * per_layer
    return extra


def layer_costs(model: Model, gpu: GPU, offload: Offload, work: Workload, table: OperatorTable | None = None,
                roofline_reason: str = "roofline") -> StepCosts:
    """Compute per layer and per step, and copy times ``latency * calls + bytes / bandwidth``.

    Without ``table`` compute is the roofline of ``physics.layer_s``: weights, attention and the cache's
    extra passes each at their own fitted efficiency (max with ``flops / peak``) plus the small ops; with one (tiersim.simulator.profile) it is the sum of the measured operators at this
    batch and context. Either way a layer reads its own weights only: the input embedding is a gather
    of ``batch`` rows and the LM head a once-per-step read, both charged in ``step_extra``.
    """
    per_layer = model.kv_bytes_per_token_layer
    comp_ratio = compressed_ratio(model, offload.tiers)
    bw = gpu.hbm_bw * gpu.hbm_efficiency
    peak = gpu.peak_flops * gpu.flops_efficiency
    # Tokens attention reads: HBM tier + staged DDR (from the staging buffer) + compressed codes.
    attended = work.hbm + work.ddr * offload.prefetch + work.compressed
    kv_read = (work.hbm + work.ddr * offload.prefetch) * per_layer + work.compressed * per_layer * comp_ratio
    extra = extra_kv_bytes(model, offload, work)
    batch = work.batch
    host_floor = gpu.step_host_floor  # an engine preset's launch-bound floor (tiersim.simulator.engines)
    host = host_overhead_s(gpu, batch)
    if table is None:
        # Weights, attention and small ops each at their own measured efficiency (tiersim.simulator.physics).
        compute = physics.layer_s(model, gpu, batch, kv_read, extra, attended)
        step_extra = physics.lm_head_s(model, gpu, batch) + host
        source = roofline_reason
    else:
        from tiersim.simulator.profile import LAYER_GEMMS, LAYER_SMALL, STEP_SMALL

        fixed = sum(table.gemm_s(op, batch, bw, peak) for op in LAYER_GEMMS)
        fixed += sum(n * table.small_s(op, batch) for op, n in LAYER_SMALL.items() if op in table.small)
        context = attended / batch
        compute = fixed + table.attention_s(batch, context, per_layer, bw) + extra / bw
        step_extra = table.gemm_s("lm_head", batch, bw, peak) + sum(table.small_s(op, batch) for op in STEP_SMALL)
        step_extra += host
        host_floor = max(table.host_s(batch), host_floor)
        source = table.describe()
        if host_floor:
            source += f"; host floor {host_floor * 1e3:.1f} ms/step ({table.host_source})"
    if host:
        source += f"; host overhead {host * 1e3:.2f} ms/step"
    if table is None and host_floor:
        source += f"; host floor {host_floor * 1e3:.1f} ms/step"
    if gpu.engine:
        source += f"; engine overhead {gpu.engine}"
    compute = np.broadcast_to(np.asarray(compute, dtype=float), work.hbm.shape).copy()
    h2d_bytes = work.ddr * offload.prefetch * per_layer
    d2h_bytes = work.demoted * per_layer
    return StepCosts(compute, copy_s(gpu, h2d_bytes, "h2d"), copy_s(gpu, d2h_bytes, "d2h"), h2d_bytes, d2h_bytes,
                     step_extra=step_extra, host_floor=host_floor, compute_model=source, staged=offload.prefetch,
                     staged_bytes=h2d_bytes, share=offload.prefetch)


#: Its home is physics (prefill's steps pay it too); the name stays here for its callers.
host_overhead_s = physics.host_overhead_s


def to_gb(x) -> float:
    return float(x) / GB
