"""The roofline's decode physics, fitted on public per-operator GPU profiles; numpy only.

One HBM efficiency for every byte (the old roofline) is wrong in two directions at once (issue 16,
items 1-2): streaming a layer's weights through its GEMMs reaches one share of the datasheet
bandwidth, slows down as the token count grows (+10% from 1 to 64 tokens on an A100) and pays a
fixed cost per kernel, while decode attention reads the KV cache at another share after a fixed
kernel cost that dominates short contexts (46% of peak at batch 1 / 8K on an A100, ~80% at large
batch). A kernel that does not split the KV (one thread block per sequence and KV head, TensorRT-LLM 0.9's)
reads at most ``blocks x GPU.attn_block_bw``: at batch 1 it leaves HBM idle (an engine preset sets the rate).
The small element-wise ops (norms, RoPE, activation, residual add) are launch-bound and grow with the layer's
width. Each term below is one of those observations; the constants live on
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


def layer_flops_per_token(model: Model) -> float:
    """GEMM FLOPs one token costs in one layer: two per weight (multiply and add)."""
    return 2.0 * model.layer_weight_bytes / model.param_bytes


#: Exponent of the p-norm joining the GEMMs' memory and compute times: 1 would add them, infinity take the
#: larger; 3 fits vidur's public A100/H100 tables best between 128 and 1024 tokens, where neither bound alone holds
#: (docs/simulator.md "Prefill").
GEMM_ROLLOFF = 3.0


def gemm_compute_s(model: Model, gpu: GPU, rows):
    """The four GEMMs' compute time for ``rows`` token rows: per-kernel cost + FLOPs at the prefill efficiency.

    From one tile up the FLOPs are counted over ``ceil(rows / tile)`` full tiles (a 129-row GEMM computes two
    128-row tiles); below one tile the kernel library picks narrower tiles, as the decode tables show (no step
    between 1 and 64 tokens), so the rows count as they are.
    """
    rows = np.maximum(np.asarray(rows, dtype=float), 1.0)
    tile = max(int(gpu.prefill_gemm_tile), 1)
    tiled = np.where(rows >= tile, np.ceil(rows / tile) * tile, rows)
    return (GEMMS_PER_LAYER * gpu.gemm_kernel_s
            + layer_flops_per_token(model) * tiled / (gpu.peak_flops * gpu.prefill_gemm_efficiency))


def gemm_s(model: Model, gpu: GPU, rows):
    """One layer's four GEMMs over ``rows`` token rows, decode batch or prefill chunk alike: weight streaming
    (:func:`weight_stream_s`) and compute (:func:`gemm_compute_s`) joined by a p-norm (:data:`GEMM_ROLLOFF`).

    Within 0.2% of weight streaming up to 16 tokens and of compute past 2K. Between, neither bound alone holds:
    vidur's public H100 tables rise 6-9% from 64 to 128 tokens (CodeLlama-34B +6.0%, InternLM-20B +9.2%, phi-2
    +6.2%; github.com/microsoft/vidur @ 7d47513, data/profiling/compute/h100/*/mlp.csv, the decode and prefill
    reference files), where weight streaming alone rises 0.7%: the curve past 64 tokens is this roll-off into
    compute, fitted on those tables' 128-4096-token rows (``prefill_fidelity``) and monotone in the rows.
    """
    rows = np.maximum(np.asarray(rows, dtype=float), 1.0)
    memory = weight_stream_s(gpu, model.layer_weight_bytes, rows)
    compute = gemm_compute_s(model, gpu, rows)
    p = GEMM_ROLLOFF
    return (memory ** p + compute ** p) ** (1.0 / p)


def l2_miss_share(gpu: GPU, kv_bytes):
    """Share of a layer's ``kv_bytes`` that a second read of it finds outside L2: ``max(0, 1 - L2 / bytes)``.

    Zero while the layer's KV fits in ``gpu.l2_bytes`` (batch 1: a few MB against 40-50 MB), towards one as it
    outgrows it (batch 64 x 2K: hundreds of MB)."""
    kv_bytes = np.asarray(kv_bytes, dtype=float)
    return np.clip(1.0 - gpu.l2_bytes / np.maximum(kv_bytes, 1.0), 0.0, 1.0)


def gqa_group(model: Model) -> int:
    """Query heads per KV head (1 for MHA): how often a kernel that is not GQA-aware reads each KV head."""
    return max(model.num_attention_heads // max(model.num_kv_heads, 1), 1)


def reread_bytes(gpu: GPU, kv_bytes, group: int = 1):
    """HBM bytes a kernel that reads each KV head once per query head of its ``group`` adds to one read of
    ``kv_bytes``: ``(group - 1) x kv_bytes x share x`` :func:`l2_miss_share` (``gpu.attn_kv_reread_share``; 0
    for MHA, for a GQA-aware kernel, and on every GPU preset; the ``trtllm`` engine preset sets it, fitted on the
    DLI table by ``decode_fidelity.fit_kv_reread_share``)."""
    kv_bytes = np.asarray(kv_bytes, dtype=float)
    if gpu.attn_kv_reread_share <= 0 or group <= 1:
        return np.zeros_like(kv_bytes)
    return (group - 1) * kv_bytes * gpu.attn_kv_reread_share * l2_miss_share(gpu, kv_bytes)


def attention_s(gpu: GPU, kv_bytes, blocks=None, group: int = 1):
    """Seconds of decode attention reading ``kv_bytes`` of KV (the batch's, one layer); 0 for none.

    ``blocks`` (sequences x KV heads) caps the read rate at ``blocks x gpu.attn_block_bw`` where the engine's
    kernel does not split the KV (``attn_block_bw > 0``): one block per sequence and KV head cannot keep HBM
    busy at batch 1 (TensorRT-LLM 0.9's decode attention: docs/simulator.md, "Fidelity"). ``group`` (query heads
    per KV head, :func:`gqa_group`) adds :func:`reread_bytes` where ``gpu.attn_kv_reread_share`` is set (by the
    ``trtllm`` engine preset only: TensorRT-LLM 0.9's decode kernel; 0 on every GPU preset). Callers pricing a
    model's decode attention pass its group, so every path (roofline, mixed step, offload strategies) charges the
    same re-reads."""
    kv_bytes = np.asarray(kv_bytes, dtype=float)
    bw = gpu.hbm_bw * gpu.attn_efficiency
    if gpu.attn_block_bw > 0 and blocks is not None:
        bw = np.minimum(bw, np.maximum(np.asarray(blocks, dtype=float), 1.0) * gpu.attn_block_bw)
    return np.where(kv_bytes > 0, gpu.attn_kernel_s + (kv_bytes + reread_bytes(gpu, kv_bytes, group)) / bw, 0.0)


def small_ops_s(gpu: GPU, model: Model) -> float:
    """Per-layer norms, RoPE, activation and residual adds: a launch-bound floor plus a width term."""
    return gpu.layer_overhead + gpu.layer_overhead_per_width * (model.hidden_size + model.mlp_width)


def decode_attention_s(model: Model, gpu: GPU, batch, kv_read, extra_bytes=0.0, attended=None):
    """The decode rows' attention in one layer: ``max(attention + extra passes, attention FLOPs / peak)`` for
    ``batch`` rows reading ``kv_read`` bytes of KV over ``attended`` tokens (batch total). ``extra_bytes`` (the
    cache's own passes) stream at the plain HBM efficiency. The one term a decode layer and a mixed step's decode
    rows both charge (``prefill.mixed_layer_s``)."""
    t_attn = (attention_s(gpu, kv_read, blocks=np.asarray(batch, dtype=float) * model.num_kv_heads,
                          group=gqa_group(model))
              + np.asarray(extra_bytes, dtype=float) / (gpu.hbm_bw * gpu.hbm_efficiency))
    attended = 0.0 if attended is None else attended
    flops = 4 * np.asarray(attended, dtype=float) * model.num_attention_heads * model.head_dim
    return np.maximum(t_attn, flops / (gpu.peak_flops * gpu.flops_efficiency))


def layer_s(model: Model, gpu: GPU, batch: int, kv_read, extra_bytes=0.0, attended=None):
    """One decoder layer's compute time for ``batch`` tokens reading ``kv_read`` bytes of KV.

    ``GEMMs + decode attention + small ops``: separate kernels back to back. The GEMMs are :func:`gemm_s`
    (weight streaming at decode sizes, rolling off into compute past ~64 rows: the same curve a prefill chunk of
    that many rows is priced on); the attention is :func:`decode_attention_s`.
    """
    return (gemm_s(model, gpu, batch) + decode_attention_s(model, gpu, batch, kv_read, extra_bytes, attended)
            + small_ops_s(gpu, model))


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
