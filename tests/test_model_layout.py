"""A decoder block's layout (gated or plain MLP, parallel or sequential block) read from configs, and the TP
all-reduce count that follows it (tiersim.shapes.block_layout, parallel.allreduces_per_layer; docs/simulator.md,
"Tensor parallel").

The configs are built in-test with transformers' own config classes (``to_dict()`` keeps each family's own keys:
GPT-J's ``n_layer``/``n_embd``, OPT's ``ffn_dim``, Falcon's ``num_kv_heads``), so what is read is what a
``config.json`` of that family holds.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from tiersim.errors import TiersimError
from tiersim.serving.stepcost import StepPricer
from tiersim.shapes import MODEL_SHAPES, TIED_BY_DEFAULT_MODEL_TYPES, ModelShape, block_layout
from tiersim.simulator import parallel
from tiersim.simulator.presets import Model, get_gpu, get_model

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=128)


def _shape(config) -> ModelShape:
    return ModelShape.from_hf_config(config.to_dict(), where="test")


# family -> (config, gated MLP, parallel block, all-reduces per layer). The expected layouts are transformers'
# modeling files' (PhiDecoderLayer, GPTJBlock, GPTNeoXLayer, FalconDecoderLayer, ...), the counts vLLM's and
# TensorRT-LLM's (Falcon's parallel block summed before one reduce; every other family reduced after each part).
FAMILIES = {
    "llama": (lambda t: t.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, **TINY), True, False, 2),
    "phi": (lambda t: t.PhiConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=4, **TINY), False, True, 2),
    "gptj": (lambda t: t.GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, **TINY), False, True, 2),
    "codegen": (lambda t: t.CodeGenConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, **TINY), False, True, 2),
    "gpt_neox": (lambda t: t.GPTNeoXConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                           num_attention_heads=4, **TINY), False, True, 2),
    "gpt_neox sequential": (lambda t: t.GPTNeoXConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                                      num_attention_heads=4, use_parallel_residual=False, **TINY),
                            False, False, 2),
    "stablelm": (lambda t: t.StableLmConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=4, **TINY), True, False, 2),
    "stablelm parallel": (lambda t: t.StableLmConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                     num_attention_heads=4, num_key_value_heads=4,
                                                     use_parallel_residual=True, **TINY), True, True, 2),
    "falcon-7b": (lambda t: t.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **TINY),
                  False, True, 1),
    "falcon new decoder": (lambda t: t.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                    num_kv_heads=2, new_decoder_architecture=True,
                                                    parallel_attn=False, **TINY), False, True, 1),
    "falcon sequential": (lambda t: t.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                   parallel_attn=False, **TINY), False, False, 2),
    "opt": (lambda t: t.OPTConfig(hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                                  word_embed_proj_dim=64, **TINY), False, False, 2),
    "gpt2": (lambda t: t.GPT2Config(n_embd=64, n_layer=2, n_head=4, **TINY), False, False, 2),
    "bloom": (lambda t: t.BloomConfig(hidden_size=64, n_layer=2, n_head=4, **TINY), False, False, 2),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_s_block_layout_is_read_from_its_config(family):
    make, gated, parallel_block, reduces = FAMILIES[family]
    shape = _shape(make(transformers))
    assert (shape.gated_mlp, shape.parallel_block, shape.allreduces_per_layer) == (gated, parallel_block, reduces)
    assert shape.num_layers == 2 and shape.hidden_size == 64  # the family's own key names were read
    model = Model.from_shape(shape)
    assert (model.gated_mlp, model.parallel_block, model.allreduces_per_layer) == (gated, parallel_block, reduces)
    assert model.shape == shape  # the view keeps the layout whole, both ways
    assert parallel.allreduces_per_layer(model) == reduces


def test_widths_and_kv_heads_come_from_each_family_s_own_keys():
    """GPT-J's ``n_inner: None`` is 4 x width, OPT's width is ``ffn_dim``, and Falcon's KV heads follow its layout flags
    as its attention reads them: one shared head under multi_query (the default), ``num_kv_heads`` in the new decoder
    architecture. Before these were read, a Falcon-7B config planned 71 KV heads (its KV 71 times too large)."""
    t = transformers
    assert _shape(t.GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8)).intermediate_size == 256
    assert _shape(t.OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=64)).intermediate_size == 96
    falcon = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    assert _shape(t.FalconConfig(**falcon)).num_kv_heads == 1
    assert _shape(t.FalconConfig(**falcon, multi_query=False)).num_kv_heads == 4
    assert _shape(t.FalconConfig(**falcon, new_decoder_architecture=True, num_kv_heads=2)).num_kv_heads == 2
    # an ungated family's MLP is 2 matrices: a GPT-J layer's weights are 4 h^2 (attention) + 2 x 4 h^2, not 3 x
    gptj = _shape(t.GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=128))
    assert gptj.parameter_count(vectors=False) == 2 * (4 * 64 * 64 + 2 * 64 * 256) + 2 * 128 * 64


def test_a_bad_layout_field_is_still_one_line():
    """The aliases are checked like the names they stand for: a wrong GPT-J ``n_layer`` names the field."""
    cfg = transformers.GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8).to_dict()
    with pytest.raises(TiersimError, match="num_hidden_layers must be an integer"):
        ModelShape.from_hf_config({**cfg, "n_layer": "two"}, where="test")


def test_every_shipped_shape_is_a_sequential_gated_block():
    """The built-in table is Llama and Qwen: sequential, gated, two all-reduces per layer (its layout as read)."""
    for shape in MODEL_SHAPES.values():
        assert block_layout(shape.architecture) == {"gated_mlp": True, "parallel_block": False,
                                                    "allreduces_per_layer": 2}
        assert (shape.gated_mlp, shape.parallel_block, shape.allreduces_per_layer) == (True, False, 2)


def _falcon(tp_reduces: int | None = None) -> Model:
    shape = _shape(transformers.FalconConfig(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16,
                                             num_kv_heads=8, new_decoder_architecture=True, vocab_size=1024))
    model = Model.from_shape(shape)
    return model if tp_reduces is None else replace(model, allreduces_per_layer=tp_reduces)


def test_the_all_reduce_count_is_the_model_s_unless_an_engine_states_its_own():
    gpu = get_gpu("h100-sxm")
    falcon, llama = _falcon(), get_model("llama-3.1-8b")
    assert parallel.allreduces_per_layer(falcon) == 1 and parallel.allreduces_per_layer(llama) == 2
    assert parallel.allreduces_per_layer(falcon, 2) == 2  # an engine build that reduces twice (TensorRT-LLM v0.5)
    one = parallel.allreduce_s(gpu, 4, 64 * falcon.hidden_size * falcon.param_bytes)
    assert parallel.layer_allreduce_s(falcon, gpu, 4, 64) == pytest.approx(one, rel=1e-12)
    assert parallel.layer_allreduce_s(falcon, gpu, 4, 64, allreduces=2) == pytest.approx(2 * one, rel=1e-12)
    assert parallel.shard(falcon, 4).allreduces_per_layer == 1  # a rank keeps the layout
    for bad in (0, 3, 1.5, True):
        with pytest.raises(ValueError, match="1 or 2"):
            parallel.allreduces_per_layer(falcon, bad)


def test_serving_and_tp_prefill_price_the_model_s_count():
    """``serve --tp`` (StepPricer) and TP prefill read the same count: a Falcon parallel block's decode step and
    prompt are one all-reduce of their rows per layer cheaper than the same shape run as a sequential block."""
    gpu, tp, batch, prompt = get_gpu("h100-sxm"), 4, 16, 512
    once, twice = _falcon(), _falcon(2)
    hidden_bytes = once.hidden_size * once.param_bytes
    step_gap = StepPricer(twice, gpu, tp).decode_s(batch, 16 * 1024.0)[0] - StepPricer(once, gpu, tp).decode_s(
        batch, 16 * 1024.0)[0]
    assert step_gap == pytest.approx(once.num_layers * parallel.allreduce_s(gpu, tp, batch * hidden_bytes), rel=1e-9)
    prefill_gap = parallel.tp_prefill_s(twice, gpu, tp, prompt) - parallel.tp_prefill_s(once, gpu, tp, prompt)
    assert prefill_gap == pytest.approx(once.num_layers * parallel.allreduce_s(gpu, tp, prompt * hidden_bytes),
                                        rel=1e-9)
    # at TP 1 there is nothing to reduce: the layout changes no single-GPU price
    assert StepPricer(once, gpu, 1).decode_s(batch, 16 * 1024.0)[0] == StepPricer(twice, gpu, 1).decode_s(
        batch, 16 * 1024.0)[0]


# -- small-op bytes by layout: tried on prefill, not shipped (docs/simulator.md, "Prefill") ----------------------
def _layout_bytes(model: Model) -> float:
    """The alternative tried: each token's small-op elements counted by the block's layout instead of the sequential
    gated block the fit tables time (``prefill.small_ops_bytes_per_token``): a parallel block that shares one norm
    (Phi-2, GPT-J; Falcon's new decoder architecture keeps two, ln_attn and ln_mlp) reads and writes one hidden
    vector less, and a plain activation reads one intermediate tensor instead of two. The residual adds stay two
    binary adds (a parallel block's attention + MLP + residual sum is two kernels in vidur's profiled block)."""
    h, w = model.hidden_size, model.mlp_width
    rope = 2 * (model.num_attention_heads + model.num_kv_heads) * model.head_dim
    norms = 1 if model.parallel_block and not model.name.startswith("falcon") else 2
    activation = (3 if model.gated_mlp else 2) * w
    return float((2 * norms * h + 2 * 3 * h + rope + activation) * model.param_bytes)


def test_small_op_bytes_by_layout_refit_on_the_fit_source_do_not_improve_held_out_prefill(monkeypatch):
    """Refitted on vidur's TP 1 tables only (the fit source, which holds phi-2), the layout's bytes lower both GPUs'
    small-op efficiency (phi-2's small ops, 12-69% over-priced at 512-4096 tokens, need less of the constant's help),
    which slows every sequential block: the pooled held-out TTFT median gets worse, and the held-out rows whose own
    bytes change (GPT-J, a parallel plain-MLP block; Falcon-180B at 2K tokens) move away from their measurements."""
    from tiersim.simulator import prefill, prefill_fidelity as pf

    shipped = pf.rows()
    for m in (pf.fidelity.model_for(c) for c in pf.load_reference()["gemm_cases"] if c["model"] == "phi-2"):
        assert _layout_bytes(m) < prefill.small_ops_bytes_per_token(m)  # the layout moves phi-2's bytes down
    llama = get_model("llama-3.1-8b")
    assert _layout_bytes(llama) == prefill.small_ops_bytes_per_token(llama)  # and leaves a sequential gated block's
    monkeypatch.setattr(prefill, "small_ops_bytes_per_token", _layout_bytes)
    fitted = pf.fit()
    gpus = pf._gpus(None)
    for key, gpu in gpus.items():
        own = "a100" if gpu.name.startswith("a100") else "h100"  # the 40 GB A100 and the GH200 read these two's
        assert fitted[own]["prefill_small_ops_efficiency"] < gpu.prefill_small_ops_efficiency
        gpus[key] = replace(gpu, prefill_small_ops_efficiency=fitted[own]["prefill_small_ops_efficiency"])
    tried = pf.rows(gpus)
    assert pf.summary(tried)["held_out"]["median_pct"] > pf.summary(shipped)["held_out"]["median_pct"]
    before = {(r.source, r.gpu, r.model, r.tp, r.tokens): r for r in shipped if r.role == "held_out"}
    moved = [(before[k], r) for r in tried if r.role == "held_out"
             for k in [(r.source, r.gpu, r.model, r.tp, r.tokens)]
             if r.model == "gptj-6b" or (r.model == "falcon-180b" and r.tokens == 2048)]
    assert len(moved) == 4
    assert all(abs(after.error_pct) > abs(b.error_pct) for b, after in moved)


def test_serve_tp_prices_falcon_s_parallel_block_with_one_all_reduce(tmp_path):
    """End to end: ``serve --tp 2 --model-config`` of a Falcon config in the new decoder architecture against the
    same shape as a sequential Falcon block (``parallel_attn`` false; ``multi_query`` false keeps its 8 KV heads):
    one request's decode steps differ by exactly one all-reduce of one row per layer."""
    import json

    from cli_run import invoke

    base = {"model_type": "falcon", "num_hidden_layers": 8, "hidden_size": 4096, "num_attention_heads": 32,
            "num_kv_heads": 8, "vocab_size": 65024, "torch_dtype": "bfloat16"}
    tpot = {}
    for name, layout in (("parallel", {"new_decoder_architecture": True}),
                         ("sequential", {"parallel_attn": False, "multi_query": False})):
        path = tmp_path / name / "config.json"
        path.parent.mkdir()
        path.write_text(json.dumps({**base, **layout}))
        code, out, err = invoke(["serve", "--model-config", str(path), "--tp", "2", "--requests", "1", "--lengths",
                                 "32", "--format", "json"])
        assert code == 0, err
        tpot[name] = json.loads(out)["runs"][0]["tpot_ms"]["p50"]
    gpu = get_gpu("h100-sxm")
    one = parallel.allreduce_s(gpu, 2, 1 * base["hidden_size"] * 2)
    assert tpot["sequential"] - tpot["parallel"] == pytest.approx(base["num_hidden_layers"] * one * 1e3, rel=1e-6)


@pytest.mark.parametrize("key", ["parallel_attn", "new_decoder_architecture"])
def test_a_layout_flag_that_is_not_a_boolean_is_one_line(key):
    """bool("false") is True: a hand-edited "false" must be refused, not read as a parallel block."""
    with pytest.raises(TiersimError, match=f"{key} must be true or false"):
        block_layout("falcon", {key: "false"})
    assert block_layout("falcon", {"parallel_attn": False})["parallel_block"] is False


# family -> a config.json as that family's published files write it: the family's own key names, and only the keys
# they state (a file saved by transformers leaves out what equals a default). Each must read as transformers itself
# parses it (``CONFIG_MAPPING[type](**file)``): a key the reader does not know would plan another model than the one
# served, or refuse a real file.
HUB_FILES = {
    "llama": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": 2},
    "gptj": {"n_embd": 64, "n_head": 4, "n_layer": 2, "rotary_dim": 8},
    "codegen": {"n_embd": 64, "n_head": 4, "n_layer": 2, "rotary_dim": 8},
    "gpt_neox": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2},
    "phi": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2},
    # bigscience/bloom-560m's config.json states its width as n_embed (BloomConfig pops it into hidden_size)
    "bloom": {"n_embed": 64, "n_layer": 2, "num_attention_heads": 4},
    # bigcode/starcoder's config.json: "multi_query": true and no KV head count (GPTBigCodeAttention: one KV head)
    "gpt_bigcode": {"n_embd": 64, "n_head": 4, "n_layer": 2, "n_inner": 256, "multi_query": True},
    "gpt_bigcode multi-head": {"n_embd": 64, "n_head": 4, "n_layer": 2, "multi_query": False},
    # tied families whose published files state no tie_word_embeddings (google/gemma-7b, openai-community/gpt2)
    "gemma": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 1,
              "num_hidden_layers": 2, "head_dim": 16},
    "gpt2": {"n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 1024},
    "opt": {"hidden_size": 64, "ffn_dim": 256, "num_attention_heads": 4, "num_hidden_layers": 2,
            "word_embed_proj_dim": 64},
    "falcon": {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "parallel_attn": True},
    "cohere": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 4,
               "num_hidden_layers": 2},
    "starcoder2": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "num_hidden_layers": 2},
    "bloom untied": {"n_embed": 64, "n_layer": 2, "num_attention_heads": 4, "tie_word_embeddings": False},
}
PLANNED = ("num_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_kv_heads", "head_dim",
           "vocab_size", "tie_word_embeddings", "gated_mlp", "parallel_block", "allreduces_per_layer")


