"""Tensor parallelism: a model sharded over TP GPUs of one node, and the all-reduces it adds; numpy only.

Megatron-style TP splits each layer's attention by heads (query and KV heads alike) and its MLP by the
intermediate width, and the vocabulary tables by rows, so every GPU holds ``1 / tp`` of the weights and
of each token's KV; the hidden width (norms, residuals, the all-reduced activations) stays whole. Each
layer then ends its attention and its MLP with one all-reduce of the ``tokens x hidden`` activations:
two per layer, or one where the block is parallel and the engine sums both outputs first (Falcon:
:func:`allreduces_per_layer`, the one place the count is decided). Everything else a step does runs on each
GPU over its shard, so a TP step is the single-GPU physics on :func:`shard`'s model plus
:func:`layer_allreduce_s` per layer.

The all-reduce is ``max(floor, latency + bytes x 2 (n - 1) / n / bus_bw)`` (NCCL's bus-bandwidth
convention; the profile is flat at 30-55 us below ~4 MiB, where launch and protocol cost dominate,
and linear above), fitted per GPU count on vidur's public NCCL all-reduce profiles of DGX-class NVSwitch
nodes (``tiersim/data/public-nvlink-allreduce.json``; docs/simulator.md, "Tensor parallel"). Every GPU
keeps its own PCIe link (the GPU preset's link figures are per GPU and unchanged), while the host's
DRAM is shared by all GPUs of a node: ``GPU.host_bw_per_gpu`` is already the node's bandwidth over
``gpus_per_host``, and it is what each TP rank's host-side work gets.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from functools import lru_cache
from importlib import resources

import numpy as np

from tiersim.errors import TiersimError
from tiersim.simulator.presets import GPU, SEQUENTIAL_ALLREDUCES, Model

TP_SIZES = (1, 2, 4, 8)
ALLREDUCE_DATA = "public-nvlink-allreduce.json"
#: A sequential block's all-reduces per layer (its old name; a model's own count is ``Model.allreduces_per_layer``).
ALLREDUCES_PER_LAYER = SEQUENTIAL_ALLREDUCES
#: GPU preset -> the measured NVLink/NVSwitch node its all-reduce line comes from. The H200 is an
#: NVLink4 HGX board like the H100 SXM: ASSUMPTION (no public H200 all-reduce table was found). The 40 GB A100
#: SXM4 (DGX A100 320 GB) has the 80 GB part's NVLink3 + NVSwitch fabric (vidur's table does not name the part).
NVLINK_OF = {"h100-sxm": "h100_dgx", "h200": "h100_dgx", "a100-80g": "a100_dgx", "a100-40g": "a100_dgx"}


@lru_cache(maxsize=1)
def load_allreduce() -> dict:
    """The public all-reduce measurements and the fitted line per (node, GPU count)."""
    return json.loads(resources.files("tiersim").joinpath("data", ALLREDUCE_DATA).read_text())


def check_tp(model: Model, tp: int) -> int:
    """``tp`` if the model can be split that many ways; one line otherwise."""
    if isinstance(tp, bool) or not isinstance(tp, (int, np.integer)) or int(tp) not in TP_SIZES:
        raise TiersimError(f"--tp must be one of {', '.join(map(str, TP_SIZES))}, got {tp!r}")
    tp = int(tp)
    if model.num_kv_heads % tp or model.num_attention_heads % tp:
        raise TiersimError(f"--tp {tp} must divide {model.name}'s KV heads ({model.num_kv_heads}) and "
                           f"attention heads ({model.num_attention_heads})")
    return tp


def shard(model: Model, tp: int) -> Model:
    """One TP rank's share of ``model``: heads, MLP width, vocabulary and weights divided by ``tp``.

    ``shard(m, 1) is m``. The shard keeps the full hidden width and layer count, so its
    ``layer_weight_bytes`` and ``kv_bytes_per_token_layer`` are the whole model's over ``tp`` and the
    single-GPU physics prices one rank's work unchanged.
    """
    tp = check_tp(model, tp)
    if tp == 1:
        return model
    tables = model.embedding_bytes * (1 if model.tie_word_embeddings else 2) / model.param_bytes
    norm = model.hidden_size
    layers = max(model.params - tables - norm, 0.0)
    vocab = math.ceil(model.vocab_size / tp)
    params = layers / tp + tables * vocab / model.vocab_size + norm
    return replace(model, name=f"{model.name}/tp{tp}", num_kv_heads=model.num_kv_heads // tp,
                   num_attention_heads=model.num_attention_heads // tp, params=float(params),
                   vocab_size=vocab, intermediate_size=math.ceil(model.mlp_width / tp))


def link_line(gpu: GPU, tp: int) -> tuple[float, float, float]:
    """(floor s, latency s, bus bandwidth B/s) of an all-reduce over ``tp`` GPUs of ``gpu``'s node."""
    key = NVLINK_OF.get(gpu.name)
    if key is None:
        raise TiersimError(f"--tp {tp}: no NVLink all-reduce measurements for GPU {gpu.name!r}; tensor "
                           f"parallel is priced for {', '.join(NVLINK_OF)}")
    if tp > gpu.gpus_per_host:
        raise TiersimError(f"--tp {tp}: {gpu.name} hosts have {gpu.gpus_per_host} GPU(s) per node")
    line = load_allreduce()["links"][key][str(tp)]
    return float(line["floor_s"]), float(line["latency_s"]), float(line["bus_bw"])


