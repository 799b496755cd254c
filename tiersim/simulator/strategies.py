"""How the DDR tier reaches attention, priced: each strategy's :class:`~tiersim.simulator.step.StepCosts`; numpy only.

The names, exactness and labels are the registry's (``tiersim.hierarchy.strategies``); this module
prices each name with its function of the same name (:data:`COSTS`, built from the registry) and no more.
The GPU side (a layer's compute with some share of the DDR tier staged in HBM) comes from
``analytic.layer_costs``; each strategy adds what it moves and where it computes: the host link, host
memory bandwidth and CPU FLOPs (the GPU preset's host figures), and GPU FLOPs for recomputation. Per
layer, per step (batch totals, arrays over steps). The physics of each is written in docs/simulator.md
("Strategies"). A strategy is costs, never a step formula: any solver of ``step`` times it (the closed
form for the planner's sweeps, the recurrence or SimPy for the grid), and strategies that split the DDR
tier (hybrid, recompute) choose their share by the closed form's mean step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from tiersim.hierarchy import strategies as registry
from tiersim.simulator import analytic, physics
from tiersim.simulator.analytic import Offload, Workload
from tiersim.simulator.link import copy_s
from tiersim.simulator.presets import GPU, Model
from tiersim.simulator.step import StepCosts, closed_form

STRATEGIES = registry.NAMES
#: Strategies whose output differs from the full cache's beyond floating-point rounding.
APPROXIMATE = registry.APPROXIMATE
#: Shares tried by the strategies that split the DDR tier (hybrid, recompute). The end points are
#: the pure strategies, so a split is never worse than either of its parts.
SPLITS = np.linspace(0.0, 1.0, 21)
TRANSFER_BITS = 8  # compressed-transfer: int8 codes, scales as the compressed tier keeps them
FP32 = 4


@dataclass(frozen=True)
class Timing:
    """A strategy's per-step times (closed form) and what it stages in HBM."""

    strategy: str
    step: np.ndarray  # seconds per step
    staged: float  # share of the DDR tier staged in HBM per layer (sets the staging buffers)
    share: float  # hybrid: share on the host; recompute: share sent as activations; selective: share fetched
    approximate: bool
    costs: StepCosts | None = None


def _base(model: Model, gpu: GPU, offload: Offload, work: Workload, staged: float, table=None,
          note: str = "roofline") -> StepCosts:
    """The engine's costs with ``staged`` of the DDR tier attended from staging: per-layer compute,
    per-step extra work and host floor (from ``table`` when given, else the roofline)."""
    return analytic.layer_costs(model, gpu, replace(offload, prefetch=staged), work, table, note)


def _with(costs: StepCosts, gpu: GPU, name: str, share: float, h2d_bytes=None, **fields) -> StepCosts:
    """``costs`` as strategy ``name`` with its share; ``h2d_bytes`` re-prices the layer-ahead copy."""
    if h2d_bytes is not None:
        fields.update(h2d_bytes=np.asarray(h2d_bytes, dtype=float), h2d=copy_s(gpu, h2d_bytes, "h2d"))
    return replace(costs, strategy=name, share=float(share), exact=registry.get(name).exact, **fields)


