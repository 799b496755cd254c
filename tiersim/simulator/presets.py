"""Hardware and model presets (public figures from docs/design.md); stdlib only.

The GPU machine that runs the validator has no simpy or plotly, so this module, ``calibration``
and ``analytic`` import nothing beyond the standard library and numpy.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tiersim.errors import TiersimError

GB = 1e9


@dataclass(frozen=True)
class GPU:
    """One accelerator and its host link. Bandwidths in bytes/s, latency in seconds."""

    name: str
    hbm_bytes: float
    hbm_bw: float
    h2d_bw: float  # host->device, one direction, measured-class DMA rate
    d2h_bw: float
    bidir_bw: float  # shared ceiling when both directions run at once
    copy_latency: float  # per cudaMemcpyAsync call
    peak_flops: float  # dense bf16
    reserved_bytes: float = 2.5 * GB  # CUDA context, allocator slack, workspace: not usable for KV
    hbm_efficiency: float = 0.80  # achieved / datasheet HBM bandwidth of the cache's own extra KV passes
    flops_efficiency: float = 0.60
    # Decode physics (tiersim.simulator.physics), fitted on public per-operator profiles (vidur's, see
    # docs/simulator.md "Fidelity"; tiersim.simulator.fidelity re-fits them). Defaults: the H100 fit.
    #: Achieved / datasheet HBM bandwidth when a layer's GEMMs stream its weights (at one token).
    weight_efficiency: float = 0.92
    #: Fixed cost per GEMM kernel (4 per layer: fused q/k/v, o, fused gate/up, down).
    gemm_kernel_s: float = 5.4e-6
    #: Weight streaming slows with the token count: this much slower at 64 tokens than at 1 (log2 growth).
    gemm_batch_slowdown: float = 0.0447
    #: Decode attention: a fixed kernel cost, then the batch's KV at this share of the datasheet bandwidth.
    attn_kernel_s: float = 7.5e-6
    attn_efficiency: float = 0.92
    #: Small ops per decoder layer (2 RMSNorm, RoPE, activation, residual add, fused as a serving engine runs
    #: them): a launch-bound floor plus a term per element of width (hidden + intermediate). HF eager runs
    #: them unfused, ~51 us at 1 token on an H100 (docs/validation/h100-80gb-hbm3-operators.json): a
    #: ``--profile`` from the validator charges that instead.
    layer_overhead: float = 10.3e-6
    layer_overhead_per_width: float = 0.663e-9
    #: Host time per decode step that no kernel hides (scheduling, sampling, input preparation, output
    #: processing), added once per step: ``step_overhead + step_overhead_per_sequence * batch``. An engine that
    #: overlaps that work with the GPU hides it: 0 unless ``--host-overhead`` (:data:`HOST_OVERHEADS`) says so.
    step_overhead: float = 0.0
    step_overhead_per_sequence: float = 0.0
    host_bytes: float = 256 * GB  # pinned host memory for this GPU's DDR tier (a DGX-class 2 TB / 8 GPUs)
    # The host side, for strategies that compute on the CPU (docs/simulator.md, "Strategies"). The
    # default is a DGX H100-class host: 2 x Xeon Platinum 8480C (NVIDIA DGX H100 user guide), each
    # with 8 DDR5-4800 channels = 307 GB/s peak (Intel ARK), shared by 8 GPUs.
    gpus_per_host: int = 8
    host_sockets: int = 2
    host_socket_bw: float = 307.2 * GB  # peak DRAM bandwidth per socket
    host_bw_efficiency: float = 0.70  # ASSUMPTION: achievable share of peak in a streaming read
    #: ASSUMPTION: attention FLOP/s one socket sustains (56 cores x 2 GHz x 64 fp32 FLOP/cycle
    #: AVX-512 = 7.2 TFLOP/s peak, ~30% achieved in a decode attention kernel).
    host_socket_flops: float = 2.0e12
    host_call_overhead: float = 20e-6  # ASSUMPTION: waking the CPU workers once per layer
    #: H2D's share of ``bidir_bw`` while both directions move data, where measured uneven (A100 Gen4 hosts:
    #: H2D ~11 of ~35 GB/s); None shares the ceiling max-min fairly (each direction capped at its own rate).
    bidir_h2d_share: float | None = None
    note: str = ""
    # Prefill physics (tiersim.simulator.prefill), fitted by tiersim.simulator.prefill_fidelity (docs/simulator.md
    # "Prefill"). Defaults: the H100 fit; the A100's are set below GPUS. GEMMs: vidur's public per-operator profiles
    # at 128-4096 tokens (github.com/microsoft/vidur @ 7d47513, data/profiling/compute/h100/*/mlp.csv).
    #: Achieved / peak dense FLOP/s of a layer's GEMMs once they are compute-bound (many tokens).
    prefill_gemm_efficiency: float = 0.705
    #: GEMM row tile: from one tile up, n token rows cost the FLOPs of ceil(n / tile) full tiles.
    prefill_gemm_tile: int = 128
    #: Small ops' activation traffic (norms, RoPE, activation, residual adds) at this share of datasheet HBM.
    prefill_small_ops_efficiency: float = 0.815
    #: Causal prefill attention: ``efficiency x keys / (keys + half_keys)`` of peak FLOP/s. H100: FlashAttention-3
    #: forward, head dim 128, bf16, 430-621 TFLOP/s at 512-16K tokens (github.com/pytorch/benchmark pull 2391).
    prefill_attn_efficiency: float = 0.637
    prefill_attn_half_keys: float = 234.0

    @property
    def host_bw_per_gpu(self) -> float:
        """Host memory bandwidth one GPU's host-side work can count on (its share of the sockets)."""
        return self.host_sockets * self.host_socket_bw * self.host_bw_efficiency / self.gpus_per_host

    @property
    def host_flops_per_gpu(self) -> float:
        return self.host_sockets * self.host_socket_flops / self.gpus_per_host

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Model:
    """A decoder's shape. KV bytes are for bf16 unless ``kv_dtype_bytes`` says otherwise."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    num_attention_heads: int
    params: float
    param_bytes: float = 2.0
    kv_dtype_bytes: int = 2
    vocab_size: int = 152_064  # from the model's config.json; every preset states its own
    tie_word_embeddings: bool = False
    intermediate_size: int = 0  # MLP width; 0: derived from the parameter count
    #: Gated MLP (gate and up projections, SiLU x up: Llama, Qwen, Mistral) with 3 x hidden x width weights,
    #: or a plain one (up, GELU, down: Phi-2, GPT-NeoX) with 2 x. Every preset here is gated (its config.json's
    #: model_type is llama, qwen2 or qwen3); ``model_from_config`` reads it from the model_type.
    gated_mlp: bool = True

    @property
    def mlp_width(self) -> int:
        """The MLP's intermediate size: the stated one, or what an MLP of this layer size has."""
        if self.intermediate_size:
            return self.intermediate_size
        h, hd = self.hidden_size, self.head_dim
        attn = h * hd * (self.num_attention_heads + 2 * self.num_kv_heads) + self.num_attention_heads * hd * h
        per_layer = self.layer_weight_bytes / self.param_bytes
        return max(int(round((per_layer - attn) / (self.mlp_matrices * h))), 0)

    @property
    def mlp_matrices(self) -> int:
        """Weight matrices of hidden x width in one MLP: gate, up, down (gated) or up, down (plain)."""
        return 3 if self.gated_mlp else 2

    @property
    def weight_bytes(self) -> float:
        return self.params * self.param_bytes

    @property
    def embedding_bytes(self) -> float:
        """One vocabulary x hidden table (the input embedding; the LM head is a second one unless tied)."""
        return float(self.vocab_size) * self.hidden_size * self.param_bytes

    @property
    def lm_head_bytes(self) -> float:
        """The LM head's weights: read in full every step (tied or not)."""
        return self.embedding_bytes

    @property
    def layer_weight_bytes(self) -> float:
        """One decoder layer's weights: everything but the embedding table(s) (and the final norm), / layers."""
        tables = self.embedding_bytes * (1 if self.tie_word_embeddings else 2)
        return max(self.weight_bytes - tables - self.hidden_size * self.param_bytes, 0.0) / self.num_layers

    def step_weight_bytes(self, batch: int) -> float:
        """Weight bytes one decode step reads: every layer, the LM head, and only ``batch`` embedding rows."""
        return self.layer_weight_bytes * self.num_layers + self.lm_head_bytes + batch * self.hidden_size * self.param_bytes

    @property
    def logits_bytes_per_sequence(self) -> float:
        """float32 logits of one sequence's last position."""
        return 4.0 * self.vocab_size

    @property
    def kv_bytes_per_token_layer(self) -> float:
        return 2 * self.num_kv_heads * self.head_dim * self.kv_dtype_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        return self.kv_bytes_per_token_layer * self.num_layers

    def to_dict(self) -> dict:
        return {**asdict(self), "kv_bytes_per_token": self.kv_bytes_per_token}


