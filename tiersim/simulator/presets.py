"""Hardware and model presets (public figures from docs/design.md); stdlib only.

The GPU machine that runs the validator has no simpy or plotly, so this module, ``calibration``
and ``analytic`` import nothing beyond the standard library and numpy.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

from tiersim.errors import TiersimError
from tiersim.shapes import MODEL_SHAPES, SEQUENTIAL_ALLREDUCES, ModelShape

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
    #: Decode attention: a fixed cost per kernel call (launch, split-KV plan and combine), then the batch's KV at
    #: this share of the datasheet bandwidth. H100 floor: 18.3 us, fitted (``fidelity.fit_attention_floor``) on a
    #: public FlashAttention-2 paged-decode benchmark on an H100 SXM (github.com/microsoft/onnxruntime pull 21414:
    #: 21.1-43.6 us at 8-67 MB of KV); held out: FlashAttention-3 on an H100 (github.com/Dao-AILab/flash-attention
    #: issue 1572), both in tiersim/data/public-decode-attention.json. The old 7.5 us was HF SDPA's unpaged kernel
    #: under a CUDA graph (this project's H100 operator run), not a serving engine's paged kernel. The bandwidth
    #: share stays the large-read fit: long-context steps move by the floor's 11 us per layer only.
    attn_kernel_s: float = 18.3e-6
    attn_efficiency: float = 0.92
    #: Bytes/s one thread block of a decode-attention kernel that does not split the KV streams: such a kernel
    #: (one block per sequence and KV head) reads at ``min(share of HBM, blocks x this)``, so a batch of one
    #: with few KV heads leaves HBM idle. 0: the kernel splits the KV (the fit sources' paged kernels), no limit.
    #: Set by an engine preset (``--engine-overhead trtllm``), fitted per GPU (decode_fidelity.fit_attention_block_bw).
    attn_block_bw: float = 0.0
    #: Share of a GQA group's repeated KV reads that reach HBM in a decode-attention kernel that reads each KV head
    #: once per query head of its group, the part of the layer's KV that does not fit in :attr:`l2_bytes`
    #: (``physics.attention_s``). 0 (every GPU preset): the KV is read once, as the fit sources' GQA-aware kernels do.
    #: Set by an engine preset (``--engine-overhead trtllm``: TensorRT-LLM 0.9's kernel), fitted per GPU on the DLI
    #: table (``decode_fidelity.fit_kv_reread_share``; docs/simulator.md, "Fidelity against sources nobody fitted
    #: on", the GQA paragraph).
    attn_kv_reread_share: float = 0.0
    #: On-chip L2 cache, bytes (datasheets: H100 50 MB, NVIDIA H100 Tensor Core GPU Architecture whitepaper;
    #: A100 40 MB, NVIDIA A100 Tensor Core GPU Architecture whitepaper). Read only by the re-read term above.
    l2_bytes: float = 50e6
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
    #: A host floor per step (an eager harness that launches every operator from Python: the step lasts at least
    #: this long); 0 unless ``--engine-overhead hf-eager`` (tiersim.simulator.engines) sets it for the model's layers.
    step_host_floor: float = 0.0
    #: The engine preset these host figures are (``engines.EngineOverhead.describe``), named in the output; "" for none.
    engine: str = ""
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
    #: Where the host-link figures (h2d/d2h/bidir bandwidth, copy latency) come from; ``link_assumed`` when no
    #: measurement of this GPU's host link was found and another GPU's figures stand in (``tiersim presets`` and the
    #: simulate/capacity output say so).
    link_source: str = ""
    link_assumed: bool = False
    #: What ``torch.cuda.get_device_name`` (nvidia-smi's product name) calls this GPU, so a measurement
    #: finds its preset by lookup (``device_preset``); the sources are cited where each preset lists them.
    device_names: tuple[str, ...] = ()
    #: The preset whose fitted constants this one reads where it has no fit of its own (an engine preset's per-GPU
    #: figures, ``engines.apply``): "" for a preset that was fitted itself or reads the defaults.
    physics_of: str = ""
    # Prefill physics (tiersim.simulator.prefill), fitted by tiersim.simulator.prefill_fidelity (docs/simulator.md
    # "Prefill"). Defaults: the H100 fit; the A100's (both parts) are set below GPUS. GEMMs: vidur's public
    # per-operator profiles at 128-4096 tokens (github.com/microsoft/vidur @ 7d47513, data/profiling/compute/h100/*/mlp.csv).
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
    """The simulator's view of a :class:`tiersim.shapes.ModelShape` (its fields and derived figures).

    It keeps the fields and positional order it always had, since presets, calibration and tests build
    it directly; every derived figure (weight bytes, KV bytes, MLP width) is the shape's, written once
    in ``tiersim.shapes``. KV bytes are for bf16 unless ``kv_dtype_bytes`` says otherwise.
    """

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
    #: The block's layout, as :class:`ModelShape` states it (``shapes.block_layout``): attention and MLP in parallel
    #: (Phi-2, GPT-J, Falcon) or in sequence (every preset here), and the all-reduces per layer that layout is run
    #: with under tensor parallelism (2; 1 for Falcon's parallel block), the count ``parallel`` prices.
    parallel_block: bool = False
    allreduces_per_layer: int = SEQUENTIAL_ALLREDUCES

    @classmethod
    def from_shape(cls, shape: ModelShape) -> Model:
        """The view of ``shape`` (its published parameter count, else the one counted from the shape)."""
        model = cls(shape.name, shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.hidden_size,
                    shape.num_attention_heads, shape.total_params, param_bytes=float(shape.dtype_bytes),
                    kv_dtype_bytes=shape.kv_dtype_bytes, vocab_size=shape.vocab_size,
                    tie_word_embeddings=shape.tie_word_embeddings, intermediate_size=shape.intermediate_size,
                    gated_mlp=shape.gated_mlp, parallel_block=shape.parallel_block,
                    allreduces_per_layer=shape.allreduces_per_layer)
        model.__dict__["shape"] = shape  # the view keeps its shape whole (architecture, RoPE, window)
        return model

    @cached_property
    def shape(self) -> ModelShape:
        """The :class:`ModelShape` this view shows (one built field by field has no architecture: "")."""
        return ModelShape(self.name, "", self.num_layers, self.hidden_size, self.intermediate_size,
                          self.num_attention_heads, self.num_kv_heads, self.head_dim, self.vocab_size,
                          tie_word_embeddings=self.tie_word_embeddings, gated_mlp=self.gated_mlp,
                          parallel_block=self.parallel_block, allreduces_per_layer=self.allreduces_per_layer,
                          dtype_bytes=self.param_bytes, kv_dtype_bytes=self.kv_dtype_bytes, params=self.params)

    @property
    def max_context(self) -> int | None:
        """The model's context (``ModelShape.max_context``; None: unknown, e.g. a view built field by field)."""
        return self.shape.max_context

    @property
    def mlp_width(self) -> int:
        """The MLP's intermediate size: the stated one, or what an MLP of this layer size has."""
        return self.shape.mlp_width

    @property
    def mlp_matrices(self) -> int:
        """Weight matrices of hidden x width in one MLP: gate, up, down (gated) or up, down (plain)."""
        return self.shape.mlp_matrices

    @property
    def weight_bytes(self) -> float:
        return self.shape.weight_bytes

    @property
    def embedding_bytes(self) -> float:
        """One vocabulary x hidden table (the input embedding; the LM head is a second one unless tied)."""
        return self.shape.embedding_bytes

    @property
    def lm_head_bytes(self) -> float:
        """The LM head's weights: read in full every step (tied or not)."""
        return self.embedding_bytes

    @property
    def layer_weight_bytes(self) -> float:
        """One decoder layer's weights: everything but the embedding table(s) (and the final norm), / layers."""
        return self.shape.layer_weight_bytes

    def step_weight_bytes(self, batch: int) -> float:
        """Weight bytes one decode step reads: every layer, the LM head, and only ``batch`` embedding rows."""
        return self.layer_weight_bytes * self.num_layers + self.lm_head_bytes + batch * self.hidden_size * self.param_bytes

    @property
    def logits_bytes_per_sequence(self) -> float:
        """float32 logits of one sequence's last position."""
        return 4.0 * self.vocab_size

    @property
    def kv_bytes_per_token_layer(self) -> float:
        return self.shape.kv_bytes_per_token_layer

    @property
    def kv_bytes_per_token(self) -> float:
        return self.shape.kv_bytes_per_token

    def to_dict(self) -> dict:
        return {**asdict(self), "kv_bytes_per_token": self.kv_bytes_per_token}


