"""Fixtures for the store tests, kept here so they do not depend on the shared conftest."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_src(tmp_path_factory) -> Path:
    """A tiny random-weight llama with a real tokenizer and chat template, built offline."""
    from sllm.testing import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("store-src") / "tiny-llama")