GPUS: dict[str, GPU] = {
    g.name: g
    for g in [
        # Host link: pinned copies on an H100 80GB HBM3 host, PCIe Gen5 x16 (docs/validation/h100-80gb-hbm3.json):
        # 54.3 GB/s H2D and 54.5 D2H at 64 MiB, 95.4 GB/s both ways, 17 us per copy (NVIDIA's nvbandwidth
        # example output shows 55.6 GB/s host_to_device_memcpy_ce, in line).
        GPU("h100-sxm", 80 * GB, 3.35e12, 54 * GB, 54 * GB, 95 * GB, 17e-6, 989e12,
            note="PCIe Gen5 x16: 63 GB/s theory; 54 GB/s measured per direction, 95 both ways (H100 run)"),
        GPU("h100-pcie", 80 * GB, 2.0e12, 54 * GB, 54 * GB, 95 * GB, 17e-6, 756e12,
            note="PCIe Gen5 x16 (link figures of the H100 run)"),
        GPU("h200", 141 * GB, 4.8e12, 54 * GB, 54 * GB, 95 * GB, 17e-6, 989e12,
            note="PCIe Gen5; link not published, the H100 run's figures assumed"),
        # DGX A100: 2 x EPYC 7742, 8 channels DDR4-3200 each = 204.8 GB/s per socket; ASSUMPTION:
        # 64 cores x 2.25 GHz x 32 FLOP/cycle (AVX2) = 4.6 TFLOP/s peak, ~30% in attention.
        # Decode physics: the A100 fit on vidur's public A100 profiles (Meta-Llama-3-8B and CodeLlama-34B;
        # docs/simulator.md "Fidelity").
        # Link: nvbandwidth on A100-SXM4-80GB hosts, PCIe Gen4 x16 (github.com/NVIDIA/nvbandwidth issues 53 and 11):
        # ~24.8 GB/s H2D and ~25 D2H one way; both at once D2H keeps ~24 while H2D falls to ~11-13: ~35 in all.
        # The engine gives H2D 11 of the 35 and D2H the other 24 while both run (bidir_h2d_share).
        GPU("a100-80g", 80 * GB, 2.04e12, 25 * GB, 25 * GB, 35 * GB, 5e-6, 312e12, bidir_h2d_share=11 / 35,
            host_socket_bw=204.8 * GB, host_socket_flops=1.4e12,
            weight_efficiency=0.814, gemm_kernel_s=3.6e-6, gemm_batch_slowdown=0.114, attn_kernel_s=20.2e-6,
            attn_efficiency=0.795, layer_overhead=3.5e-6, layer_overhead_per_width=1.24e-9,
            note="PCIe Gen4 x16: 32 theory, ~25 measured each way, ~35 both ways (H2D ~11 of it)"),
        # GH200: its own 72-core Grace. ASSUMPTION: ~500 GB/s LPDDR5X peak (NVIDIA's Grace Hopper
        # material, rounded); 72 cores x 3.1 GHz x 32 FLOP/cycle (4 x 128-bit SVE2 FMA) = 7.1 TFLOP/s
        # peak, ~30% in attention.
        # C2C link: nvbandwidth on a GH200 (github.com/NVIDIA/nvbandwidth issue 23): host_to_device_memcpy_ce
        # 346 GB/s, D2H ~15% lower (~300); both ways at once about half the 900 GB/s peak (issue 41): 450.
        GPU("gh200", 96 * GB, 4.0e12, 346 * GB, 300 * GB, 450 * GB, 3e-6, 989e12, host_bytes=480 * GB,
            gpus_per_host=1, host_sockets=1, host_socket_bw=500 * GB, host_socket_flops=2.1e12,
            note="NVLink-C2C 450 GB/s theory per direction; 346 H2D / ~300 D2H / ~450 both ways measured; 480 GB LPDDR5X"),
    ]
}