def host_attention_bytes(model: Model, tokens, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(down, up) bytes of one layer's host attention over ``tokens`` DDR tokens, as the cache moves them
    (tiersim.hierarchy.access.HostAttention): the query down; the partial output and its log-sum-exp up in
    float32, and the host part's attention probabilities (float32 per query head and token: the cache's
    cumulative scoring needs every token's)."""
    tokens = np.asarray(tokens, dtype=float)
    heads = model.num_attention_heads
    down = np.where(tokens > 0, batch * heads * model.head_dim * model.kv_dtype_bytes, 0.0)
    up = np.where(tokens > 0, batch * heads * (model.head_dim + 1) * FP32 + tokens * heads * FP32, 0.0)
    return down, up


def host_attention_time(model: Model, gpu: GPU, tokens: np.ndarray, batch: int) -> np.ndarray:
    """Host side of one layer: query down, attention over ``tokens`` DDR tokens on the CPU, partial
    output and log-sum-exp up. The CPU reads every K and V once from host memory."""
    tokens = np.asarray(tokens, dtype=float)
    kv = tokens * model.kv_bytes_per_token_layer
    flops = 4.0 * tokens * model.num_attention_heads * model.head_dim  # QK^T and PV, 2 FLOPs per MAC
    cpu = np.maximum(kv / gpu.host_bw_per_gpu, flops / gpu.host_flops_per_gpu) + gpu.host_call_overhead
    down, up = host_attention_bytes(model, tokens, batch)
    link = copy_s(gpu, down, "d2h", calls=1) + copy_s(gpu, up, "h2d", calls=1)
    return np.where(tokens > 0, cpu + link, 0.0)


def _hbm_attention(model: Model, gpu: GPU, work: Workload) -> np.ndarray:
    """The GPU's own attention over the HBM tier: the window host attention overlaps with (the same
    attention term the roofline charges, ``physics.attention_s``, with the model's GQA group: an engine preset whose
    kernel re-reads KV heads per query head charges those re-reads here as in ``physics.layer_s``)."""
    return physics.attention_s(gpu, work.hbm * model.kv_bytes_per_token_layer, blocks=work.batch * model.num_kv_heads,
                               group=physics.gqa_group(model))


def _best(candidates):
    """The (costs, share) whose closed-form mean step is least (ties: the first, i.e. the smaller share)."""
    return min(candidates, key=lambda t: float(closed_form(t[0], t[2])[0].mean()))[:2]


# -- one cost function per registered name ----------------------------------------------------------------
def prefetch(model, gpu, offload, work, cover=1.0, table=None, share=None, note="roofline") -> StepCosts:
    """The whole DDR tier of layer l+1 crosses the link while layer l computes (the engine's own model)."""
    return _with(_base(model, gpu, offload, work, 1.0, table, note), gpu, "prefetch", 1.0)


def _split(model, gpu, offload, work, host_share: float, table=None, name="hybrid", note="roofline") -> StepCosts:
    """``host_share`` of the DDR tier attended on the host, the rest prefetched. The prefetched part crosses
    the link while the previous layer computes; the host part needs this layer's query, so it runs during
    this layer and hides only under the GPU's HBM-tier attention."""
    staged = 1.0 - host_share
    costs = _base(model, gpu, offload, work, staged, table, note)
    tokens = work.ddr * host_share
    down, up = host_attention_bytes(model, tokens, work.batch)
    return _with(costs, gpu, name, host_share, h2d_bytes=work.ddr * staged * model.kv_bytes_per_token_layer,
                 host=host_attention_time(model, gpu, tokens, work.batch),
                 host_window=np.minimum(_hbm_attention(model, gpu, work), costs.compute),
                 host_d2h_bytes=down, host_h2d_bytes=up, staged=staged)


def host_attention(model, gpu, offload, work, cover=1.0, table=None, share=None, note="roofline") -> StepCosts:
    """Attention over the DDR tokens on the host CPU, from host memory; the GPU merges the two partials."""
    return _split(model, gpu, offload, work, 1.0, table, name="host-attention", note=note)


def hybrid(model, gpu, offload, work, cover=1.0, table=None, share=None, note="roofline") -> StepCosts:
    """A share of the DDR tokens on the host, the rest prefetched; the share on :data:`SPLITS` (or ``share``)."""
    shares = SPLITS if share is None else [share]
    return _best((_split(model, gpu, offload, work, x, table, note=note), x, model.num_layers) for x in shares)[0]


def _recompute(model, gpu, work, y: float, costs: StepCosts) -> StepCosts:
    """KVPR: ``y`` of the DDR tokens cross as layer inputs (hidden_size values) and get K, V recomputed on
    the GPU (``2 · hidden · 2 · kv_heads · head_dim`` FLOPs per token, plus reading the inputs and writing
    K, V), the rest as K, V. Both arrive under the previous layer's compute."""
    kv = model.kv_bytes_per_token_layer
    act = model.hidden_size * model.kv_dtype_bytes
    n = work.ddr * y
    flops = n * 2.0 * model.hidden_size * 2 * model.num_kv_heads * model.head_dim
    extra = np.maximum(n * (act + kv) / (gpu.hbm_bw * gpu.hbm_efficiency), flops / (gpu.peak_flops * gpu.flops_efficiency))
    return _with(costs, gpu, "recompute", y, h2d_bytes=n * act + work.ddr * (1.0 - y) * kv, compute=costs.compute + extra)


def recompute(model, gpu, offload, work, cover=1.0, table=None, share=None, note="roofline") -> StepCosts:
    costs = _base(model, gpu, offload, work, 1.0, table, note)
    shares = SPLITS if share is None else [share]
    return _best((_recompute(model, gpu, work, y, costs), y, model.num_layers) for y in shares)[0]


def selective(model, gpu, offload, work, cover=1.0, table=None, share=None, note="roofline") -> StepCosts:
    """Fetch only ``cover`` of the DDR tokens (the trace's oracle share holding 99% of the DDR tier's mass)."""
    cover = cover if share is None else share
    return _with(_base(model, gpu, offload, work, cover, table, note), gpu, "selective", cover)


def compressed_transfer(model, gpu, offload, work, cover=1.0, table=None, share=None, note="roofline") -> StepCosts:
    """The DDR tier crosses as int8 codes with the compressed tier's scales (``analytic.compressed_ratio``) and
    is dequantized on the GPU: read the codes, write full precision into staging (attention then reads it)."""
    ratio = analytic.compressed_ratio(model, offload.tiers, bits=TRANSFER_BITS)
    costs = _base(model, gpu, offload, work, 1.0, table, note)
    kv = work.ddr * model.kv_bytes_per_token_layer
    dequant = kv * (ratio + 1.0) / (gpu.hbm_bw * gpu.hbm_efficiency)
    return _with(costs, gpu, "compressed-transfer", ratio, h2d_bytes=kv * ratio, compute=costs.compute + dequant)


#: The simulator's half of the registry: strategy name -> its cost function, the function named like the
#: strategy (``host-attention`` -> :func:`host_attention`). Read from the registry, so a strategy registered
#: without its cost function fails here, at import.
COSTS = {name: globals()[name.replace("-", "_")] for name in registry.NAMES}


def measured_share(strategy: str | None, fetch_share: float | None) -> float | None:
    """The ``share`` to price a point the cache ran with ``strategy`` at ``fetch_share`` (the TierConfig knob, the
    share of the DDR tier fetched to the device): hybrid's ``share`` is the part on the host, ``1 - fetch_share``;
    selective's is the part fetched. None where the strategy takes no share (its split is implied) or none was
    recorded: the strategy prices its own split. The validator's predictions and ``simulate --against`` both
    price measured points through this one translation."""
    fetched = registry.own_share(strategy, fetch_share)
    if fetched is None:
        return None
    return 1.0 - fetched if strategy == "hybrid" else fetched


def step_costs(strategy: str, model: Model, gpu: GPU, offload: Offload, work: Workload, cover: float = 1.0,
               table=None, share: float | None = None, note: str = "roofline") -> StepCosts:
    """The :class:`StepCosts` of ``strategy`` on ``work`` (``cover``: the share ``selective`` fetches;
    ``table``: measured operator tables; ``share``: a fixed split instead of the best one; ``note``: why the
    roofline is used, shown in ``compute_model``). With nothing in
    DDR every strategy is the plain step (prefetch of nothing), under the strategy's name."""
    if strategy not in COSTS:
        raise ValueError(f"unknown strategy {strategy!r}")
    if work.ddr.max() <= 0:
        costs = prefetch(model, gpu, offload, work, table=table, note=note)
        return replace(costs, strategy=strategy, exact=True)
    return COSTS[strategy](model, gpu, offload, work, cover=cover, table=table, share=share, note=note)


def step_times(strategy: str, model: Model, gpu: GPU, offload: Offload, work: Workload,
               cover: float = 1.0, table=None) -> Timing:
    """``strategy``'s closed-form step times on ``work`` (what the planner sweeps)."""
    costs = step_costs(strategy, model, gpu, offload, work, cover, table)
    step = closed_form(costs, model.num_layers)[0]
    return Timing(strategy, step, costs.staged, costs.share, not costs.exact, costs)
