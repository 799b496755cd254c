"""Random-weights models with the exact shape of real reasoning models, built directly on the device.

Decode timings depend on tensor shapes, not on weight values, so the validator needs no hub
access: the shape table (``tiersim.shapes.MODEL_SHAPES``, of which ``SHAPES`` is a view) holds the
published configs (hidden size, MLP width, heads, KV heads, head dim, vocabulary) and ``build_model``
instantiates them with random bf16 weights. The simulator's model presets are views of the same
table, so a measured point and its prediction describe the same model.
"""

from __future__ import annotations

from dataclasses import fields

from tiersim.errors import TiersimError
from tiersim.shapes import MODEL_SHAPES, TINY, ModelShape

#: The keys of a calibration file's ``model_shape`` (with ``kv_bytes_per_token`` and ``params``), as before
#: the shape table moved to ``tiersim.shapes``: the file format keeps its version.
FILE_FIELDS = ("name", "architecture", "num_layers", "hidden_size", "intermediate_size", "num_attention_heads",
               "num_kv_heads", "head_dim", "vocab_size", "tie_word_embeddings", "rope_theta")


class Shape(ModelShape):
    """The validator's view of a :class:`tiersim.shapes.ModelShape`: the same fields in the same order
    (``Shape(name, architecture, layers, ...)`` still builds one), and ``to_dict`` with the keys calibration
    files have always had."""

    @classmethod
    def of(cls, shape: ModelShape) -> Shape:
        return cls(**{f.name: getattr(shape, f.name) for f in fields(shape)})

    @property
    def model_shape(self) -> ModelShape:
        """The :class:`ModelShape` this view shows."""
        return ModelShape(**{f.name: getattr(self, f.name) for f in fields(self)})

    def to_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in FILE_FIELDS}, "kv_bytes_per_token": self.kv_bytes_per_token}


# The shipped models' published configs (``tiersim.shapes.MODEL_SHAPES``, the simulator's presets too, so
# a measured point and its prediction describe the same model) and the CPU smoke shape.
SHAPES: dict[str, Shape] = {s.name: Shape.of(s) for s in [*MODEL_SHAPES.values(), TINY]}


def get_shape(name: str) -> Shape:
    if name not in SHAPES:
        raise TiersimError(f"--model-shape: unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    return SHAPES[name]


#: ``max_position_embeddings`` of a built shape whose context is unknown (the smoke shape): the shipped R1 models'.
UNKNOWN_CONTEXT = 131072


def hf_config(shape: Shape):
    """The transformers config of ``shape`` (full attention on every layer, no sliding window), its
    ``max_position_embeddings`` the shape's own context (``ModelShape.max_context``: QwQ-32B's and Qwen3-8B's
    40,960, not a fixed 131,072), so the built model is the published one and reads back as its table row."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    classes = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig}
    if shape.architecture not in classes:
        raise TiersimError(f"--model-shape {shape.name}: the validator builds {', '.join(classes)} models, "
                           f"not {shape.architecture or 'an unnamed architecture'}")
    return classes[shape.architecture](
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=UNKNOWN_CONTEXT if shape.max_context is None else shape.max_context,
        rope_theta=shape.rope_theta,
        tie_word_embeddings=shape.tie_word_embeddings,
        use_cache=True,
    )


def parameter_count(shape: ModelShape) -> int:
    """Parameters of the built model (norms included), so a memory check can run before allocating."""
    return shape.parameter_count()


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