# Prefill physics of the A100 (tiersim.simulator.prefill_fidelity; docs/simulator.md "Prefill"): GEMMs fitted on
# vidur's A100 per-operator profiles at 128-4096 tokens; attention ASSUMPTION: FlashAttention-2-class, ~160 of 312
# TFLOP/s forward as reported on an A100 (github.com/Dao-AILab/flash-attention issue 441), the H100's shape.
GPUS["a100-80g"] = replace(GPUS["a100-80g"], prefill_gemm_efficiency=0.725, prefill_small_ops_efficiency=0.669,
                           prefill_attn_efficiency=0.52, prefill_attn_half_keys=234.0)

MODELS: dict[str, Model] = {
    m.name: m
    for m in [
        # vocab_size, intermediate_size: each model's config.json (as in tiersim.validator.shapes).
        Model("r1-distill-qwen-1.5b", 28, 2, 128, 1536, 12, 1.78e9, vocab_size=151_936, intermediate_size=8_960),
        Model("r1-distill-qwen-7b", 28, 4, 128, 3584, 28, 7.62e9, vocab_size=152_064, intermediate_size=18_944),
        Model("r1-distill-qwen-14b", 48, 8, 128, 5120, 40, 14.8e9, vocab_size=152_064, intermediate_size=13_824),
        Model("r1-distill-qwen-32b", 64, 8, 128, 5120, 40, 32.8e9, vocab_size=152_064, intermediate_size=27_648),
        Model("qwq-32b", 64, 8, 128, 5120, 40, 32.8e9, vocab_size=152_064, intermediate_size=27_648),
        Model("qwen3-8b", 36, 8, 128, 4096, 32, 8.19e9, vocab_size=151_936, intermediate_size=12_288),
        Model("llama-3.1-8b", 32, 8, 128, 4096, 32, 8.03e9, vocab_size=128_256, intermediate_size=14_336),
        Model("llama-3.1-70b", 80, 8, 128, 8192, 64, 70.6e9, vocab_size=128_256, intermediate_size=28_672),
    ]
}