GPUS: dict[str, GPU] = {
    g.name: g
    for g in [
        # Host link: pinned copies on an H100 80GB HBM3 host, PCIe Gen5 x16 (docs/validation/h100-80gb-hbm3.json):
        # 54.3 GB/s H2D and 54.5 D2H at 64 MiB, 95.4 GB/s both ways, 17 us per copy (NVIDIA's nvbandwidth
        # example output shows 55.6 GB/s host_to_device_memcpy_ce, in line).
        GPU("h100-sxm", 80 * GB, 3.35e12, 54 * GB, 54 * GB, 95 * GB, 17e-6, 989e12,
            note="PCIe Gen5 x16: 63 GB/s theory; 54 GB/s measured per direction, 95 both ways (H100 run)",
            link_source="measured: docs/validation/h100-80gb-hbm3.json (pinned cudaMemcpyAsync, 64 MiB), in line with "
                        "nvbandwidth's example host_to_device_memcpy_ce 55.6 GB/s",
            # docs/validation/h100-80gb-hbm3.json (our run); H100 NVL (github.com/akash-network/provider-configs
            # pull 91, nvidia-smi) is a 94 GB HBM3 card, read as this one.
            device_names=("NVIDIA H100 80GB HBM3", "NVIDIA H100 NVL")),
        GPU("h100-pcie", 80 * GB, 2.0e12, 54 * GB, 54 * GB, 95 * GB, 17e-6, 756e12,
            note="PCIe Gen5 x16; link ASSUMED: the H100 SXM run's figures",
            link_source="assumed: no H2D/D2H measurement of an H100 PCIe host was found; the H100 SXM run's (same "
                        "PCIe Gen5 x16 link) stand in", link_assumed=True,
            device_names=("NVIDIA H100 PCIe",)),  # torch's sm_90 warning quoted in github.com/pytorch/pytorch issue 90761
        # Host link: nvbandwidth host_to_device_memcpy_sm / device_to_host_memcpy_sm (default 512 MiB buffers) on Azure
        # ND H200 v5 (8 x H200 141GB, 2 x Xeon Platinum 8480C, PCIe Gen5): 52 / 52 GB/s under CUDA 12.6
        # (github.com/Azure/AI-benchmarking-guide @ 8fd0c6e, Azure_Results/ND_H200_v5_results.md; the harness,
        # Benchmarks/NVBandwidth.py, names the test cases) and 55 / 55 under CUDA 12.8 (a later run of the same guide,
        # github.com/samuel-bohman/AI-benchmarking-guide @ b408bf8, same path); the same benchmark on ND H100 v5 gave 51 / 52
        # (Azure_Results/ND_H100_v5_results.md @ 8fd0c6e). So the H200 host's link is the H100 host's: the H100 run's 54
        # per direction lies within the H200's measured 52-55 and stands; both ways and the copy latency (not measured on
        # an H200 host) are the H100 run's, the same PCIe Gen5 x16 link.
        GPU("h200", 141 * GB, 4.8e12, 54 * GB, 54 * GB, 95 * GB, 17e-6, 989e12,
            note="PCIe Gen5 x16: 52-55 GB/s measured per direction on an H200 host (the H100 run's 54 stands); "
                 "both ways and copy latency the H100 run's",
            link_source="measured: nvbandwidth host_to_device/device_to_host_memcpy_sm 52/52 GB/s (CUDA 12.6) and 55/55 "
                        "(CUDA 12.8) on Azure ND H200 v5 (github.com/Azure/AI-benchmarking-guide @ 8fd0c6e, "
                        "samuel-bohman/AI-benchmarking-guide @ b408bf8; ND H100 v5 51/52 by the same harness): the H100 "
                        "run's 54 per direction stands; both ways and copy latency: the H100 run's, same PCIe Gen5 x16 link",
            # nvidia-smi product name: github.com/NVIDIA/mig-parted issue 120 (H200); pull 146 adds the H200 NVL.
            device_names=("NVIDIA H200", "NVIDIA H200 NVL")),
        # DGX A100: 2 x EPYC 7742, 8 channels DDR4-3200 each = 204.8 GB/s per socket; ASSUMPTION:
        # 64 cores x 2.25 GHz x 32 FLOP/cycle (AVX2) = 4.6 TFLOP/s peak, ~30% in attention.
        # Decode physics: the A100 fit on vidur's public A100 profiles (Meta-Llama-3-8B and CodeLlama-34B;
        # docs/simulator.md "Fidelity").
        # Link: nvbandwidth on A100-SXM4-80GB hosts, PCIe Gen4 x16 (github.com/NVIDIA/nvbandwidth issues 53 and 11):
        # ~24.8 GB/s H2D and ~25 D2H one way; both at once D2H keeps ~24 while H2D falls to ~11-13: ~35 in all.
        # The engine gives H2D 11 of the 35 and D2H the other 24 while both run (bidir_h2d_share).
        GPU("a100-80g", 80 * GB, 2.04e12, 25 * GB, 25 * GB, 35 * GB, 5e-6, 312e12, bidir_h2d_share=11 / 35, l2_bytes=40e6,
            host_socket_bw=204.8 * GB, host_socket_flops=1.4e12,
            weight_efficiency=0.814, gemm_kernel_s=3.6e-6, gemm_batch_slowdown=0.114, attn_kernel_s=20.2e-6,
            attn_efficiency=0.795, layer_overhead=3.5e-6, layer_overhead_per_width=1.24e-9,
            note="PCIe Gen4 x16: 32 theory, ~25 measured each way, ~35 both ways (H2D ~11 of it)",
            link_source="measured: nvbandwidth on A100-SXM4-80GB hosts (github.com/NVIDIA/nvbandwidth issues 53, 11)",
            # nvidia-smi: github.com/NVIDIA/CUDALibrarySamples issue 104.
            device_names=("NVIDIA A100-SXM4-80GB",)),
        # GH200: its own 72-core Grace. ASSUMPTION: ~500 GB/s LPDDR5X peak (NVIDIA's Grace Hopper
        # material, rounded); 72 cores x 3.1 GHz x 32 FLOP/cycle (4 x 128-bit SVE2 FMA) = 7.1 TFLOP/s
        # peak, ~30% in attention.
        # C2C link: nvbandwidth on a GH200 (github.com/NVIDIA/nvbandwidth issue 23): host_to_device_memcpy_ce
        # 346 GB/s, D2H ~15% lower (~300); both ways at once about half the 900 GB/s peak (issue 41): 450.
        GPU("gh200", 96 * GB, 4.0e12, 346 * GB, 300 * GB, 450 * GB, 3e-6, 989e12, host_bytes=480 * GB,
            gpus_per_host=1, host_sockets=1, host_socket_bw=500 * GB, host_socket_flops=2.1e12,
            note="NVLink-C2C 450 GB/s theory per direction; 346 H2D / ~300 D2H / ~450 both ways measured; 480 GB LPDDR5X",
            link_source="measured: nvbandwidth on a GH200 (github.com/NVIDIA/nvbandwidth issues 23, 41)",
            # nvidia-smi: github.com/marin-community/marin pull 5446 (480GB), NVIDIA/mig-parted pull 139 (144G HBM3e).
            device_names=("NVIDIA GH200 480GB", "NVIDIA GH200 144G HBM3e")),
    ]
}

