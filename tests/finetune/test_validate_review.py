"""Holes a review of the hardening found: each was a way past the data roots, a 500 at submit, or
an adapter that would break a deployment. Each is now a 400/409 naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ft_helpers import hub_cache_entry, write_jsonl
from test_peft_lora_validate import reject, with_

from sllm.errors import ConflictError
from sllm.finetune.base import ValidationContext, get_backend

DS = "backend_config.dataset_config"


@pytest.fixture
def backend():
    return get_backend("peft_lora")


@pytest.fixture
def ctx(ft_storage: Path, data_dir: Path) -> ValidationContext:
    return ValidationContext(storage_path=ft_storage, data_roots=[data_dir], model="tiny")


@pytest.fixture
def good(data_dir: Path) -> dict:
    train = write_jsonl(data_dir / "train.jsonl", [{"prompt": "Question: hi? Answer: Arr!"}] * 4)
    return {
        "dataset_config": {
            "dataset_source": "local",
            "data_files": str(train),
            "extension_type": "json",
            "tokenization_field": "prompt",
        }
    }


@pytest.mark.parametrize(
    "entry",
    ["file:///etc/passwd", "zip::file:///tmp/x.zip", "simplecache::data/train.json",
     "hf://datasets/other/repo/x.json", "https://example.invalid/x.json"],
)  # fmt: skip
def test_hf_hub_data_files_may_not_be_urls(backend, ctx, offline_hub, entry):
    cfg = _cached_hub_dataset(offline_hub, data_files=[entry])
    reject(backend, cfg, ctx, f"{DS}.data_files", "no URLs")


def test_hf_hub_data_dir_may_not_be_a_url(backend, ctx, offline_hub):
    cfg = _cached_hub_dataset(offline_hub, data_dir="file:///etc")
    reject(backend, cfg, ctx, f"{DS}.data_dir", "relative directory")


def _cached_hub_dataset(cache: Path, **extra) -> dict:
    hub_cache_entry(cache, "owner/repo", [{"prompt": "hi"}])
    ds = {
        "dataset_source": "hf_hub",
        "hf_dataset_name": "owner/repo",
        "tokenization_field": "prompt",
    }
    return {"dataset_config": {**ds, **extra}}


@pytest.mark.parametrize("encoding", ["hex", "base64", "zlib", "rot13"])
def test_a_bytes_codec_is_not_a_text_encoding(backend, good, ctx, encoding):
    reject(backend, with_(good, "dataset_config.encoding", encoding), ctx, f"{DS}.encoding")


def test_a_deeply_nested_line_is_a_400_not_a_500(backend, good, ctx, data_dir):
    deep = data_dir / "deep.jsonl"
    deep.write_text('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    cfg = with_(good, "dataset_config.data_files", str(deep))
    with pytest.raises(Exception) as info:
        backend.validate(cfg, ctx)
    assert getattr(info.value, "status_code", None) == 400, info.value


@pytest.mark.parametrize("name", ["_serve/instance.log", "sllm.lock"])
def test_the_servers_own_files_are_not_training_data(backend, good, ft_storage, name):
    path = ft_storage / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"prompt": "pid 123 port 4567"}) + "\n")
    ctx = ValidationContext(storage_path=ft_storage, data_roots=[ft_storage], model="tiny")
    cfg = with_(good, "dataset_config.data_files", str(path))
    try:
        reject(backend, cfg, ctx, f"{DS}.data_files", "store's own files")
    finally:
        path.unlink()  # the storage is shared by the session's tests


@pytest.mark.parametrize("output_dir", ["x/_serve/a", "_jobs/a", "a/_jobs"])
def test_output_dirs_deploy_would_refuse_are_refused_at_submit(backend, good, ctx, output_dir):
    reject(backend, with_(good, "output_dir", output_dir), ctx, "backend_config.output_dir")


def test_an_adapter_of_another_base_model_is_not_replaced(backend, good, ctx, ft_storage, request):
    import shutil

    old = ft_storage / "transformers" / "adapters" / "other_base"
    old.mkdir(parents=True)
    request.addfinalizer(lambda: shutil.rmtree(old.parent))
    (old / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "tiny-opt"}))
    with pytest.raises(ConflictError) as info:
        backend.validate(with_(good, "output_dir", "adapters/other_base"), ctx)
    assert "tiny-opt" in info.value.message and info.value.status_code == 409
    (old / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "tiny"}))
    assert backend.validate(with_(good, "output_dir", "adapters/other_base"), ctx)