def get_gpu(name: str) -> GPU:
    if name not in GPUS:
        raise TiersimError(f"unknown GPU preset {name!r}: choose one of {', '.join(GPUS)} (see `tiersim presets`)")
    return GPUS[name]


def get_model(name: str) -> Model:
    if name not in MODELS:
        raise TiersimError(
            f"unknown model preset {name!r}: choose one of {', '.join(MODELS)} or pass --model-config config.json"
        )
    return MODELS[name]


#: Field -> (upper bound, what it is). Bounds are far above any real model and keep arithmetic sane.
CONFIG_FIELDS = {
    "num_hidden_layers": (4096, "decoder layers"),
    "hidden_size": (1 << 20, "model width"),
    "num_attention_heads": (1 << 14, "query heads"),
    "num_key_value_heads": (1 << 14, "KV heads"),
    "head_dim": (1 << 14, "head dimension"),
    "intermediate_size": (1 << 22, "MLP width"),
    "vocab_size": (1 << 24, "vocabulary"),
}


#: transformers ``model_type``s whose MLP is not gated (one up projection, an activation, one down
#: projection: PhiMLP fc1/fc2, GPTNeoXMLP and FalconMLP dense_h_to_4h/dense_4h_to_h, Starcoder2MLP
#: c_fc/c_proj in transformers' modeling files). Every other decoder is read as gated (gate and up
#: projections), the layout of Llama, Qwen, Mistral, Gemma and Phi-3.
UNGATED_MLP_MODEL_TYPES = frozenset({"phi", "gpt_neox", "falcon", "starcoder2"})


