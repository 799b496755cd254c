"""Prefill and mixed (chunked-prefill + decode) step physics, priced on their own; numpy only.

A decode step is memory-bound: its GEMMs stream the layer's weights for a handful of token rows and
its attention reads the batch's KV (``physics.layer_s``). A prefill chunk of hundreds to thousands of
tokens is the other regime: the same weights serve every row, so the GEMMs are compute-bound
(``2 x layer params x rows`` FLOPs at a share of the dense peak), and attention grows with the square
of the prompt (each new query attends to every earlier key: causal, about half the square). Pricing
prefill with the decode formula would charge a 4K-token prompt the time of one weight read.

The terms, per decoder layer (constants on ``presets.GPU``, fitted and checked by ``prefill_fidelity``):

* **GEMMs**: weight streaming at ``rows`` tokens (the decode physics' own ``physics.weight_stream_s``:
  the weights must still be read once, so a short prompt is no faster than a decode step) and compute
  (``kernels x gemm_kernel_s + FLOPs / (peak x prefill_gemm_efficiency)``, the FLOPs counted over
  ``ceil(rows / tile)`` full row tiles from one tile up: tile quantization), joined by a p-norm
  (``physics.GEMM_ROLLOFF``) since between ~128 and ~1K tokens neither bound alone holds.
* **Prefill attention**: ``q`` new queries over ``context`` earlier keys plus their own causal
  triangle: ``q x context + q (q + 1) / 2`` query-key pairs, ``4 x pairs x heads x head_dim`` FLOPs at a
  FlashAttention-class share of peak that grows with the keys (:func:`attention_efficiency`), at least
  the time to read the keys and values once (decode attention's bandwidth), after one attention
  kernel's fixed cost.
* **Small ops**: the decode floor (``physics.small_ops_s``) plus, per token, the activation bytes the
  norms, RoPE, activation and residual adds read and write (``small_ops_bytes_per_token``) at
  ``prefill_small_ops_efficiency`` of HBM: ~10% of a long prefill, nothing at one token.

A **mixed step** (Sarathi-style: decode tokens and one prefill chunk in one forward) runs the GEMMs
once over the decode and prefill rows together, decode attention over the batch's KV
(``physics.attention_s``) and prefill attention for the chunk; with no prefill tokens it is exactly
``physics.layer_s``. The step adds the LM head for the rows that sample a token (every decode token,
and the chunk's last token when it ends a prompt) and the engine's per-step host work.
"""

from __future__ import annotations

import numpy as np

from tiersim.simulator import physics
# The GEMM time at any row count (weight streaming and tiled compute joined by a p-norm) is the decode step's
# too: it lives in physics, the one place both regimes read it (decode batches of 128-512 rows price as a chunk).
from tiersim.simulator.physics import gemm_s
from tiersim.simulator.presets import GPU, Model


def _arr(x) -> np.ndarray:
    return np.asarray(x, dtype=float)


def _scalar_or_array(x):
    x = np.asarray(x, dtype=float)
    return float(x) if x.ndim == 0 else x


def attention_pairs(tokens, context=0):
    """Query-key pairs of ``tokens`` new causal queries after ``context`` earlier keys."""
    q, c = _arr(tokens), _arr(context)
    return q * c + q * (q + 1.0) / 2.0


def attention_efficiency(gpu: GPU, keys):
    """Share of peak FLOP/s causal attention reaches over ``keys`` keys: it rises with the sequence (fewer
    partial tiles, more parallel work), ``prefill_attn_efficiency x keys / (keys + prefill_attn_half_keys)``."""
    keys = np.maximum(_arr(keys), 1.0)
    return gpu.prefill_attn_efficiency * keys / (keys + gpu.prefill_attn_half_keys)


def prefill_attention_s(model: Model, gpu: GPU, tokens, context=0, sequences: int = 1):
    """Prefill attention of one chunk (one layer): compute-bound over the pairs, at least one KV read; 0 for none.

    ``sequences`` equal chunks of a batched forward run in **one** kernel call (a packed, variable-length
    FlashAttention-class launch, as vLLM and TensorRT-LLM run a batch's prompts): their work adds, the fixed
    cost is paid once, not once per prompt (at 64 prompts x 128 tokens the per-prompt floor was 18% of an H100's
    simulated Llama-2-7B prefill)."""
    q, c = _arr(tokens), _arr(context)
    flops = 4.0 * attention_pairs(q, c) * model.num_attention_heads * model.head_dim
    compute = flops / (gpu.peak_flops * attention_efficiency(gpu, q + c))
    kv = (q + c) * model.kv_bytes_per_token_layer
    qo = 2.0 * q * model.num_attention_heads * model.head_dim * model.param_bytes
    memory = (kv + qo) / (gpu.hbm_bw * gpu.attn_efficiency)
    return np.where(q > 0, gpu.attn_kernel_s + int(sequences) * np.maximum(compute, memory), 0.0)


def small_ops_bytes_per_token(model: Model) -> float:
    """Activation bytes per token of one layer's small ops: 2 norms and 2 residual adds over the hidden
    width (read + write, adds read two), RoPE over q and k (read + write), SiLU x mul over the MLP.

    The sequential gated block's count for every layout: counted by ``Model.parallel_block`` / ``gated_mlp`` (one
    shared norm, GELU over one intermediate tensor) and refitted on the fit source, the held-out TTFT gets worse
    (docs/simulator.md, "Prefill", small-op bytes by layout; tests/test_model_layout.py)."""
    h, w = model.hidden_size, model.mlp_width
    rope = 2 * (model.num_attention_heads + model.num_kv_heads) * model.head_dim
    elements = 2 * 2 * h + 2 * 3 * h + rope + 3 * w
    return float(elements * model.param_bytes)


