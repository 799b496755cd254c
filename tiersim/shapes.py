"""One description of a decoder's shape, the table of shipped models, and the one reader of HF configs.

A model's shape decides everything tiersim plans or measures about it: the KV bytes a token adds,
the weight bytes a decode step streams, the parameters the validator must fit in device memory.
Before this module the simulator's presets, the validator's shapes, the trace metadata and the
``--model-config`` reader each kept their own copy of the fields and of those formulas; they are now
views of :class:`ModelShape`. Standard library only: the validator imports it on a GPU machine that
has torch and numpy and nothing else, and the simulator without torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

from tiersim.errors import TiersimError

#: transformers ``model_type``s whose MLP is not gated (one up projection, an activation, one down
#: projection: PhiMLP fc1/fc2, GPTNeoXMLP and FalconMLP dense_h_to_4h/dense_4h_to_h, Starcoder2MLP
#: c_fc/c_proj, GPTJMLP fc_in/fc_out, GPT2MLP and GPTBigCodeMLP c_fc/c_proj, CodeGenMLP fc_in/fc_out,
#: BloomMLP dense_h_to_4h/dense_4h_to_h, OPTDecoderLayer fc1/fc2 in transformers' modeling files). Every other
#: decoder is read as gated (gate and up projections), the layout of Llama, Qwen, Mistral, Gemma, Cohere and Phi-3.
UNGATED_MLP_MODEL_TYPES = frozenset({"phi", "gpt_neox", "falcon", "starcoder2", "gptj", "gpt2", "gpt_bigcode",
                                     "codegen", "bloom", "opt"})

#: transformers ``model_type`` -> how its decoder layer is laid out: True, a *parallel* block (attention and MLP
#: read the same normed input, and their outputs are summed with the residual: PhiDecoderLayer, GPTJBlock,
#: CodeGenBlock, CohereDecoderLayer), or the config key that chooses between that and the sequential block
#: (attention, residual add, norm, MLP, residual add) and the key's default in transformers' config class:
#: GPT-NeoX ``use_parallel_residual`` (True), StableLM ``use_parallel_residual`` (False), Falcon ``parallel_attn``
#: (True; ``new_decoder_architecture`` implies it). Every other ``model_type`` is a sequential block.
PARALLEL_BLOCK_MODEL_TYPES: dict[str, bool | tuple[str, bool]] = {
    "phi": True, "gptj": True, "codegen": True, "cohere": True,
    "gpt_neox": ("use_parallel_residual", True), "stablelm": ("use_parallel_residual", False),
    "falcon": ("parallel_attn", True),
}

#: ``model_type``s whose parallel block serving engines all-reduce **once** per layer under tensor parallelism, the
#: attention's and the MLP's row-parallel outputs summed on each rank first: Falcon, in vLLM
#: (``vllm/model_executor/models/falcon.py``: ``reduce_row_parallel_results = not (new_decoder_architecture or
#: parallel_attn)``, one ``tensor_model_parallel_all_reduce`` of the sum) and in TensorRT-LLM from late 2023
#: (``tensorrt_llm/models/falcon/model.py`` @ 585c756: "allreduce applies after those layer"). The same engines'
#: GPT-J, GPT-NeoX and Phi layers reduce after the attention and after the MLP (each row-parallel layer with
#: ``reduce_results``; TensorRT-LLM's GPTJDecoderLayer passes its tp_group to both), so a parallel block alone is not
#: enough: the count is the family's as those engines build it. An engine that differs (TensorRT-LLM v0.5's Falcon:
#: two) is stated where its measurements are (``parallel.allreduces_per_layer``'s override).
FUSED_ALLREDUCE_MODEL_TYPES = frozenset({"falcon"})
#: All-reduces per layer of a sequential block under tensor parallelism: after the attention and after the MLP.
SEQUENTIAL_ALLREDUCES = 2

#: ``model_type``s whose config class ties the LM head to the input embedding unless the file says otherwise
#: (``tie_word_embeddings`` defaults to True in GemmaConfig, GPT2Config, OPTConfig, FalconConfig, BloomConfig, ...; the
#: test holds this list to transformers' classes). transformers 4 wrote a ``config.json`` without the values equal to
#: its base config's defaults, tying included, so published tied files (google/gemma-7b, openai-community/gpt2) have no
#: key: read as untied they would plan a second vocabulary table the model does not hold (1.6 GB for Gemma-7B).
#: Every other ``model_type`` (Llama, Qwen, Mistral, Phi, GPT-J, GPT-NeoX: their classes default to False) is untied
#: unless its file says so.
TIED_BY_DEFAULT_MODEL_TYPES = frozenset({"biogpt", "bloom", "cohere", "cohere2", "ernie4_5", "falcon", "gemma",
                                         "gemma2", "gemma3_text", "gpt2", "gpt_bigcode", "gpt_neo", "jetmoe",
                                         "minicpm3", "opt", "smollm3", "starcoder2", "vaultgemma", "xglm"})

#: ``model_type``s whose config states a ``multi_query`` flag (default True in both config classes) instead of a KV head
#: count: one KV head shared by every query head, as GPTBigCodeAttention (``kv_heads = 1 if multi_query else
#: num_heads``: StarCoder's published config.json says only ``"multi_query": true``) and FalconAttention (unless
#: ``new_decoder_architecture``, which reads ``num_kv_heads``) build it. Read as heads, StarCoder's KV is 48 x too
#: large.
MULTI_QUERY_MODEL_TYPES = frozenset({"falcon", "gpt_bigcode"})

#: Other names configs give the fields of :data:`CONFIG_FIELDS` (the GPT-2 family's ``n_layer``/``n_embd``/
#: ``n_head``/``n_inner``: GPT-J, CodeGen, GPT-BigCode; BLOOM's ``n_layer``/``n_head`` and ``n_embed``, the width its
#: published files state (bigscience/bloom-560m's config.json), which BloomConfig pops into ``hidden_size``; OPT's
#: ``ffn_dim``; Falcon's ``num_kv_heads``/``ffn_hidden_size``), read where the transformers name is absent:
#: transformers maps them (``attribute_map``) on its config objects, but a ``config.json`` keeps the original keys.
CONFIG_ALIASES = {
    "num_hidden_layers": ("n_layer",), "hidden_size": ("n_embd", "n_embed"), "num_attention_heads": ("n_head",),
    "num_key_value_heads": ("num_kv_heads",), "intermediate_size": ("n_inner", "ffn_dim", "ffn_hidden_size"),
}

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

#: A config's ``torch_dtype`` (transformers 5 writes ``dtype``) -> bytes per weight and KV element as
#: served. A float32 checkpoint is served at half precision, as vLLM's ``dtype="auto"`` serves it (FP16
#: for FP32 checkpoints), so it plans like a bf16 one. A dtype not listed (int8, float8, a typo) is
#: refused: the simulator would otherwise price a quantized model's weights as bf16 without saying so.
SERVED_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 2}


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder's ``config.json`` that decide its memory and decode cost.

    The first eleven fields are, in order, those of the validator's ``Shape`` (so a row reads the same
    in both). ``params`` is the *published* parameter count where one is cited: it is provenance, not
    shape, so it takes no part in equality; without it the count comes from the shape.
    """

    name: str
    architecture: str  # the config's model_type: "qwen2" | "qwen3" | "llama" | another decoder's
    num_layers: int
    hidden_size: int
    intermediate_size: int  # MLP width; 0: derived from ``params`` (a shape known only by its count)
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    #: Gated MLP (gate and up projections, SiLU x up: Llama, Qwen, Mistral) with 3 x hidden x width weights,
    #: or a plain one (up, GELU, down: Phi-2, GPT-NeoX) with 2 x (:data:`UNGATED_MLP_MODEL_TYPES`).
    gated_mlp: bool = True
    #: Attention and MLP in parallel off one normed input, summed with the residual (Phi-2, GPT-J, Falcon, GPT-NeoX:
    #: :data:`PARALLEL_BLOCK_MODEL_TYPES`), not one after the other (Llama, Qwen: every shipped shape). It is what
    #: lets an engine sum both row-parallel outputs before a single all-reduce (:attr:`allreduces_per_layer`).
    parallel_block: bool = False
    #: All-reduces per layer under tensor parallelism as serving engines build this family: 2 (after attention and
    #: after the MLP), 1 for a parallel block engines reduce once (Falcon: :data:`FUSED_ALLREDUCE_MODEL_TYPES`). The
    #: one count ``parallel.layer_allreduce_s`` reads (``serve --tp``, TP prefill, the TP decode step).
    allreduces_per_layer: int = SEQUENTIAL_ALLREDUCES
    #: Tokens a sliding-window layer keeps, where the config uses a window on any layer; None: full attention.
    sliding_window: int | None = None
    dtype_bytes: float = 2  # bytes per weight as served (bf16)
    kv_dtype_bytes: int = 2  # bytes per K or V element (bf16)
    params: float | None = field(default=None, compare=False)
    #: The longest sequence (prompt + output tokens) the model is trained for: its config's
    #: ``max_position_embeddings``. None: unknown, and no command checks it. A limit, not a cost: it takes no part in
    #: equality (a shape built field by field without it prices the same).
    max_context: int | None = field(default=None, compare=False)

    def __post_init__(self):
        # The MLP width is derived from the parameter count and the count from the width: without either, every
        # derived figure recursed until Python's stack ran out.
        if not self.intermediate_size and self.params is None:
            raise TiersimError(f"model shape {self.name}: intermediate_size 0 needs the published parameter count "
                               "(params) to derive the MLP width from")

    # -- parameters ---------------------------------------------------------------------------------
    def parameter_count(self, vectors: bool = True) -> int:
        """Parameters of the model as transformers builds it, counted from the shape: exact for the families the
        validator builds (Llama, Qwen2's q/k/v biases, Qwen3's q/k norms), since its memory check runs before it
        allocates; another family's biases, LayerNorm shifts and learned position table (GPT-2, OPT) are
        not counted.

        ``vectors=False`` counts the weight matrices and embedding tables only, leaving out the norm and
        bias vectors (under 0.01% of a real model): the estimate the simulator has always used for a
        ``--model-config`` without a published count, kept so its plans stay as they were.
        """
        h, kv, q = self.hidden_size, self.num_kv_heads * self.head_dim, self.num_attention_heads * self.head_dim
        layer = h * q + 2 * h * kv + q * h + self.mlp_matrices * h * self.mlp_width
        if vectors:
            if self.architecture == "qwen2":
                layer += q + 2 * kv  # q/k/v biases
            if self.architecture == "qwen3":
                layer += 2 * self.head_dim  # q_norm, k_norm
            layer += 2 * h  # input and post-attention RMSNorm
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + (h if vectors else 0)  # the final norm

    @property
    def total_params(self) -> float:
        """The published count where cited, else the shape's matrices and tables (``parameter_count``)."""
        return float(self.params) if self.params is not None else float(self.parameter_count(vectors=False))

    # -- weights ------------------------------------------------------------------------------------
    @property
    def mlp_matrices(self) -> int:
        """Weight matrices of hidden x width in one MLP: gate, up, down (gated) or up, down (plain)."""
        return 3 if self.gated_mlp else 2

    @property
    def mlp_width(self) -> int:
        """The MLP's intermediate size: the stated one, or what an MLP of this layer size has."""
        if self.intermediate_size:
            return self.intermediate_size
        h, hd = self.hidden_size, self.head_dim
        attn = h * hd * (self.num_attention_heads + 2 * self.num_kv_heads) + self.num_attention_heads * hd * h
        per_layer = self.layer_weight_bytes / self.dtype_bytes
        return max(int(round((per_layer - attn) / (self.mlp_matrices * h))), 0)

    @property
    def weight_bytes(self) -> float:
        return self.total_params * self.dtype_bytes

    @property
    def embedding_bytes(self) -> float:
        """One vocabulary x hidden table (the input embedding; the LM head is a second one unless tied)."""
        return float(self.vocab_size) * self.hidden_size * self.dtype_bytes

    @property
    def layer_weight_bytes(self) -> float:
        """One decoder layer's weights: everything but the embedding table(s) (and the final norm), / layers."""
        tables = self.embedding_bytes * (1 if self.tie_word_embeddings else 2)
        return max(self.weight_bytes - tables - self.hidden_size * self.dtype_bytes, 0.0) / self.num_layers

    # -- KV -----------------------------------------------------------------------------------------
    @property
    def kv_bytes_per_token_layer(self) -> int:
        """K and V of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.kv_dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers (the design table's column)."""
        return self.kv_bytes_per_token_layer * self.num_layers

    def to_dict(self) -> dict:
        return {**asdict(self), "kv_bytes_per_token": self.kv_bytes_per_token}

    # -- reading a transformers config ----------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config, name: str | None = None, where: str = "model config",
                       default_name: str = "custom") -> ModelShape:
        """The shape of a transformers config: a ``PretrainedConfig`` or a ``config.json``'s dict.

        Every field is checked, since a user's file is the one input nobody else validated: a wrong value
        gets one line (prefixed ``where``) naming the field, what was found and what is expected, never a
        traceback or a silent default. A composite config (vision-language) is read by its text config.
        """
        if hasattr(config, "get_text_config"):  # a transformers PretrainedConfig
            config = config.get_text_config(decoder=True).to_dict()
        if not isinstance(config, Mapping):
            raise TiersimError(f"{where}: expected a JSON object (a transformers config.json), "
                               f"got a {type(config).__name__}")
        cfg = config
        text = cfg.get("text_config")
        if text is not None:
            if not isinstance(text, Mapping):
                raise TiersimError(f"{where}: text_config must be an object, got {json.dumps(text)[:40]}")
            cfg = text
        model_type = str(cfg.get("model_type") or "")
        layers = _config_int(cfg, "num_hidden_layers", where)
        hidden = _config_int(cfg, "hidden_size", where)
        heads = _config_int(cfg, "num_attention_heads", where)
        if _multi_query(model_type, cfg, where):
            kv_heads = 1
        else:
            kv_heads = _config_int(cfg, "num_key_value_heads", where, default=heads)
        if heads % kv_heads:
            raise TiersimError(f"{where}: num_attention_heads ({heads}) must be a multiple of "
                               f"num_key_value_heads ({kv_heads})")
        head_dim = _config_int(cfg, "head_dim", where, default=max(1, hidden // heads))
        # A plain MLP's width defaults to 4 x hidden, as those families' configs mean by a null or absent width (GPT-2's
        # and GPT-J's n_inner, Falcon's ffn_hidden_size, BLOOM's none); a gated MLP and the vocabulary have no such
        # convention, and a file without them would be priced with a made-up number.
        ungated = model_type in UNGATED_MLP_MODEL_TYPES
        inter = _config_int(cfg, "intermediate_size", where, default=4 * hidden if ungated else None)
        vocab = _config_int(cfg, "vocab_size", where)
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or config.get("torch_dtype") or config.get("dtype")
        if dtype is not None and (not isinstance(dtype, str) or dtype not in SERVED_DTYPE_BYTES):
            raise TiersimError(f"{where}: torch_dtype must be one of {', '.join(SERVED_DTYPE_BYTES)} (a quantized "
                               f"or unknown dtype cannot be planned), got {json.dumps(dtype)[:40]}")
        return cls(
            str(name or cfg.get("_name_or_path") or default_name), model_type, layers, hidden, inter, heads, kv_heads,
            head_dim, vocab, tie_word_embeddings=_tied(model_type, cfg, where), rope_theta=_rope_theta(cfg),
            **block_layout(model_type, cfg), sliding_window=_sliding_window(cfg, where),
            dtype_bytes=SERVED_DTYPE_BYTES.get(dtype, 2), max_context=_max_context(cfg, where),
        )

    @classmethod
    def from_record(cls, record, where: str) -> ModelShape:
        """A shape stored by its field names (a calibration file's ``model_shape``, ``validator.shapes.FILE_FIELDS``),
        every field checked by :meth:`from_hf_config`'s rules: a measurement file is input too, and a shape built
        from it unchecked was a TypeError for a missing field and a ZeroDivisionError for zero layers. A field the
        config reading derives instead of reading it (``dtype_bytes``, ``gated_mlp``, the block layout) must agree
        with what it derives: a record's ``dtype_bytes: 4`` was read as 2 in silence."""
        if not isinstance(record, Mapping):
            raise TiersimError(f"{where}: expected an object, got {json.dumps(record)[:40]}")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if record.get(k) is None]
        if missing:
            raise TiersimError(f"{where}: {missing[0]} is missing (a stored shape names every one of "
                               f"{', '.join(required)})")
        for key in ("name", "architecture"):
            if not isinstance(record[key], str):
                raise TiersimError(f"{where}: {key} must be text, got {json.dumps(record[key])[:40]}")
        stored_as_config = {"num_layers": "num_hidden_layers", "num_kv_heads": "num_key_value_heads",
                            "architecture": "model_type", "max_context": "max_position_embeddings"}
        config = {stored_as_config.get(k, k): v for k, v in record.items() if k not in ("name", "params")}
        config.setdefault("tie_word_embeddings", False)  # a record states its tying (the dataclass default)
        shape = cls.from_hf_config(config, name=record["name"], where=where)
        for key in sorted({f.name for f in fields(cls)} - {"name", "params"}):
            stated = record.get(key)
            if stated is not None and stated != getattr(shape, key):
                raise TiersimError(f"{where}: {key} {json.dumps(stated)[:40]} is not what a {record['architecture']} "
                                   f"shape of these fields reads ({getattr(shape, key)!r})")
        params = record.get("params")
        if params is None:
            return shape
        if isinstance(params, bool) or not isinstance(params, (int, float)) or not 0 < params < 1e15:
            raise TiersimError(f"{where}: params must be a positive parameter count, got {json.dumps(params)[:40]}")
        return replace(shape, params=float(params))


def block_layout(model_type: str, cfg: Mapping | None = None) -> dict:
    """``gated_mlp``, ``parallel_block`` and ``allreduces_per_layer`` of a decoder of ``model_type``, its config's
    layout keys (``cfg``: ``parallel_attn``, ``new_decoder_architecture``, ``use_parallel_residual``) where the family
    has them: the one reading of a layout, for HF configs and for the reference files' published shapes alike."""
    cfg = cfg or {}
    rule = PARALLEL_BLOCK_MODEL_TYPES.get(model_type, False)
    if isinstance(rule, tuple):
        key, default = rule
        value = _config_flag(cfg, key)
        parallel = default if value is None else value
        new_arch = bool(_config_flag(cfg, "new_decoder_architecture"))  # Falcon's: always a parallel block
        parallel = parallel or new_arch
    else:
        parallel = bool(rule)
    fused = parallel and model_type in FUSED_ALLREDUCE_MODEL_TYPES
    return {"gated_mlp": model_type not in UNGATED_MLP_MODEL_TYPES, "parallel_block": parallel,
            "allreduces_per_layer": 1 if fused else SEQUENTIAL_ALLREDUCES}


def _config_flag(cfg: Mapping, key: str, where: str = "config") -> bool | None:
    """A layout flag of a config, ``None`` when absent. Only a JSON boolean counts: ``bool("false")`` is true, so a
    hand-edited ``"false"`` would silently turn a sequential block parallel (and halve its TP all-reduces)."""
    value = cfg.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise TiersimError(f"{where}: {key} must be true or false, got {value!r}")


def _tied(model_type: str, cfg: Mapping, where: str) -> bool:
    """``tie_word_embeddings`` as stated, else the family's default (:data:`TIED_BY_DEFAULT_MODEL_TYPES`)."""
    stated = _config_flag(cfg, "tie_word_embeddings", where)
    return model_type in TIED_BY_DEFAULT_MODEL_TYPES if stated is None else stated


def _multi_query(model_type: str, cfg: Mapping, where: str) -> bool:
    """Whether a config's attention shares one KV head (:data:`MULTI_QUERY_MODEL_TYPES`; Falcon's new decoder
    architecture reads its ``num_kv_heads`` instead)."""
    if model_type not in MULTI_QUERY_MODEL_TYPES:
        return False
    if model_type == "falcon" and _config_flag(cfg, "new_decoder_architecture", where):
        return False
    return _config_flag(cfg, "multi_query", where) is not False


def _config_int(cfg: Mapping, name: str, where: str, default=None) -> int:
    """One integer field of a config, or one line naming the field, what was found and what is expected."""
    value = cfg.get(name)
    for alias in CONFIG_ALIASES.get(name, ()):
        if value is None:
            value = cfg.get(alias)
    if value is None:
        if default is None:
            raise TiersimError(f"{where}: {name} is missing; expected a positive integer "
                               f"({CONFIG_FIELDS[name][1]})")
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    upper = CONFIG_FIELDS[name][0]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise TiersimError(f"{where}: {name} must be an integer from 1 to {upper:,} "
                           f"({CONFIG_FIELDS[name][1]}), got {json.dumps(value)[:40]}")
    return value


def _max_context(cfg: Mapping, where: str) -> int | None:
    """``max_position_embeddings`` (GPT-2's and BLOOM's ``n_positions``; absent: None, not checked). A value
    that is there but not a positive integer is one line: read as unknown, it would turn the check off unseen."""
    value = cfg.get("max_position_embeddings", cfg.get("n_positions"))
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TiersimError(f"{where}: max_position_embeddings must be a positive integer (the model's context), "
                           f"got {json.dumps(value)[:40]}")
    return value


def check_context(shape: ModelShape, tokens: float, what: str) -> None:
    """One line when ``what`` (the option and the tokens it asks one sequence to hold) is past the model's
    ``max_context``: the model cannot run it, so a plan or a serving run of it prices a run nobody can do.
    For the user-facing commands only; reference data is priced as it was measured."""
    if shape.max_context is not None and tokens > shape.max_context:
        raise TiersimError(f"{what} is {tokens:,.0f} tokens, past {shape.name}'s {shape.max_context:,}-token context "
                           "(max_position_embeddings)")


def _rope_theta(cfg: Mapping) -> float:
    """RoPE base: ``rope_theta`` (transformers 4 and config.json files) or ``rope_parameters`` (transformers 5)."""
    value = cfg.get("rope_theta")
    if value is None and isinstance(cfg.get("rope_parameters"), Mapping):
        value = cfg["rope_parameters"].get("rope_theta")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else 10000.0


def _sliding_window(cfg: Mapping, where: str = "config") -> int | None:
    """The window where any layer uses one (the reading of ``hierarchy.cache.check_model_supported``), else None."""
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types") or []
    used = _config_flag(cfg, "use_sliding_window", where)  # a hand-edited "false" is not a window in use
    used = (window is not None) if used is None else used
    used = used or (isinstance(layer_types, list) and "sliding_attention" in layer_types)
    if used and isinstance(window, int) and not isinstance(window, bool) and window > 0:
        return window
    return None


# Published configs (each model's Hugging Face config.json; vocab_size, intermediate_size as there) and
# published parameter counts (each model card). The KV column agrees with ../shared/design.md's table
# (tested). ``max_context`` is each config.json's ``max_position_embeddings`` (huggingface.co/<repo>/blob/main/
# config.json for deepseek-ai/DeepSeek-R1-Distill-Qwen-{1.5B,7B,14B,32B}, Qwen/QwQ-32B, Qwen/Qwen3-8B,
# meta-llama/Llama-3.1-{8B,70B}): 131,072 but QwQ-32B's and Qwen3-8B's 40,960 (their cards' 131,072 is with YaRN
# rope scaling, which the config does not enable).
R1_CONTEXT = LLAMA31_CONTEXT = 131_072
QWEN3_CONTEXT = QWQ_CONTEXT = 40_960

MODEL_SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in [
        ModelShape("r1-distill-qwen-1.5b", "qwen2", 28, 1536, 8960, 12, 2, 128, 151936, params=1.78e9,
                   max_context=R1_CONTEXT),
        ModelShape("r1-distill-qwen-7b", "qwen2", 28, 3584, 18944, 28, 4, 128, 152064, params=7.62e9,
                   max_context=R1_CONTEXT),
        ModelShape("r1-distill-qwen-14b", "qwen2", 48, 5120, 13824, 40, 8, 128, 152064, params=14.8e9,
                   max_context=R1_CONTEXT),
        ModelShape("r1-distill-qwen-32b", "qwen2", 64, 5120, 27648, 40, 8, 128, 152064, params=32.8e9,
                   max_context=R1_CONTEXT),
        ModelShape("qwq-32b", "qwen2", 64, 5120, 27648, 40, 8, 128, 152064, rope_theta=1e6, params=32.8e9,
                   max_context=QWQ_CONTEXT),
        ModelShape("qwen3-8b", "qwen3", 36, 4096, 12288, 32, 8, 128, 151936, rope_theta=1e6, params=8.19e9,
                   max_context=QWEN3_CONTEXT),
        ModelShape("llama-3.1-8b", "llama", 32, 4096, 14336, 32, 8, 128, 128256, rope_theta=5e5, params=8.03e9,
                   max_context=LLAMA31_CONTEXT),
        ModelShape("llama-3.1-70b", "llama", 80, 8192, 28672, 64, 8, 128, 128256, rope_theta=5e5, params=70.6e9,
                   max_context=LLAMA31_CONTEXT),
    ]
}

#: The validator's CPU smoke shape: the same code path in milliseconds (no simulator preset).
TINY = ModelShape("tiny", "qwen2", 2, 64, 128, 4, 2, 16, 256)


def get_model_shape(name: str) -> ModelShape:
    if name not in MODEL_SHAPES:
        raise TiersimError(f"unknown model {name!r}: choose one of {', '.join(MODEL_SHAPES)}")
    return MODEL_SHAPES[name]
