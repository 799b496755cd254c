"""The roofline's decode physics, fitted on public per-operator GPU profiles; numpy only.

One HBM efficiency for every byte (the old roofline) is wrong in two directions at once (issue 16,
items 1-2): streaming a layer's weights through its GEMMs reaches one share of the datasheet
bandwidth, slows down as the token count grows (+10% from 1 to 64 tokens on an A100) and pays a
fixed cost per kernel, while decode attention reads the KV cache at another share after a fixed
kernel cost that dominates short contexts (46% of peak at batch 1 / 8K on an A100, ~80% at large
batch). The small element-wise ops (norms, RoPE, activation, residual add) are launch-bound and
grow with the layer's width. Each term below is one of those observations; the constants live on
the GPU preset (``presets.GPU``) with the data they were fitted on, and ``fidelity`` re-fits and
checks them against the public tables (docs/simulator.md, "Fidelity").

A serving engine runs a layer as four GEMMs (fused q/k/v, o, fused gate/up, down), which is the
layout the public profiles measured; ``GEMMS_PER_LAYER`` charges the per-kernel cost that often. A
plain (non-gated) MLP is four GEMMs too: its up projection is one GEMM of the intermediate width
instead of the fused gate/up of twice it (vidur's profiled block, vidur/profiling/mlp/mlp_impl.py);
only its weight bytes differ (``Model.gated_mlp``: 2 MLP matrices instead of 3).

Counting the small ops by the block's structure (one norm in a parallel attention/MLP block instead
of two, GELU over the intermediate width instead of SiLU x mul over twice it) was tried against the
public tables and does not help: fitted on the gated, two-norm fit cases only, it moves phi-2 by the
same few microseconds in opposite directions on A100 and H100 (the engine's LayerNorm and GELU are
other kernels than its fused RMSNorm and SiLU x mul), so the small ops stay one floor plus a width
term (docs/simulator.md, "Fidelity").
"""

from __future__ import annotations

import numpy as np

from tiersim.simulator.presets import GPU, Model

#: GEMM kernels per decoder layer in a serving engine: fused q/k/v, o, fused gate/up (or a plain up), down.
GEMMS_PER_LAYER = 4
#: Token count at which ``GPU.gemm_batch_slowdown`` is reached (it grows with log2 of the tokens).
SLOWDOWN_TOKENS = 64


def slowdown(gpu: GPU, tokens) -> np.ndarray | float:
    """Factor on the weight-streaming time at ``tokens`` rows: 1 at one token, 1 + slowdown at 64."""
    t = np.maximum(np.asarray(tokens, dtype=float), 1.0)
    return 1.0 + gpu.gemm_batch_slowdown * np.log2(t) / np.log2(SLOWDOWN_TOKENS)


def weight_stream_s(gpu: GPU, weight_bytes: float, tokens, kernels: int = GEMMS_PER_LAYER):
    """Seconds to run ``kernels`` GEMMs reading ``weight_bytes`` of weights for ``tokens`` rows."""
    bw = gpu.hbm_bw * gpu.weight_efficiency
    return kernels * gpu.gemm_kernel_s + weight_bytes / bw * slowdown(gpu, tokens)


def attention_s(gpu: GPU, kv_bytes):
    """Seconds of decode attention reading ``kv_bytes`` of KV (the batch's, one layer); 0 for none."""
    kv_bytes = np.asarray(kv_bytes, dtype=float)
    return np.where(kv_bytes > 0, gpu.attn_kernel_s + kv_bytes / (gpu.hbm_bw * gpu.attn_efficiency), 0.0)


def small_ops_s(gpu: GPU, model: Model) -> float:
    """Per-layer norms, RoPE, activation and residual adds: a launch-bound floor plus a width term."""
    return gpu.layer_overhead + gpu.layer_overhead_per_width * (model.hidden_size + model.mlp_width)


def layer_s(model: Model, gpu: GPU, batch: int, kv_read, extra_bytes=0.0, attended=None):
    """One decoder layer's compute time for ``batch`` tokens reading ``kv_read`` bytes of KV.

    ``max(weights + attention + extra passes, FLOPs / peak) + small ops``: the memory terms run back
    to back (separate kernels), the FLOP bound only binds far above decode batch sizes.
    ``extra_bytes`` (the cache's own passes) stream at the plain HBM efficiency.
    """
    t_mem = (weight_stream_s(gpu, model.layer_weight_bytes, batch) + attention_s(gpu, kv_read)
             + np.asarray(extra_bytes, dtype=float) / (gpu.hbm_bw * gpu.hbm_efficiency))
    attended = 0.0 if attended is None else attended
    flops = 2 * model.layer_weight_bytes / model.param_bytes * batch
    flops = flops + 4 * np.asarray(attended, dtype=float) * model.num_attention_heads * model.head_dim
    return np.maximum(t_mem, flops / (gpu.peak_flops * gpu.flops_efficiency)) + small_ops_s(gpu, model)


def gather_s(model: Model, gpu: GPU, rows):
    """Gathering ``rows`` embedding rows (one per token entering the model), at the HBM efficiency."""
    return rows * model.hidden_size * model.param_bytes / (gpu.hbm_bw * gpu.hbm_efficiency)


def lm_head_s(model: Model, gpu: GPU, batch: int) -> float:
    """The LM head (one GEMM over the whole vocabulary table) plus the gather of ``batch`` embedding rows."""
    head = weight_stream_s(gpu, model.lm_head_bytes, batch, kernels=1)
    gather = gather_s(model, gpu, batch)
    flops = 2.0 * batch * model.vocab_size * model.hidden_size
    return float(max(head + gather, flops / (gpu.peak_flops * gpu.flops_efficiency)))


def host_overhead_s(gpu: GPU, sequences) -> float:
    """Host time per step that the GPU waits for (scheduling, sampling, input and output handling) with
    ``sequences`` sampled this step: the one per-step overhead of decode, prefill and mixed steps."""
    return gpu.step_overhead + gpu.step_overhead_per_sequence * sequences