def small_ops_s(model: Model, gpu: GPU, tokens):
    """Per-layer small ops for ``tokens`` rows: the decode floor plus their activation traffic."""
    bw = gpu.hbm_bw * gpu.prefill_small_ops_efficiency
    return physics.small_ops_s(gpu, model) + _arr(tokens) * small_ops_bytes_per_token(model) / bw


def prefill_layer_s(model: Model, gpu: GPU, tokens, context=0, sequences: int = 1):
    """One decoder layer's time to prefill ``tokens`` new tokens after ``context`` cached ones (a chunk), for
    ``sequences`` such chunks batched in one forward (GEMMs and small ops over every row, attention per sequence).

    GEMMs, attention and small ops are separate kernels, so their times add. Arrays broadcast.
    """
    rows = int(sequences) * _arr(tokens)
    t = (gemm_s(model, gpu, rows) + prefill_attention_s(model, gpu, tokens, context, sequences=sequences)
         + small_ops_s(model, gpu, rows))
    return _scalar_or_array(t)


def prefill_s(model: Model, gpu: GPU, tokens, context=0, sequences: int = 1):
    """The whole forward of one prefill chunk: every layer, the embedding gather, the LM head for the
    last token (one sampled token), and the engine's per-step host work for one sequence.

    ``prefill_s(model, gpu, prompt)`` is the GPU side of a single request's time to first token. With
    ``sequences = n`` it is one forward over ``n`` such chunks batched (an engine prefilling ``n`` equal
    prompts together): the GEMMs and small ops run once over all ``n x tokens`` rows (the weights are read
    once, the FLOPs add), attention is per sequence (each prompt attends to its own keys only) in one kernel call,
    and the LM head samples ``n`` tokens. ``sequences = 1`` is the single chunk exactly.
    """
    tokens, n = _arr(tokens), int(sequences)
    if n < 1:
        raise ValueError(f"sequences must be >= 1, got {sequences!r}")
    layer = _arr(prefill_layer_s(model, gpu, tokens, context, n))
    gathered = np.maximum(n * tokens - n, 0.0)  # the LM head's own gather has each sequence's last row
    gather = physics.gather_s(model, gpu, gathered)
    head = physics.lm_head_s(model, gpu, n)
    host = physics.host_overhead_s(gpu, n)
    t = model.num_layers * layer + gather + head + host
    return _scalar_or_array(t)


def chunked_prefill_s(model: Model, gpu: GPU, prompt: int, chunk: int) -> float:
    """A prompt prefilled alone in chunks of ``chunk`` tokens (each chunk one step after the previous)."""
    prompt, chunk = int(prompt), max(int(chunk), 1)
    starts = np.arange(0, max(prompt, 0), chunk)
    sizes = np.minimum(chunk, prompt - starts)
    return float(np.sum(prefill_s(model, gpu, sizes, starts)))


def mixed_layer_s(model: Model, gpu: GPU, decode_tokens, kv_read_bytes, prefill_tokens, prefill_context=0,
                  extra_bytes=0.0, attended=None):
    """One layer of a mixed step: ``decode_tokens`` decode rows reading ``kv_read_bytes`` of KV, plus a
    prefill chunk of ``prefill_tokens`` after ``prefill_context`` cached tokens of its prompt.

    With ``prefill_tokens == 0`` this is ``physics.layer_s(model, gpu, decode_tokens, kv_read_bytes,
    extra_bytes, attended)`` exactly (elementwise for arrays). Otherwise the GEMMs run over decode +
    prefill rows (``gemm_s``), the decode rows' attention is the decode layer's own
    (``physics.decode_attention_s``: the chunk does not change what they read), prefill attention adds the
    chunk's pairs and the small ops cover every row.
    """
    p = _arr(prefill_tokens)
    decode = physics.layer_s(model, gpu, decode_tokens, kv_read_bytes, extra_bytes, attended)
    rows = _arr(decode_tokens) + p
    mixed = (gemm_s(model, gpu, rows)
             + physics.decode_attention_s(model, gpu, decode_tokens, kv_read_bytes, extra_bytes, attended)
             + prefill_attention_s(model, gpu, p, prefill_context) + small_ops_s(model, gpu, rows))
    return _scalar_or_array(np.where(p > 0, mixed, decode))


def mixed_step_s(model: Model, gpu: GPU, decode_tokens, kv_read_bytes, prefill_tokens, prefill_context=0,
                 prefill_done=False):
    """A whole mixed step without offload: every layer, the LM head over the rows that sample (each decode
    token, plus one if the chunk ends its prompt; at least one, as a lone chunk that ends nothing still runs the head
    on its last row: vLLM V1 samples a partial prefill and discards its token, vllm/v1/worker/gpu_model_runner.py,
    and :func:`prefill_s` charges every chunk so), the embedding gather and the per-step host work.

    With no prefill tokens this is what ``analytic.layer_costs`` charges a decode step held in HBM:
    ``layers x layer_s + lm_head_s(batch) + host overhead``.
    """
    d = int(decode_tokens)
    p = _arr(prefill_tokens)
    sampled = d + int(bool(prefill_done) and float(np.max(p)) > 0)
    layer = _arr(mixed_layer_s(model, gpu, d, kv_read_bytes, p, prefill_context))
    gathered = np.maximum(p - (sampled - d), 0.0)  # the LM head's own gather has the sampled rows
    gather = physics.gather_s(model, gpu, gathered)
    head = physics.lm_head_s(model, gpu, max(sampled, 1))
    host = physics.host_overhead_s(gpu, max(sampled, 1))
    return _scalar_or_array(model.num_layers * layer + gather + head + host)