@pytest.mark.parametrize("family", HUB_FILES)
def test_a_published_config_json_reads_as_transformers_parses_it(family):
    file, model_type = {**HUB_FILES[family], **TINY}, family.split()[0]
    raw = ModelShape.from_hf_config({**file, "model_type": model_type}, where="test")
    parsed = _shape(transformers.CONFIG_MAPPING[model_type](**file))
    assert {k: getattr(raw, k) for k in PLANNED} == {k: getattr(parsed, k) for k in PLANNED}


def test_a_multi_query_flag_that_is_not_a_boolean_is_one_line():
    cfg = {"model_type": "gpt_bigcode", "n_embd": 64, "n_head": 4, "n_layer": 2, "multi_query": "false"}
    with pytest.raises(TiersimError, match=r"^test: multi_query must be true or false"):
        ModelShape.from_hf_config(cfg, where="test")


UNTIED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gptj", "gpt_neox", "codegen", "stablelm")


@pytest.mark.parametrize("family", sorted(TIED_BY_DEFAULT_MODEL_TYPES) + list(UNTIED_FAMILIES))
def test_the_tied_by_default_families_are_those_transformers_ties_by_default(family):
    """The list is transformers' own defaults (a family added there or here without the other fails)."""
    if family not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {family}")
    config = transformers.CONFIG_MAPPING[family]()
    assert bool(config.tie_word_embeddings) == (family in TIED_BY_DEFAULT_MODEL_TYPES)


