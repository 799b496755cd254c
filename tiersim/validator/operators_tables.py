"""The operator tables of a decode step: GEMMs, the small per-layer and per-step ops, decode attention and
the KV append, each timed in isolation with the model's real shapes and transformers' own functions.

Split from ``tiersim.validator.operators`` (which re-exports these names). Imports torch and transformers.
"""

from __future__ import annotations

import importlib
import time

import torch

from tiersim.validator.operators_timing import Budget, OpTimer, copies_for, free, is_oom
from tiersim.validator.sdpa import sdpa_backends

_PREFIX = {"qwen2": "Qwen2", "qwen3": "Qwen3", "llama": "Llama"}


def linear_shapes(shape) -> dict[str, tuple[int, int, bool]]:
    """(in, out, bias) of every GEMM the HF model runs per layer, and of the LM head (once per step)."""
    h, d = shape.hidden_size, shape.head_dim
    q, kv = shape.num_attention_heads * d, shape.num_kv_heads * d
    bias = shape.architecture == "qwen2"
    return {
        "q_proj": (h, q, bias), "k_proj": (h, kv, bias), "v_proj": (h, kv, bias), "o_proj": (q, h, False),
        "gate_proj": (h, shape.intermediate_size, False), "up_proj": (h, shape.intermediate_size, False),
        "down_proj": (shape.intermediate_size, h, False), "lm_head": (h, shape.vocab_size, False),
    }


def gemm_table(shape, tokens, timer: OpTimer, budget: Budget, dtype, skipped: list) -> list[dict]:
    rows = []
    dev = timer.device
    for op, (k, n, has_bias) in linear_shapes(shape).items():
        if budget.spent():
            skipped.append(f"gemm {op}: time budget spent")
            continue
        w_bytes = k * n * 2
        copies = copies_for(w_bytes, shape.num_layers if op != "lm_head" else 2)
        weights = [torch.randn(n, k, device=dev, dtype=dtype) * 0.02 for _ in range(copies)]
        biases = [torch.zeros(n, device=dev, dtype=dtype) if has_bias else None for _ in range(copies)]
        for t in tokens:
            xs = [torch.randn(t, k, device=dev, dtype=dtype) for _ in range(copies)]

            def fn(i, xs=xs):
                j = i % copies
                return torch.nn.functional.linear(xs[j], weights[j], biases[j])

            rows.append(timer.row(fn, copies, op=op, tokens=t, k=k, n=n, bias=has_bias,
                                  bytes=w_bytes + 2 * t * (k + n), flops=2 * t * k * n))
            del xs
        del weights, biases
        free(dev)
    return rows


def _hf_module(shape):
    return importlib.import_module(f"transformers.models.{shape.architecture}.modeling_{shape.architecture}")


def small_op_table(shape, tokens, timer: OpTimer, budget: Budget, dtype, skipped: list) -> list[dict]:
    """RMSNorm, RoPE, SiLU*mul and the residual add per layer; embedding, rotary table and final norm per step.

    Each uses the transformers function or module the model itself calls, so kernel counts match.
    """
    from transformers.activations import ACT2FN

    from tiersim.validator.shapes import hf_config

    dev = timer.device
    mod = _hf_module(shape)
    cfg = hf_config(shape)
    norm = getattr(mod, f"{_PREFIX[shape.architecture]}RMSNorm")(shape.hidden_size, eps=1e-6).to(dev, dtype)
    head_norm = getattr(mod, f"{_PREFIX[shape.architecture]}RMSNorm")(shape.head_dim, eps=1e-6).to(dev, dtype)
    rotary = getattr(mod, f"{_PREFIX[shape.architecture]}RotaryEmbedding")(config=cfg).to(dev)
    rope = mod.apply_rotary_pos_emb
    act = ACT2FN["silu"]
    h, inter, d = shape.hidden_size, shape.intermediate_size, shape.head_dim
    hq, hk = shape.num_attention_heads, shape.num_kv_heads
    table = torch.randn(shape.vocab_size, h, device=dev, dtype=dtype)
    rows = []
    for t in tokens:
        if budget.spent():
            skipped.append(f"small ops at {t} tokens: time budget spent")
            continue
        per_copy = 2 * t * max(h, inter, (hq + hk) * d)
        copies = copies_for(2 * per_copy, shape.num_layers)
        xs = [torch.randn(t, 1, h, device=dev, dtype=dtype) for _ in range(copies)]
        gates = [torch.randn(t, 1, inter, device=dev, dtype=dtype) for _ in range(copies)]
        ups = [torch.randn(t, 1, inter, device=dev, dtype=dtype) for _ in range(copies)]
        qs = [torch.randn(t, hq, 1, d, device=dev, dtype=dtype) for _ in range(copies)]
        ks = [torch.randn(t, hk, 1, d, device=dev, dtype=dtype) for _ in range(copies)]
        pos = torch.full((t, 1), 4096, device=dev, dtype=torch.long)
        cos, sin = rotary(xs[0], pos)
        ids = [torch.randint(shape.vocab_size, (t, 1), device=dev) for _ in range(copies)]
        ops = {
            "rmsnorm": (lambda i: norm(xs[i % copies]), "layer", 2),
            "rope": (lambda i: rope(qs[i % copies], ks[i % copies], cos, sin), "layer", 1),
            "silu_mul": (lambda i: act(gates[i % copies]) * ups[i % copies], "layer", 1),
            "residual_add": (lambda i: xs[i % copies] + xs[(i + 1) % copies], "layer", 2),
            "embedding": (lambda i: torch.nn.functional.embedding(ids[i % copies], table), "step", 1),
            "rotary_emb": (lambda i: rotary(xs[i % copies], pos), "step", 1),
            "final_norm": (lambda i: norm(xs[i % copies]), "step", 1),
        }
        if shape.architecture == "qwen3":
            ops["qk_norm"] = (lambda i: (head_norm(qs[i % copies]), head_norm(ks[i % copies])), "layer", 1)
        for op, (fn, scope, count) in ops.items():
            rows.append(timer.row(fn, copies, op=op, tokens=t, scope=scope, calls=count))
        del xs, gates, ups, qs, ks, ids
    del table
    free(dev)
    return rows