def allreduce_s(gpu: GPU, tp: int, nbytes, floor_s: float | None = None):
    """Seconds of one all-reduce of ``nbytes`` (per GPU) over ``tp`` GPUs; 0 at TP 1 or for no bytes.

    The measured floor is eager NCCL (vidur profiled without CUDA graphs): an engine that captures its decode
    steps in CUDA graphs with a one-shot all-reduce pays less for small messages (~6 us on 2 H100s with CUDA
    graphs, github.com/NVIDIA/nccl issue 1259); ``floor_s`` replaces the floor (and the line's latency, if lower).
    """
    nbytes = np.asarray(nbytes, dtype=float)
    if int(tp) == 1:
        return np.zeros_like(nbytes) if nbytes.ndim else 0.0
    floor, latency, bus_bw = link_line(gpu, int(tp))
    if floor_s is not None:
        floor, latency = float(floor_s), min(latency, float(floor_s))
    line = np.maximum(floor, latency + nbytes * 2.0 * (tp - 1) / tp / bus_bw)
    t = np.where(nbytes > 0, line, 0.0)
    return t if t.ndim else float(t)


def allreduces_per_layer(model: Model, engine: int | None = None) -> int:
    """All-reduces one layer of ``model`` runs under TP: the model's own count (``Model.allreduces_per_layer``, from
    its layout: two after a sequential block's attention and MLP, one for a parallel block engines sum before
    reducing, Falcon's), unless ``engine`` states how a particular engine build runs it (TensorRT-LLM v0.5's Falcon
    reduced twice; docs/simulator.md, "Prefill"). The one place every TP price reads the count."""
    count = model.allreduces_per_layer if engine is None else engine
    if isinstance(count, bool) or int(count) != count or int(count) not in (1, 2):
        raise ValueError(f"all-reduces per layer must be 1 or 2, got {count!r}")
    return int(count)


def layer_allreduce_s(model: Model, gpu: GPU, tp: int, tokens, floor_s: float | None = None,
                      allreduces: int | None = None):
    """The all-reduces of one layer for ``tokens`` rows: :func:`allreduces_per_layer` of them (``allreduces``: an
    engine's own count, where it differs from the model's).

    ``model`` may be the whole model or its shard: the hidden width and the layout are the same.
    """
    nbytes = np.asarray(tokens, dtype=float) * model.hidden_size * model.param_bytes
    return allreduces_per_layer(model, allreduces) * allreduce_s(gpu, tp, nbytes, floor_s)


def host_bw_per_rank(gpu: GPU) -> float:
    """Host DRAM bandwidth one TP rank's host-side work gets: the node's, shared by all its GPUs."""
    return gpu.host_bw_per_gpu


def tp_prefill_s(model: Model, gpu: GPU, tp: int, tokens, context=0, sequences: int = 1,
                 allreduces: int | None = None) -> float:
    """One request's prefill chunk on ``tp`` GPUs: one rank's prefill of the shard plus the layer's all-reduces
    (:func:`allreduces_per_layer`; ``allreduces``: an engine's own count) of every row (``sequences x tokens`` when
    ``sequences`` equal prompts are prefilled in one forward).

    At TP 1 this is ``prefill.prefill_s(model, gpu, tokens, context, sequences)``. A TP mixed step composes the same
    way: ``prefill.mixed_layer_s(shard(model, tp), ...) + layer_allreduce_s(model, gpu, tp, decode + prefill rows)``.
    """
    from tiersim.simulator import prefill

    rank = shard(model, tp)
    rows = int(sequences) * np.asarray(tokens, dtype=float)
    allreduce = model.num_layers * layer_allreduce_s(model, gpu, tp, rows, allreduces=allreduces)
    return float(prefill.prefill_s(rank, gpu, tokens, context, sequences) + allreduce)
