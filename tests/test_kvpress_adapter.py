"""kvpress presses in the quality grid, tested with a stand-in press module (CI has no kvpress: it needs
transformers < 5.3). The stand-in works the way kvpress's presses do: a context manager that hooks every
attention layer and prunes the DynamicCache in place after the prefill (and, wrapped for decoding, every
few steps), keeping the tokens its score ranks highest."""

from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from transformers import DynamicCache

from generation import random_prompt

from tiersim.compat import cache_kwargs
from tiersim.errors import ConfigError, TiersimError
from tiersim.quality import grid, presses

PRUNED: list[int] = []  # cache lengths right after each prune (layer 0)


def _cache_of(kwargs):
    return kwargs.get("past_key_values") or kwargs.get("cache")


@dataclass
class KnormPress:
    """Keeps the keys of smallest L2 norm (kvpress's Knorm rule), ``compression_ratio`` of them pruned."""

    compression_ratio: float = 0.0

    def prune(self, layer, ratio: float) -> None:
        keys, values = layer.keys, layer.values
        keep = max(1, int(keys.shape[2] * (1 - ratio)))
        order = keys.norm(dim=-1).mean(dim=1).argsort(dim=-1)[:, :keep].sort(dim=-1).values  # [B, keep]
        index = order[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
        layer.keys, layer.values = keys.gather(2, index), values.gather(2, index)

    def hook(self, module, args, kwargs, output):
        if kwargs["hidden_states"].shape[1] > 1 and self.compression_ratio:  # the prefill only
            layer = _cache_of(kwargs).layers[module.layer_idx]
            self.prune(layer, self.compression_ratio)
            if module.layer_idx == 0:
                PRUNED.append(layer.keys.shape[2])
        return output

    @contextmanager
    def __call__(self, model):
        handles = [layer.self_attn.register_forward_hook(self.hook, with_kwargs=True) for layer in model.model.layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


@dataclass
class CompressionRatioDecodingPress:
    base_press: KnormPress
    target_compression_ratio: float = 0.5
    compression_interval: int = 512

    def __post_init__(self):
        self.steps = 0

    def hook(self, module, args, kwargs, output):
        if kwargs["hidden_states"].shape[1] == 1:
            if module.layer_idx == 0:
                self.steps += 1
            if self.steps % self.compression_interval == 0:
                layer = _cache_of(kwargs).layers[module.layer_idx]
                seen = int(kwargs["position_ids"].max()) + 1  # kvpress reads the logical positions too
                self.base_press.prune(layer, 1 - max(1, int(seen * (1 - self.target_compression_ratio)))
                                      / layer.keys.shape[2])
                if module.layer_idx == 0:
                    PRUNED.append(layer.keys.shape[2])
        return output


@dataclass
class PrefillDecodingPress:
    prefilling_press: KnormPress
    decoding_press: CompressionRatioDecodingPress

    @contextmanager
    def __call__(self, model):
        hooks = [h for layer in model.model.layers
                 for h in (layer.self_attn.register_forward_hook(self.prefilling_press.hook, with_kwargs=True),
                           layer.self_attn.register_forward_hook(self.decoding_press.hook, with_kwargs=True))]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()


class ObservedAttentionPress:  # takes no compression ratio, like kvpress's fixed-budget presses
    def __init__(self):
        pass


FAKE = types.SimpleNamespace(KnormPress=KnormPress, CompressionRatioDecodingPress=CompressionRatioDecodingPress,
                             PrefillDecodingPress=PrefillDecodingPress, ObservedAttentionPress=ObservedAttentionPress)


@pytest.fixture
def fake_kvpress(monkeypatch):
    PRUNED.clear()
    monkeypatch.setattr(presses, "import_kvpress", lambda: FAKE)
    return FAKE


def test_press_names_parse_and_bad_ones_are_refused():
    assert presses.parse_press("SnapKV") == presses.PressSpec("SnapKV", False)
    assert presses.parse_press(" SnapKVPress@decode ") == presses.PressSpec("SnapKV", True)
    assert presses.parse_press("TOVA@decode").method == "kvpress:TOVA@decode"
    assert presses.parse_presses("SnapKV, Knorm@decode,") == [presses.PressSpec("SnapKV"),
                                                              presses.PressSpec("Knorm", True)]
    for bad in ("", "Snap KV", "SnapKV@prefill", "@decode", "1x"):
        with pytest.raises(ConfigError, match="NAME or NAME@decode"):
            presses.parse_press(bad)


def test_an_unknown_press_or_one_without_a_ratio_is_a_clear_error(fake_kvpress):
    with pytest.raises(TiersimError, match="no press 'Nope' .*Knorm"):
        presses.make_press(presses.PressSpec("Nope"), 0.5, 16)
    with pytest.raises(TiersimError, match="cannot run it at a compression ratio"):
        presses.make_press(presses.PressSpec("ObservedAttention"), 0.5, 16)


def test_without_kvpress_the_grid_says_what_to_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_kvpress(name, *args, **kwargs):
        if name == "kvpress":
            raise ImportError("No module named 'kvpress'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_kvpress)
    with pytest.raises(TiersimError, match=r"pip install 'tiersim\[kvpress\]'.*transformers >= 5.2, < 5.3"):
        presses.import_kvpress()


def test_the_press_loop_without_pruning_is_the_full_cache(tiny_llama, fake_kvpress):
    """Logical positions and the loop itself: a press that prunes nothing reproduces greedy generate."""
    ids = random_prompt(tiny_llama, 30, seed=3)
    with torch.inference_mode():
        ref = tiny_llama.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(tiny_llama, DynamicCache()),
                                  max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    spec = presses.PressSpec("Knorm")
    tokens, logits = presses.decode(tiny_llama, ids, 12, press=presses.make_press(spec, 0.0, 16), spec=spec)
    assert tokens == ref[0, 30:].tolist() and len(logits) == 12


def test_a_press_prunes_at_the_prefill_and_while_decoding(tiny_llama, fake_kvpress):
    ids = random_prompt(tiny_llama, 40, seed=1)
    spec = presses.PressSpec("Knorm")
    presses.decode(tiny_llama, ids, 10, press=presses.make_press(spec, 0.5, 4), spec=spec)
    assert PRUNED == [20]  # half the prompt, once
    PRUNED.clear()
    spec = presses.PressSpec("Knorm", decode=True)
    presses.decode(tiny_llama, ids, 10, press=presses.make_press(spec, 0.5, 4), spec=spec)
    # 20 kept at the prefill; after 4 and 8 decoding steps, half of the 44 / 48 tokens seen.
    assert PRUNED == [20, 22, 24]


def test_the_grid_runs_presses_beside_the_hierarchy_with_the_teacher_forced_kl(tiny_llama, fake_kvpress):
    samples = [grid.Sample(f"p{i}", random_prompt(tiny_llama, 36, seed=i)) for i in range(2)]
    specs = presses.parse_presses("Knorm,Knorm@decode")
    cells = grid.build_cells([1.0, 0.5], [0.0, 0.1], baselines=["streamingllm"], presses=specs,
                             sink_tokens=2, recent_window=4, retier_every=4)
    passes = []
    rows, _ = grid.run_grid(tiny_llama, samples, cells, 8, kl=True, on_kl=lambda sid, cell: passes.append((sid, cell)))
    assert len(passes) == len(samples) * (len(cells) + 1)  # the KL pass reports each (prompt, cell) to the progress
    by = {(r["method"], r["hbm"], r["evict"]): r for r in rows}
    assert by[("hierarchy", 0.5, 0.0)]["mean_kl"] == 0.0  # lossless offloading: the same distributions
    assert by[("hierarchy", 0.5, 0.0)]["exact_match"] == 1.0
    assert by[("hierarchy", 0.5, 0.1)]["mean_kl"] > 0.0
    for method in ("kvpress:Knorm", "kvpress:Knorm@decode"):
        row = by[(method, 0.5, 0.5)]
        assert row["mean_kl"] > 0.0 and row["mean_new_tokens"] == 8
    assert not any(r["method"].startswith("kvpress") and r["hbm"] == 1.0 for r in rows)


def test_the_journal_keeps_press_cells_apart(tmp_path, tiny_llama):
    from tiersim.quality.journal import RunJournal

    journal = RunJournal(tmp_path / "runs.jsonl", {"model": "tiny"})
    sample = grid.Sample("p", random_prompt(tiny_llama, 8))
    cells = grid.build_cells([0.5], [0.0], presses=presses.parse_presses("Knorm,Knorm@decode,SnapKV"))
    keys = {journal.key(sample, cell, 4, None) for cell in cells}
    assert len(keys) == len(cells) == 4  # the hierarchy's cell and three presses


def test_the_grid_command_refuses_a_missing_kvpress_or_a_bad_name_in_one_line(monkeypatch):
    from cli_run import invoke

    def missing():
        raise TiersimError(f"--kvpress needs kvpress: {presses.INSTALL}")

    monkeypatch.setattr(presses, "import_kvpress", missing)
    for args, words in ((["--kvpress", "SnapKV"], "pip install 'tiersim[kvpress]'"),
                        (["--kvpress", "Snap KV"], "NAME or NAME@decode")):
        code, out, err = invoke(["grid", *args, "--n", "1", "--max-new-tokens", "1"])
        assert code != 0 and words in err and "Traceback" not in err
        assert len([line for line in err.splitlines() if line.strip()]) == 1
    code, _, err = invoke(["grid", "--kl", "--ray", "--n", "1"])
    assert code != 0 and "--kl runs in this process" in err


def test_a_real_kvpress_press_where_kvpress_is_installed(tiny_llama):
    """Runs only in a kvpress venv (transformers < 5.3; docs/quality.md): the adapter against kvpress itself."""
    kvpress = pytest.importorskip("kvpress")
    ids = random_prompt(tiny_llama, 40, seed=2)
    reference, _ = presses.decode(tiny_llama, ids, 10)
    for name in ("ExpectedAttention", "Knorm", "TOVA"):
        spec = presses.PressSpec(name)
        kept, _ = presses.decode(tiny_llama, ids, 10, press=presses.make_press(spec, 0.0, 16, module=kvpress), spec=spec)
        assert kept == reference, name  # a press at ratio 0 prunes nothing: the same tokens
        press = presses.make_press(spec, 0.5, 16, module=kvpress)
        cache = DynamicCache()
        with press(tiny_llama), torch.inference_mode():
            tiny_llama(input_ids=ids, past_key_values=cache)
        assert cache.get_seq_length() == 20, name


@pytest.mark.parametrize("text", ["", " ", ",", " , "])
def test_a_kvpress_option_naming_no_press_is_refused(text):
    with pytest.raises(TiersimError, match="--kvpress: expected comma-separated press names"):
        presses.parse_presses(text)
    assert presses.parse_presses(None) == []
