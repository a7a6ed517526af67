"""Fixtures for the fine-tuning backend tests: tiny stored models, data files, a recording reporter.

Everything is offline: models come from `sllm.testing`, datasets from local files, and the Hub is
switched to offline mode for every test so nothing can wait on the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ft_helpers import PIRATE_DATA, RecordingReporter


@pytest.fixture
def reporter() -> RecordingReporter:
    return RecordingReporter()


@pytest.fixture(autouse=True)
def offline_hub(tmp_path_factory, monkeypatch):
    """No network, and a private datasets cache (nothing written to ~/.cache)."""
    import datasets.config
    import huggingface_hub.constants

    cache = tmp_path_factory.getbasetemp() / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return cache


@pytest.fixture(scope="session")
def ft_storage(tmp_path_factory) -> Path:
    """A storage path holding `tiny` (llama-shaped, saved through the store, so it has a manifest
    and checksum) and `tiny-opt` (OPT-shaped, written directly: no manifest)."""
    from sllm.store import save_model
    from sllm.testing import make_tiny_model_dir

    src = make_tiny_model_dir(tmp_path_factory.mktemp("src") / "tiny-llama", arch="llama")
    root = tmp_path_factory.mktemp("ft_storage")
    save_model("tiny", root, local_model_path=src)
    make_tiny_model_dir(root / "transformers" / "tiny-opt", arch="opt")
    return root


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A per-test data directory; tests allow it (or its parent) as a data root."""
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def pirate_rows() -> list[dict[str, Any]]:
    return [json.loads(line) for line in PIRATE_DATA.read_text().splitlines() if line.strip()]
