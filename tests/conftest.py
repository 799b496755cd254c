"""Shared fixtures: the real SmolLM2 (loaded once per session) and tiny random-init models."""

import pytest


@pytest.fixture(scope="session")
def smollm2():
    from tiersim.models import load_model

    return load_model("smollm2")


@pytest.fixture(scope="session")
def tiny_llama():
    from tiersim.models import tiny_model

    return tiny_model("llama")[0]


@pytest.fixture(scope="session")
def tiny_qwen2():
    from tiersim.models import tiny_model

    return tiny_model("qwen2")[0]