# Prefill physics of the A100 (tiersim.simulator.prefill_fidelity; docs/simulator.md "Prefill"): GEMMs fitted on
# vidur's A100 per-operator profiles at 128-4096 tokens; attention ASSUMPTION: FlashAttention-2-class, ~160 of 312
# TFLOP/s forward as reported on an A100 (github.com/Dao-AILab/flash-attention issue 441), the H100's shape.
GPUS["a100-80g"] = replace(GPUS["a100-80g"], prefill_gemm_efficiency=0.725, prefill_small_ops_efficiency=0.669,
                           prefill_attn_efficiency=0.52, prefill_attn_half_keys=234.0)

#: Achieved HBM bandwidth (GB/s) of a scale-type streaming kernel (one load and one store stream: a[i] = s x b[i]),
#: measured by one harness on a part that reads another preset's fit and on that fitted part: part -> (fitted part,
#: GB/s on the part, GB/s on the fitted part). The fitted shares of datasheet HBM bandwidth carry over to the part
#: scaled by the ratio of the two measured shares (:func:`stream_share_ratio`), not copied.
#: a100-40g: gpu-stream's SCALE at full occupancy, github.com/te42kyfo/gpu-benches @ 1c36d509ee717dca9215c27135fa1e611bb03ed1,
#: gpu-stream/a100_40.txt (1381) and gpu-stream/a100_80.txt (1732). SCALE is the kernel that repository compares
#: across GPUs; its READ column is not used: one 8-byte load per thread still rises at 100% occupancy on both parts.
#: (The 80 GB part's SCALE still rises 1.8% over the last eighth of occupancy: the ratio may be ~1.03, not 1.046.)
#: h200: BabelStream's Mul (the same one-load, one-store kernel) in Azure's AI-benchmarking-guide harness, ND H200 v5
#: (4.00 TB/s) and ND H100 v5 (2.90 TB/s, an H100 80GB HBM3), github.com/Azure/AI-benchmarking-guide @ 8fd0c6e,
#: Azure_Results/ND_H200_v5_results.md and ND_H100_v5_results.md. gpu-benches' H200 SCALE (3165 GB/s, 0.66 of
#: datasheet) is still rising at full occupancy, and it has no H100 SXM row: not used.
STREAM_SCALE_GBPS: dict[str, tuple[str, float, float]] = {
    "a100-40g": ("a100-80g", 1381.0, 1732.0),
    "h200": ("h100-sxm", 4000.0, 2900.0),
}
#: The fitted constants that are shares of datasheet HBM bandwidth (weight streaming, decode attention, prefill small
#: ops): the ones a measured stream ratio carries from a fitted part to another. Kernel floors, the GEMM batch
#: slowdown, FLOP/s shares and per-block rates are not shares of the datasheet figure and carry over unchanged;
#: ``hbm_efficiency`` (the cache's extra passes) is one, but an assumed 0.80 on every part, not a fit to carry.
HBM_SHARE_FIELDS = ("weight_efficiency", "attn_efficiency", "prefill_small_ops_efficiency")


