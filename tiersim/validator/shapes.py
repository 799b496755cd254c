"""Random-weights models with the exact shape of real reasoning models, built directly on the device.

Decode timings depend on tensor shapes, not on weight values, so the validator needs no hub
access: the shape table below holds the published configs (hidden size, MLP width, heads, KV
heads, head dim, vocabulary) and ``build_model`` instantiates them with random bf16 weights.
The names match the simulator's model presets, so a measured point and its prediction describe
the same model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tiersim.errors import TiersimError


@dataclass(frozen=True)
class Shape:
    """The numbers of a model's ``config.json`` that decide decode cost."""

    name: str
    architecture: str  # "qwen2" | "qwen3" | "llama"
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0

    @property
    def kv_bytes_per_token(self) -> int:
        """bf16 K and V over all layers (the design table's column)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2

    def to_dict(self) -> dict:
        return {**asdict(self), "kv_bytes_per_token": self.kv_bytes_per_token}


# Published configs (Hugging Face config.json of each model); the KV columns agree with docs/design.md.
SHAPES: dict[str, Shape] = {
    s.name: s
    for s in [
        Shape("r1-distill-qwen-1.5b", "qwen2", 28, 1536, 8960, 12, 2, 128, 151936),
        Shape("r1-distill-qwen-7b", "qwen2", 28, 3584, 18944, 28, 4, 128, 152064),
        Shape("r1-distill-qwen-14b", "qwen2", 48, 5120, 13824, 40, 8, 128, 152064),
        Shape("r1-distill-qwen-32b", "qwen2", 64, 5120, 27648, 40, 8, 128, 152064),
        Shape("qwq-32b", "qwen2", 64, 5120, 27648, 40, 8, 128, 152064, rope_theta=1e6),
        Shape("qwen3-8b", "qwen3", 36, 4096, 12288, 32, 8, 128, 151936, rope_theta=1e6),
        Shape("llama-3.1-8b", "llama", 32, 4096, 14336, 32, 8, 128, 128256, rope_theta=5e5),
        Shape("llama-3.1-70b", "llama", 80, 8192, 28672, 64, 8, 128, 128256, rope_theta=5e5),
        # CPU smoke mode: the same code path in milliseconds.
        Shape("tiny", "qwen2", 2, 64, 128, 4, 2, 16, 256),
    ]
}


def get_shape(name: str) -> Shape:
    if name not in SHAPES:
        raise TiersimError(f"--model-shape: unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    return SHAPES[name]


def hf_config(shape: Shape):
    """The transformers config of ``shape`` (full attention on every layer, no sliding window)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    classes = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig}
    return classes[shape.architecture](
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=131072,
        rope_theta=shape.rope_theta,
        tie_word_embeddings=shape.tie_word_embeddings,
        use_cache=True,
    )


def parameter_count(shape: Shape) -> int:
    """Parameters of the built model (norms included), so a memory check can run before allocating."""
    h, kv = shape.hidden_size, shape.num_kv_heads * shape.head_dim
    q = shape.num_attention_heads * shape.head_dim
    attn = h * q + 2 * h * kv + q * h
    if shape.architecture == "qwen2":
        attn += q + 2 * kv  # q/k/v biases
    if shape.architecture == "qwen3":
        attn += 2 * shape.head_dim  # q_norm, k_norm
    layer = attn + 3 * h * shape.intermediate_size + 2 * h
    embed = shape.vocab_size * h * (1 if shape.tie_word_embeddings else 2)
    return shape.num_layers * layer + embed + h


def build_model(shape: Shape, device, dtype=None, seed: int = 0):
    """A random-init ``shape`` model in eval mode on ``device``, with the scoring attention ("tiersim").

    Weights are created on the device directly (``torch.device`` context), never on the host
    first: a 7B model then builds in seconds and needs no host copy.
    """
    import torch
    from transformers import AutoModelForCausalLM

    import tiersim.hierarchy.scoring  # noqa: F401  (registers the "tiersim" attention)
    from tiersim.hierarchy.cache import check_model_supported

    device = torch.device(device)
    dtype = dtype or torch.bfloat16
    need = parameter_count(shape) * torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need > 0.9 * free:
            raise TiersimError(
                f"--model-shape {shape.name}: {need / 1e9:.1f} GB of weights do not fit the "
                f"{free / 1e9:.1f} GB free on {torch.cuda.get_device_name(device)}"
            )
    config = hf_config(shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="tiersim")
    model.to(device)  # a no-op for what the context placed; moves any buffer a transformers version made elsewhere
    check_model_supported(model.config)
    model.eval()
    model.requires_grad_(False)
    return model