def _config_int(cfg: dict, name: str, path: Path, default=None) -> int:
    """One integer field of a config, or one line naming the field, what was found and what is expected."""
    value = cfg.get(name)
    if value is None:
        if default is None:
            raise TiersimError(f"--model-config {path}: {name} is missing; expected a positive integer "
                               f"({CONFIG_FIELDS[name][1]})")
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    upper = CONFIG_FIELDS[name][0]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise TiersimError(f"--model-config {path}: {name} must be an integer from 1 to {upper:,} "
                           f"({CONFIG_FIELDS[name][1]}), got {json.dumps(value)[:40]}")
    return value


def model_from_config(path: str | Path) -> Model:
    """A model preset from a transformers ``config.json`` (parameter count estimated from the shape).

    Every field is checked, since a user's file is the one input nobody else validated: a wrong value
    gets one line naming the field, never a traceback or a silent default.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise TiersimError(f"--model-config: file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise TiersimError(f"--model-config: not a JSON file: {path}") from None
    except OSError as exc:
        raise TiersimError(f"--model-config: cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(cfg, dict):
        raise TiersimError(f"--model-config {path}: expected a JSON object (a transformers config.json), "
                           f"got a {type(cfg).__name__}")
    text = cfg.get("text_config")
    if text is not None:
        if not isinstance(text, dict):
            raise TiersimError(f"--model-config {path}: text_config must be an object, got {json.dumps(text)[:40]}")
        cfg = text
    layers = _config_int(cfg, "num_hidden_layers", path)
    hidden = _config_int(cfg, "hidden_size", path)
    heads = _config_int(cfg, "num_attention_heads", path)
    kv_heads = _config_int(cfg, "num_key_value_heads", path, default=heads)
    if heads % kv_heads:
        raise TiersimError(f"--model-config {path}: num_attention_heads ({heads}) must be a multiple of "
                           f"num_key_value_heads ({kv_heads})")
    head_dim = _config_int(cfg, "head_dim", path, default=max(1, hidden // heads))
    inter = _config_int(cfg, "intermediate_size", path, default=4 * hidden)
    vocab = _config_int(cfg, "vocab_size", path, default=32000)
    attn = hidden * head_dim * (heads + 2 * kv_heads) + heads * head_dim * hidden
    gated = cfg.get("model_type") not in UNGATED_MLP_MODEL_TYPES
    mlp = (3 if gated else 2) * hidden * inter
    embed = vocab * hidden * (1 if cfg.get("tie_word_embeddings") else 2)
    params = layers * (attn + mlp) + embed
    name = cfg.get("_name_or_path") or path.parent.name or "custom"
    return Model(str(name), layers, kv_heads, head_dim, hidden, heads, float(params), vocab_size=vocab,
                 tie_word_embeddings=bool(cfg.get("tie_word_embeddings")), intermediate_size=inter,
                 gated_mlp=gated)


#: Per-step host time an engine does not overlap with the GPU, ``(seconds per step, seconds per sequence)``.
#: ``sync``: vidur's public CPU-overhead profile of a Python serving engine (github.com/microsoft/vidur @
#: 0633efa, data/profiling/a100/cpu_overheads.csv, Llama-2-7b-hf, TP 1): the medians of schedule + sampler
#: (end to end) + prepare inputs (end to end) + process model outputs are 1.97 ms at batch 8 and 7.59 ms at
#: batch 64, nearly linear in between; least squares over batch 8-64 gives 1.17 ms + 0.100 ms per sequence.
#: ``none``: an engine that overlaps this work with the GPU step (asynchronous scheduling).
HOST_OVERHEADS = {"none": (0.0, 0.0), "sync": (1.17e-3, 0.100e-3)}


def with_host_overhead(gpu: GPU, name: str) -> GPU:
    """``gpu`` charging the named per-step host overhead (:data:`HOST_OVERHEADS`)."""
    if name not in HOST_OVERHEADS:
        raise TiersimError(f"--host-overhead must be one of {', '.join(HOST_OVERHEADS)}, got {name!r}")
    fixed, per_sequence = HOST_OVERHEADS[name]
    return replace(gpu, step_overhead=fixed, step_overhead_per_sequence=per_sequence)


def with_overrides(gpu: GPU, **changes) -> GPU:
    """A copy of ``gpu`` with some numbers replaced (calibration, what-if bandwidths)."""
    return replace(gpu, **{k: v for k, v in changes.items() if v is not None})