def stream_share_ratio(part: str, hbm_bw: float, fitted_hbm_bw: float) -> float:
    """How much larger a share of its datasheet bandwidth ``hbm_bw`` (bytes/s) ``part`` streams the measured kernel
    at than the part whose fit it reads (``fitted_hbm_bw``), from :data:`STREAM_SCALE_GBPS`. Why: a fit's shares were
    fitted on one memory system; the same chip with slower HBM2 (the A100 40 GB: 0.888 of 1,555 GB/s against the 80 GB
    part's 0.849 of 2,040) reaches a larger share, with faster HBM3e (the H200: 0.833 of 4.8 TB/s against the H100's
    0.866 of 3.35) a smaller one, so the fitted shares scale by that measured ratio (1.046, 0.963)."""
    _, measured, fitted_measured = STREAM_SCALE_GBPS[part]
    return (measured * GB / hbm_bw) / (fitted_measured * GB / fitted_hbm_bw)


def _with_fitted_shares(gpu: GPU, fitted: GPU) -> GPU:
    """``gpu`` with ``fitted``'s HBM shares (:data:`HBM_SHARE_FIELDS`) times the measured stream ratio."""
    ratio = stream_share_ratio(gpu.name, gpu.hbm_bw, fitted.hbm_bw)
    return replace(gpu, **{f: getattr(fitted, f) * ratio for f in HBM_SHARE_FIELDS})


