"""How the DDR tier reaches attention: six offload strategies as closed-form step times; numpy only.

The GPU side (a layer's compute with some share of the DDR tier staged in HBM) comes from
``analytic.layer_costs``; this module adds what each strategy moves and where it computes: the
host link, host memory bandwidth and CPU FLOPs (the GPU preset's host figures), and GPU FLOPs
for recomputation. Per layer, per step (batch totals, arrays over steps); a step is L layers.
The physics of each is written in docs/simulator.md ("Strategies"). Every strategy's step is
assembled by ``analytic.closed_form`` from its per-layer GPU time and link time, with the same
per-step work (LM head, embedding rows, host overhead), host floor and operator tables as the
SimPy engine, so ``prefetch`` here is the engine's contention-free step (tested to 1%).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from tiersim.simulator import analytic, physics
from tiersim.simulator.analytic import COMPRESSED_BITS, COPY_CALLS_PER_LAYER, Offload, Workload
from tiersim.simulator.presets import GPU, Model

STRATEGIES = ("prefetch", "host-attention", "hybrid", "recompute", "selective", "compressed-transfer")
#: Strategies whose output differs from the full cache's beyond floating-point rounding.
APPROXIMATE = frozenset({"selective", "compressed-transfer"})
SHORT = {"prefetch": "pf", "host-attention": "host", "hybrid": "hyb", "recompute": "kvpr",
         "selective": "sel*", "compressed-transfer": "int8*"}
#: Shares tried by the strategies that split the DDR tier (hybrid, recompute). The end points are
#: the pure strategies, so a split is never worse than either of its parts.
SPLITS = np.linspace(0.0, 1.0, 21)
TRANSFER_BITS = 8  # compressed-transfer: int8 codes with one fp16 scale and minimum per 32


@dataclass(frozen=True)
class Timing:
    """A strategy's per-step times and what it stages in HBM."""

    strategy: str
    step: np.ndarray  # seconds per step
    staged: float  # share of the DDR tier staged in HBM per layer (sets the staging buffers)
    share: float  # hybrid: share on the host; recompute: share sent as activations; selective: share fetched
    approximate: bool


def _costs(model: Model, gpu: GPU, offload: Offload, work: Workload, staged: float, table=None) -> analytic.LayerCosts:
    """The engine's costs with ``staged`` of the DDR tier attended from staging: per-layer compute,
    per-step extra work and host floor (from ``table`` when given, else the roofline)."""
    return analytic.layer_costs(model, gpu, replace(offload, prefetch=staged), work, table)


def _step(costs: analytic.LayerCosts, layers: int, gpu_layer: np.ndarray, link_layer: np.ndarray) -> np.ndarray:
    """Seconds per step: ``gpu_layer`` of GPU work per layer against ``link_layer`` arriving layer-ahead."""
    return analytic.closed_form(replace(costs, compute=gpu_layer, h2d=link_layer), layers)[0]


def _link(gpu: GPU, nbytes: np.ndarray) -> np.ndarray:
    """Host-to-device copy of one layer's bytes: ``2 · latency + bytes / bandwidth`` (as the engine)."""
    return np.where(nbytes > 0, COPY_CALLS_PER_LAYER * gpu.copy_latency + nbytes / gpu.h2d_bw, 0.0)


def host_attention_time(model: Model, gpu: GPU, tokens: np.ndarray, batch: int) -> np.ndarray:
    """Host side of one layer: query down, attention over ``tokens`` DDR tokens on the CPU, partial
    output and log-sum-exp up. The CPU reads every K and V once from host memory."""
    kv = tokens * model.kv_bytes_per_token_layer
    flops = 4.0 * tokens * model.num_attention_heads * model.head_dim  # QK^T and PV, 2 FLOPs per MAC
    cpu = np.maximum(kv / gpu.host_bw_per_gpu, flops / gpu.host_flops_per_gpu) + gpu.host_call_overhead
    q_bytes = batch * model.num_attention_heads * model.head_dim * 2
    out_bytes = batch * model.num_attention_heads * (model.head_dim + 1) * 4  # fp32 partial output + lse
    link = 2 * gpu.copy_latency + q_bytes / gpu.h2d_bw + out_bytes / gpu.d2h_bw
    return np.where(tokens > 0, cpu + link, 0.0)


