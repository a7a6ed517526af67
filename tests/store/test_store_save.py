"""Saving base models into the store: manifest, checksums, faithful round-trip, local sources."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from sllm.errors import InvalidRequestError
from sllm.store import (
    MANIFEST_NAME,
    has_model,
    load_model,
    model_checksum,
    read_manifest,
    save_model,
    verify_model,
)

PROMPT = "Hello, how are you? Act as a pirate."


def _logits(model, tokenizer):
    import torch

    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def _source_logits(src: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    return _logits(model, AutoTokenizer.from_pretrained(src)), model


def test_save_writes_manifest_with_correct_checksums(tmp_path, tiny_model_src):
    storage = tmp_path / "store"
    path = save_model("tiny/llama", storage, local_model_path=tiny_model_src)

    assert path == (storage / "transformers" / "tiny" / "llama").resolve()
    assert has_model(storage, "tiny/llama")
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert manifest == read_manifest(storage, "tiny/llama")
    assert manifest["name"] == "tiny/llama"
    assert manifest["backend"] == "transformers"
    assert manifest["format_version"] == 1
    assert datetime.fromisoformat(manifest["created_time"]).tzinfo is not None
    assert manifest["source"] == {"kind": "local_dir", "path": str(tiny_model_src.resolve())}
    assert manifest["dtype"] == "float32"
    assert manifest["architectures"] == ["LlamaForCausalLM"]

    names = {f["path"] for f in manifest["files"]}
    for required in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ):
        assert required in names
    assert MANIFEST_NAME not in names
    # The manifest lists exactly the files on disk, with their true sizes and hashes.
    on_disk = {p.name for p in path.iterdir()} - {MANIFEST_NAME}
    assert on_disk == names
    for f in manifest["files"]:
        data = (path / f["path"]).read_bytes()
        assert f["size"] == len(data)
        assert f["sha256"] == hashlib.sha256(data).hexdigest()
    h = hashlib.sha256()
    for p, digest in sorted((f["path"], f["sha256"]) for f in manifest["files"]):
        h.update(f"{p}\0{digest}\n".encode())
    assert manifest["checksum"] == h.hexdigest() == model_checksum(storage, "tiny/llama")
    assert manifest["size_bytes"] == sum(f["size"] for f in manifest["files"])
    assert verify_model(storage, "tiny/llama")
    # No scratch directories left behind.
    assert [p.name for p in (storage / "transformers").iterdir() if p.name.startswith(".t")] == []


def test_round_trip_gives_identical_logits_and_chat_template(tmp_path, tiny_model_src):
    import torch

    storage = tmp_path / "store"
    save_model("tiny/llama", storage, local_model_path=tiny_model_src)
    expected, source_model = _source_logits(tiny_model_src)

    model, tokenizer = load_model(storage, "tiny/llama")
    assert torch.equal(_logits(model, tokenizer), expected)
    manifest = read_manifest(storage, "tiny/llama")
    assert manifest["parameter_count"] == sum(p.numel() for p in source_model.parameters())

    msgs = [{"role": "user", "content": "hi"}]
    rendered = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_opt_and_bfloat16_models_keep_their_shape_and_dtype(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sllm.testing import make_tiny_model_dir

    opt_src = make_tiny_model_dir(tmp_path / "opt", arch="opt")
    storage = tmp_path / "store"
    save_model("facebook/opt-tiny", storage, local_model_path=opt_src)
    model, tokenizer = load_model(storage, "facebook/opt-tiny")
    assert torch.equal(_logits(model, tokenizer), _source_logits(opt_src)[0])

    bf16_src = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(opt_src).to(torch.bfloat16).save_pretrained(bf16_src)
    AutoTokenizer.from_pretrained(opt_src).save_pretrained(bf16_src)
    save_model("bf16", storage, local_model_path=str(bf16_src))
    assert read_manifest(storage, "bf16")["dtype"] == "bfloat16"
    model, _ = load_model(storage, "bf16")
    assert model.dtype == torch.bfloat16


def test_bad_local_model_paths_are_refused_clearly(tmp_path):
    storage = tmp_path / "store"
    with pytest.raises(InvalidRequestError, match="does not exist") as e:
        save_model("m", storage, local_model_path=tmp_path / "missing")
    assert e.value.param == "local_model_path"

    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(InvalidRequestError, match="not a .gguf file"):
        save_model("m", storage, local_model_path=tmp_path / "weights.bin")

    gdir = tmp_path / "gg"
    gdir.mkdir()
    (gdir / "model.Q4.gguf").write_bytes(b"not really gguf")
    with pytest.raises(InvalidRequestError, match=r"no config.json.*model.Q4.gguf"):
        save_model("m", storage, local_model_path=gdir)
    with pytest.raises(InvalidRequestError, match="could not load .*model.Q4.gguf"):
        save_model("m", storage, local_model_path=gdir / "model.Q4.gguf")

    (tmp_path / "cfg-only").mkdir()
    (tmp_path / "cfg-only" / "config.json").write_text("{}")
    with pytest.raises(InvalidRequestError, match="could not load"):
        save_model("m", storage, local_model_path=tmp_path / "cfg-only")
    assert not has_model(storage, "m")
    assert not (storage / "transformers" / "m").exists()


def test_hub_save_uses_the_local_hf_cache_when_offline(tmp_path, tiny_model_src):
    """`save --model org/name` without --local-model-path, offline, from a warm HF cache."""
    import shutil

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--org--cached"
    shutil.copytree(tiny_model_src, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)

    storage = tmp_path / "store"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    code = "from pathlib import Path; from sllm.store import save_model; import sys; "
    code += "print(save_model('org/cached', Path(sys.argv[1])))"
    out = subprocess.run(
        [sys.executable, "-c", code, str(storage)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    manifest = read_manifest(storage, "org/cached")
    assert manifest["source"] == {
        "kind": "hub",
        "repo_id": "org/cached",
        "revision": revision,
        "cached": True,
    }
    assert verify_model(storage, "org/cached")