# H200: the H100 fit's constants (the defaults), its HBM shares through the measured stream ratio (0.963; the DLI FP8
# rows on an H200 in public-decode-steps.json are a check nobody fitted on).
GPUS["h200"] = _with_fitted_shares(GPUS["h200"], GPUS["h100-sxm"])

# A100 SXM4 40GB: the launch part, same GA100 chip (108 SMs, 312 TFLOP/s dense fp16/bf16) with 40 GB of HBM2 at
# 1,555 GB/s (NVIDIA A100 datasheet; glennklockwood.com/garden/processors/A100, techpowerup.com a100-sxm4-40-gb).
# No public per-operator profile of the 40 GB part was found, so its physics constants are the a100-80g fit's, with
# the fitted shares of datasheet HBM bandwidth (weight streaming, decode attention, prefill small ops) scaled by the
# measured stream ratio (stream_share_ratio: 1.046; nothing is fitted on the Argonne Polaris A100-40GB runs in
# public-decode-steps.json, which stay held out and test it). Per-kernel floors, the GEMM batch slowdown, FLOP/s
# shares and the trtllm per-block attention rate stay the 80 GB fit's. Link: nvbandwidth host_to_device_memcpy_sm
# 25.13 GB/s at 512 MiB-1 GiB on an NVIDIA A100-SXM4-40GB (github.com/NVIDIA/nvbandwidth issue 42), as on the 80 GB
# hosts; D2H, both ways and the copy latency are the A100-SXM4-80GB hosts' (the same PCIe Gen4 x16 link). Host: the
# DGX A100 figures of a100-80g.
_A100_40G = _with_fitted_shares(replace(
    GPUS["a100-80g"], name="a100-40g", hbm_bytes=40 * GB, hbm_bw=1.555e12,
    note="40 GB HBM2, 1.555 TB/s; PCIe Gen4 x16: ~25 GB/s H2D measured; D2H and both ways the 80 GB hosts'",
    link_source="measured: nvbandwidth host_to_device_memcpy_sm 25.13 GB/s on an A100-SXM4-40GB (github.com/NVIDIA/"
                "nvbandwidth issue 42); D2H, both ways, copy latency: the A100-SXM4-80GB hosts' (issues 53, 11), same link",
    # nvidia-smi: github.com/NVIDIA/nvbandwidth issue 42, bottlerocket-os/bottlerocket-core-kit pull 834.
    device_names=("NVIDIA A100-SXM4-40GB",), physics_of="a100-80g"), GPUS["a100-80g"])
