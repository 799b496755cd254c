"""A context past the model's window is refused by the commands that price one (capacity, simulate, serve): a
plan for 10 million tokens of a 131K-token model prices a run no engine can do. The limit is the config's
max_position_embeddings (``ModelShape.max_context``); the reference data keeps being priced as measured."""

from __future__ import annotations

import json

import pytest

from cli_run import assert_refused, invoke
from test_bad_inputs_generated import GOOD_CONFIG

from tiersim.errors import TiersimError
from tiersim.shapes import MODEL_SHAPES, ModelShape


def test_every_preset_states_its_context_and_a_config_gives_its_own():
    assert all(s.max_context for s in MODEL_SHAPES.values())
    # QwQ-32B's and Qwen3-8B's config.json say 40,960 (131,072 only with YaRN): the shorter window must not be
    # read as the family's longer one.
    assert MODEL_SHAPES["qwq-32b"].max_context < MODEL_SHAPES["r1-distill-qwen-32b"].max_context
    assert ModelShape.from_hf_config({**GOOD_CONFIG, "max_position_embeddings": 4096}).max_context == 4096
    assert ModelShape.from_hf_config({**GOOD_CONFIG, "n_positions": 1024}).max_context == 1024  # GPT-2's name
    assert ModelShape.from_hf_config(GOOD_CONFIG).max_context is None  # unknown: nothing to check against
    for bad in ("big", 0, -5, True, 1.5):
        with pytest.raises(TiersimError, match="max_position_embeddings"):
            ModelShape.from_hf_config({**GOOD_CONFIG, "max_position_embeddings": bad})


@pytest.mark.parametrize("args, words", [
    (["capacity", "--context", "10000000", "--model", "llama-3.1-8b"], "llama-3.1-8b's 131,072-token context"),
    (["simulate", "--context", "131071", "--steps", "2", "--model", "llama-3.1-8b"], "131,073 tokens"),
    (["simulate", "--lengths", "41000", "--model", "qwq-32b"], "qwq-32b's 40,960-token context"),
    (["serve", "--prompt-lengths", "30000", "--lengths", "20000", "--model", "qwen3-8b"], "50,000 tokens"),
    (["capacity", "--qps", "1", "--prompt-lengths", "30000", "--lengths", "20000", "--model", "qwen3-8b"],
     "qwen3-8b's 40,960-token context"),
])
def test_a_context_past_the_models_window_is_one_line(args, words):
    _, err = assert_refused(args)
    assert words in err


def test_the_last_token_the_window_holds_is_accepted():
    """--context + --steps equal to the window is the longest run the model can do: priced, not refused."""
    code, _, err = invoke(["simulate", "--context", "131070", "--steps", "2", "--batch", "1", "--model", "llama-3.1-8b",
                           "--format", "json"])
    assert code == 0, err


def test_a_replayed_request_past_the_window_names_its_row(tmp_path):
    path = tmp_path / "requests.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens\n0,100,200\n1,130000,5000\n")
    _, err = assert_refused(["serve", "--requests-file", str(path), "--model", "llama-3.1-8b"])
    assert "request 1 of --requests-file (prompt 130,000 + output 5,000) is 135,000 tokens" in err
    # cut to --max-tokens, the same request fits: the check reads what is served
    code, _, err = invoke(["serve", "--requests-file", str(path), "--model", "llama-3.1-8b", "--max-tokens", "1000",
                           "--on-full", "queue", "--format", "json"])
    assert code == 0, err


def test_a_model_configs_own_window_is_the_limit(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**GOOD_CONFIG, "max_position_embeddings": 1024}))
    _, err = assert_refused(["capacity", "--model-config", str(path), "--context", "2000", "--steps", "2"])
    assert "1,024-token context" in err
    path.write_text(json.dumps(GOOD_CONFIG))  # no window stated: not checked
    code, _, err = invoke(["simulate", "--model-config", str(path), "--context", "2000", "--steps", "2", "--batch", "2",
                           "--format", "json"])
    assert code == 0, err


def test_reference_points_are_priced_as_measured():
    """The check is the commands', not ``assemble``'s: a fidelity source measured past a window still prices."""
    from tiersim.simulator.scenario import assemble

    assert assemble(1, model="qwq-32b", context=50_000, steps=2).context == 50_000
