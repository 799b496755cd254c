"""Generated garbage (config files, traces, option values) never gets a traceback: exit 0 or one line and 2.

Each case runs the real entry point (`tiersim.cli.app.run`, which maps errors to one line) in-process,
so hundreds of inputs take seconds. An unexpected exception escapes `run` and fails the test.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_run import invoke

from tiersim import fileformat
from tiersim.traces import default_trace_path, read, write

SETTINGS = settings(max_examples=80, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FAST = ["--steps", "2", "--batch", "2", "--format", "json"]


def assert_clean(args: list[str]) -> None:
    code, out, err = invoke(args)
    assert "Traceback" not in err
    if code == 0:
        json.loads(out)  # --format json: stdout is the document alone
    else:
        assert code == 2, (code, err)
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err


# -- model configs --------------------------------------------------------------------------------------
FIELDS = ["num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
          "intermediate_size", "vocab_size", "text_config", "tie_word_embeddings", "_name_or_path"]
GOOD = {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 2,
        "head_dim": 32, "intermediate_size": 512, "vocab_size": 1000}
garbage = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(),
                                                                            max_size=2),
)
configs = st.one_of(
    garbage,  # not an object at all
    st.builds(lambda changes: {**GOOD, **changes}, st.dictionaries(st.sampled_from(FIELDS), garbage, min_size=1)),
    st.builds(lambda drop: {k: v for k, v in GOOD.items() if k not in drop}, st.sets(st.sampled_from(FIELDS))),
)


@SETTINGS
@given(config=configs)
def test_garbage_model_configs(tmp_path, config):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert_clean(["simulate", "--model-config", str(path), *FAST])


@pytest.mark.parametrize("config, field", [
    ([1, 2], "JSON object"), ("llama", "JSON object"), ({**GOOD, "num_attention_heads": 0}, "num_attention_heads"),
    ({**GOOD, "num_hidden_layers": -4}, "num_hidden_layers"), ({**GOOD, "num_key_value_heads": 0}, "num_key_value_heads"),
    ({**GOOD, "hidden_size": "4096"}, "hidden_size"), ({**GOOD, "text_config": None}, None),
    ({**GOOD, "num_key_value_heads": 3}, "multiple of num_key_value_heads"),
])
def test_each_bad_config_value_is_named(tmp_path, config, field):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    code, out, err = invoke(["simulate", "--model-config", str(path), *FAST])
    if field is None:  # a null text_config means "no text_config": the top level is used
        assert code == 0, err
        return
    assert code == 2 and field in err and len(err.strip().splitlines()) == 1, err


# -- traces ---------------------------------------------------------------------------------------------
def _trace_variants():
    source = read(default_trace_path())
    steps = source.steps[source.steps.seq_id < 2]
    return source.meta, steps


@SETTINGS
@given(data=st.data())
def test_garbage_traces(tmp_path, data):
    meta, steps = _trace_variants()
    path = tmp_path / "trace.parquet"
    kind = data.draw(st.sampled_from(["bytes", "truncated", "meta", "values", "columns"]))
    if kind == "bytes":
        path.write_bytes(data.draw(st.binary(max_size=256)))
    elif kind == "truncated":
        raw = default_trace_path().read_bytes()
        path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    elif kind == "meta":
        meta = dict(meta)
        key = data.draw(st.sampled_from(sorted(meta)))
        meta[key] = data.draw(garbage)
        write(path, steps, meta)
    elif kind == "values":
        steps = steps.copy()
        column = data.draw(st.sampled_from([c for c in steps.columns if c not in ("seq_id", "step", "layer")]))
        value = data.draw(st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True)))
        if np.isfinite(value):
            steps[column] = np.asarray(value).astype(steps[column].dtype, copy=False)
            write(path, steps, meta)
        else:  # NaN / inf cannot be stored in the writer's integer columns: write the float column as it is
            steps[column] = value
            fileformat.write_table(path, steps, meta)
    else:
        drop = data.draw(st.sampled_from(list(steps.columns)))
        pd.DataFrame(steps.drop(columns=[drop])).to_parquet(path)
    assert_clean(["simulate", "--trace", str(path), *FAST])


# -- option values --------------------------------------------------------------------------------------
options = st.sampled_from(["--batch", "--steps", "--hbm", "--ddr", "--evict", "--compressed", "--lengths",
                           "--context", "--prefetch", "--gpu", "--model", "--seed"])
values = st.one_of(st.text(min_size=1, max_size=10).filter(lambda s: not s.startswith("-")),
                   st.integers(-10**9, 10**9).map(str), st.floats(allow_nan=True).map(str))


@SETTINGS
@given(option=options, value=values)
def test_garbage_option_values(option, value):
    assert_clean(["simulate", "--steps", "2", "--batch", "2", "--format", "json", option, value])


# -- measurement files (--against, --profile, --calibration) ----------------------------------------------
def _damaged(document: dict, data) -> dict:
    """``document`` with one field somewhere inside replaced by garbage."""
    import copy

    doc = copy.deepcopy(document)
    node = doc
    for _ in range(data.draw(st.integers(1, 4))):
        keys = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
        if not keys:
            break
        key = data.draw(st.sampled_from(keys))
        if data.draw(st.booleans()) or not isinstance(node[key], (dict, list)) or not node[key]:
            node[key] = data.draw(garbage)
            break
        node = node[key]
    return doc


MEASUREMENTS = {"calibration": "h100-80gb-hbm3.json", "operator-profile": "h100-80gb-hbm3-operators.json"}


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_garbage_measurement_files(tmp_path, data):
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "docs" / "validation"
    kind = data.draw(st.sampled_from(sorted(MEASUREMENTS)))
    document = json.loads((folder / MEASUREMENTS[kind]).read_text())
    path = tmp_path / "m.json"
    path.write_text(json.dumps(_damaged(document, data)))
    option = data.draw(st.sampled_from(["--against", "--profile", "--calibration"] if kind == "calibration"
                                       else ["--against", "--profile"]))
    extra = ["--profile", str(folder / MEASUREMENTS["operator-profile"])] if option == "--against" else []
    assert_clean(["simulate", option, str(path), *extra, "--steps", "2", "--batch", "2", "--format", "json"])