_ORDER = list(GPUS)
_ORDER.insert(_ORDER.index("a100-80g") + 1, "a100-40g")  # listed next to its 80 GB sibling
GPUS = {key: _A100_40G if key == "a100-40g" else GPUS[key] for key in _ORDER}

#: The shipped models: views of ``tiersim.shapes.MODEL_SHAPES`` (their config.json shapes, published counts).
MODELS: dict[str, Model] = {name: Model.from_shape(shape) for name, shape in MODEL_SHAPES.items()}


def get_gpu(name: str) -> GPU:
    if name not in GPUS:
        raise TiersimError(f"unknown GPU preset {name!r}: choose one of {', '.join(GPUS)} (see `tiersim presets`)")
    return GPUS[name]


#: The preset for a device no preset names (and for no device: the CPU smoke mode).
DEFAULT_GPU = "h100-sxm"


def _chip(device_name: str) -> str:
    """The chip of a device name: 'NVIDIA A100-SXM4-40GB' -> 'a100', 'NVIDIA H100 PCIe' -> 'h100'."""
    words = device_name.lower().replace("nvidia", " ").split()
    return words[0].split("-")[0] if words else ""


def device_preset(device_name: str | None) -> str:
    """The GPU preset of a device, by its name: one the presets list (:attr:`GPU.device_names`), else, for a
    variant not listed (an 'NVIDIA A100 80GB PCIe'), the preset with a name of the same chip sharing the most
    words with it (the first on a tie), else :data:`DEFAULT_GPU`."""
    name = " ".join((device_name or "").split()).lower()
    for key, gpu in GPUS.items():
        if name in (n.lower() for n in gpu.device_names):
            return key
    chip, words = _chip(name), set(name.replace("-", " ").split())
    best, shared = DEFAULT_GPU, 0
    for key, gpu in GPUS.items():
        for known in gpu.device_names:
            common = len(words & set(known.lower().replace("-", " ").split()))
            if chip and _chip(known) == chip and common > shared:
                best, shared = key, common
    return best


def get_model(name: str) -> Model:
    if name not in MODELS:
        raise TiersimError(
            f"unknown model preset {name!r}: choose one of {', '.join(MODELS)} or pass --model-config config.json"
        )
    return MODELS[name]


def model_from_config(path: str | Path) -> Model:
    """A model preset from a transformers ``config.json`` (parameter count estimated from the shape).

    The file is read here (its errors name ``--model-config``); its fields are read and checked by
    :meth:`ModelShape.from_hf_config`, the one reader of HF configs. A sliding-window model is refused:
    its KV stops growing at the window, which the simulator (like ``TieredCache``) does not model.
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
    shape = ModelShape.from_hf_config(cfg, where=f"--model-config {path}", default_name=path.parent.name or "custom")
    if shape.sliding_window is not None:
        raise TiersimError(f"--model-config {path}: sliding-window attention (sliding_window={shape.sliding_window}) "
                           "is not modelled; the simulator plans full-attention decoders only")
    return Model.from_shape(shape)


#: Per-step host time an engine does not overlap with the GPU, ``(seconds per step, seconds per sequence)``.
#: ``sync``: vidur's public CPU-overhead profile of a Python serving engine (github.com/microsoft/vidur @
#: 0633efa, data/profiling/a100/cpu_overheads.csv, Llama-2-7b-hf, TP 1): the medians of schedule + sampler
#: (end to end) + prepare inputs (end to end) + process model outputs are 1.97 ms at batch 8 and 7.59 ms at
#: batch 64, nearly linear in between; the line through those two is 1.17 ms + 0.100 ms per sequence (least squares
#: over batch 8-64: 1.20 ms + 0.100; the rows: public-engine-overheads.json ``cpu_profiles``, fidelity.cpu_profile_line).
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