class _AttentionModule(torch.nn.Module):
    """What ``sdpa_attention_forward`` reads from the model's attention module."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True
        self.training = False


def attention_table(shape, batches, contexts, timer: OpTimer, budget: Budget, dtype, skipped: list) -> list[dict]:
    """Decode attention (one query) through transformers' SDPA function, and the DynamicCache KV append.

    The SDPA call is the one the model makes (no mask in an unpadded decode step), so the kernel
    transformers and torch choose on this machine is the one timed. ``kv_cat`` is ``torch.cat`` of
    one new token onto K and V, what ``DynamicCache.update`` does every layer and step.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dev = timer.device
    hq, hk, d = shape.num_attention_heads, shape.num_kv_heads, shape.head_dim
    module = _AttentionModule(hq // hk)
    rows = []
    for b in batches:
        for c in contexts:
            if budget.spent():
                skipped.append(f"attention batch {b} context {c}: time budget spent")
                continue
            kv_bytes = 2 * b * c * hk * d * 2
            copies = copies_for(kv_bytes, shape.num_layers)
            try:
                ks = [torch.randn(b, hk, c, d, device=dev, dtype=dtype) for _ in range(copies)]
                vs = [torch.randn(b, hk, c, d, device=dev, dtype=dtype) for _ in range(copies)]
                qs = [torch.randn(b, hq, 1, d, device=dev, dtype=dtype) for _ in range(copies)]
                new = torch.randn(b, hk, 1, d, device=dev, dtype=dtype)

                def attn(i):
                    j = i % copies
                    return sdpa_attention_forward(module, qs[j], ks[j], vs[j], None, scaling=d ** -0.5)[0]

                def cat(i):
                    j = i % copies
                    return torch.cat([ks[j], new], dim=-2), torch.cat([vs[j], new], dim=-2)

                common = {"batch": b, "context": c, "q_heads": hq, "kv_heads": hk, "head_dim": d, "kv_bytes": kv_bytes}
                for op, choice in (("sdpa_decode", "default"), ("sdpa_decode_no_cudnn", "no-cudnn")):
                    with sdpa_backends(choice):
                        timer.sync()
                        t0 = time.perf_counter()
                        attn(0)  # the first call at a new KV length: includes any per-shape plan build
                        timer.sync()
                        first_us = (time.perf_counter() - t0) * 1e6
                        rows.append({**timer.row(attn, copies, op=op, **common), "first_call_us": first_us})
                rows.append(timer.row(cat, copies, op="kv_cat", **common))
            except Exception as exc:  # noqa: BLE001 - out of memory or a failure: recorded, the next point runs
                why = "out of memory" if is_oom(exc) else f"failed: {type(exc).__name__}: {str(exc)[:200]}"
                skipped.append(f"attention batch {b} context {c}: {why}")
            finally:
                ks = vs = qs = new = None
                free(dev)
    return rows