def _hbm_attention(model: Model, gpu: GPU, work: Workload) -> np.ndarray:
    """The GPU's own attention over the HBM tier: the window host attention overlaps with (the same
    attention term the roofline charges, ``physics.attention_s``)."""
    return physics.attention_s(gpu, work.hbm * model.kv_bytes_per_token_layer)


def _split_step(model: Model, gpu: GPU, offload: Offload, work: Workload, host_share: float, table=None) -> np.ndarray:
    """Step time with ``host_share`` of the DDR tier attended on the host, the rest prefetched.

    The prefetched part crosses the link while the previous layer computes; the host part needs this
    layer's query, so it runs during this layer and hides only under the GPU's HBM-tier attention.
    """
    staged = 1.0 - host_share
    costs = _costs(model, gpu, offload, work, staged, table)
    c = costs.compute
    host = host_attention_time(model, gpu, work.ddr * host_share, work.batch)
    window = np.minimum(_hbm_attention(model, gpu, work), c)
    gpu_side = c - window + np.maximum(window, host)
    return _step(costs, model.num_layers, gpu_side, _link(gpu, work.ddr * staged * model.kv_bytes_per_token_layer))


def _recompute_step(model: Model, gpu: GPU, work: Workload, share: float, costs: analytic.LayerCosts) -> np.ndarray:
    """KVPR: ``share`` of the DDR tokens cross as layer inputs (hidden_size values) and get K, V
    recomputed on the GPU (``2 · hidden · 2 · kv_heads · head_dim`` FLOPs per token, plus reading the
    inputs and writing K, V), the rest as K, V. Both arrive under the previous layer's compute."""
    kv = model.kv_bytes_per_token_layer
    act = model.hidden_size * 2
    n = work.ddr * share
    flops = n * 2.0 * model.hidden_size * 2 * model.num_kv_heads * model.head_dim
    recompute = np.maximum(n * (act + kv) / (gpu.hbm_bw * gpu.hbm_efficiency), flops / (gpu.peak_flops * gpu.flops_efficiency))
    link = _link(gpu, n * act + work.ddr * (1.0 - share) * kv)
    return _step(costs, model.num_layers, costs.compute + recompute, link)


def step_times(strategy: str, model: Model, gpu: GPU, offload: Offload, work: Workload,
               cover: float = 1.0, table=None) -> Timing:
    """Per-step time of ``strategy`` on ``work`` (``cover``: the share ``selective`` fetches; ``table``:
    measured operator tables, as the engine uses them)."""
    layers = model.num_layers
    kv = model.kv_bytes_per_token_layer
    if strategy == "prefetch" or work.ddr.max() <= 0:
        costs = _costs(model, gpu, offload, work, 1.0, table)
        return Timing(strategy, _step(costs, layers, costs.compute, _link(gpu, work.ddr * kv)), 1.0, 1.0,
                      strategy in APPROXIMATE and work.ddr.max() > 0)
    if strategy in ("host-attention", "hybrid"):
        shares = [1.0] if strategy == "host-attention" else SPLITS
        best = min(((_split_step(model, gpu, offload, work, x, table), x) for x in shares),
                   key=lambda t: float(t[0].mean()))
        return Timing(strategy, best[0], 1.0 - best[1], best[1], False)
    if strategy == "recompute":
        costs = _costs(model, gpu, offload, work, 1.0, table)
        best = min(((_recompute_step(model, gpu, work, y, costs), y) for y in SPLITS),
                   key=lambda t: float(t[0].mean()))
        return Timing(strategy, best[0], 1.0, best[1], False)
    if strategy == "selective":
        costs = _costs(model, gpu, offload, work, cover, table)
        return Timing(strategy, _step(costs, layers, costs.compute, _link(gpu, work.ddr * cover * kv)), cover, cover,
                      True)
    if strategy == "compressed-transfer":
        ratio = COMPRESSED_BITS[TRANSFER_BITS] / (8 * model.kv_dtype_bytes)
        costs = _costs(model, gpu, offload, work, 1.0, table)
        # Dequantize on the GPU: read the codes, write bf16 into staging (attention then reads it: in c).
        c = costs.compute + work.ddr * kv * (ratio + 1.0) / (gpu.hbm_bw * gpu.hbm_efficiency)
        return Timing(strategy, _step(costs, layers, c, _link(gpu, work.ddr * kv * ratio)), 1.0, ratio, True)
    raise ValueError(f"unknown strategy {strategy!r}")