def test_a_tied_file_without_the_key_plans_one_vocabulary_table():
    """A Gemma file as published (no tie_word_embeddings) weighs one table less than the same file stated untied."""
    gemma = {"model_type": "gemma", **HUB_FILES["gemma"], "vocab_size": 256_000}
    tied = ModelShape.from_hf_config(gemma, where="test")
    untied = ModelShape.from_hf_config({**gemma, "tie_word_embeddings": False}, where="test")
    assert untied.weight_bytes - tied.weight_bytes == tied.embedding_bytes
    with pytest.raises(TiersimError, match=r"^test: tie_word_embeddings must be true or false"):
        ModelShape.from_hf_config({**gemma, "tie_word_embeddings": "false"}, where="test")


def test_every_reference_shape_is_read_with_its_family_s_layout():
    """The decode-steps file's models are built through ``block_layout`` like every other reference shape (found in
    review: they took only ``gated_mlp`` from the file, so GPT-J's parallel block read as a sequential one)."""
    from tiersim.simulator import decode_fidelity, fidelity, prefill_fidelity

    doc = decode_fidelity.load()
    for key, s in doc["models"].items():
        model = decode_fidelity.model_for(doc, key)
        assert (model.gated_mlp, model.parallel_block, model.allreduces_per_layer) == tuple(
            block_layout(s["architecture"], s).values()), key
    # GPT-J as its engines build it: a parallel block, a plain GELU MLP, two all-reduces per layer under TP
    gptj = decode_fidelity.model_for(doc, "gpt-j-6b")
    assert (gptj.parallel_block, gptj.gated_mlp, gptj.allreduces_per_layer) == (True, False, 2)
    # the file's own gated_mlp must be its family's, not read beside the layout
    wrong = {**doc, "models": {**doc["models"], "gpt-j-6b": {**doc["models"]["gpt-j-6b"], "gated_mlp": True}}}
    with pytest.raises(ValueError, match="gpt-j-6b: gated_mlp True is not a gptj block's"):
        decode_fidelity.model_for(wrong, "gpt-j-6b")
    ref = prefill_fidelity.load_reference()
    for key, s in ref["models"].items():
        model = prefill_fidelity.model_from_shape(key, s)
        assert (model.gated_mlp, model.parallel_block) == (s["gated_mlp"], block_layout(s["architecture"], s)[
            "parallel_block"]), key
    assert all(fidelity.model_for(c).parallel_block == (c["architecture"] == "phi") for c in ref["gemm_cases"])
