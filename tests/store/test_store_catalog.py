"""Listing, checksums, deleting, name checks, replacing and conflicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sllm.errors import ConflictError, InvalidRequestError, NotFoundError
from sllm.store import (
    MANIFEST_NAME,
    delete_model,
    has_model,
    list_models,
    load_model,
    model_checksum,
    read_manifest,
    save_model,
    verify_model,
)


@pytest.fixture
def store(tmp_path, tiny_model_src) -> Path:
    storage = tmp_path / "store"
    save_model("org/name", storage, local_model_path=tiny_model_src)
    save_model("plain", storage, local_model_path=tiny_model_src)
    save_model("deep/er/model", storage, local_model_path=tiny_model_src)
    return storage


def test_list_finds_nested_models_and_skips_everything_else(store, tiny_model_src):
    root = store / "transformers"
    # An adapter (even one with a manifest), a half-written dir, scratch dirs: none are models.
    adapter = root / "org" / "adapters" / "a1"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / MANIFEST_NAME).write_text("{}")
    (root / "incomplete").mkdir()
    (root / "incomplete" / "config.json").write_text("{}")
    (root / ".tmp-1-abc-host").mkdir()
    (root / ".tmp-1-abc-host" / MANIFEST_NAME).write_text("{}")

    models = list_models(store)
    assert [m["name"] for m in models] == ["deep/er/model", "org/name", "plain"]
    entry = models[1]
    manifest = read_manifest(store, "org/name")
    assert entry["size_bytes"] == sum(f["size"] for f in manifest["files"]) > 0
    assert entry["parameter_count"] == manifest["parameter_count"] > 0
    assert entry["dtype"] == "float32"
    assert entry["created_time"] == manifest["created_time"]
    assert entry["source"] == {"kind": "local_dir", "path": str(tiny_model_src.resolve())}
    assert entry["checksum"] == model_checksum(store, "org/name")
    json.dumps(models)  # plain JSON

    assert has_model(store, "org/name") and not has_model(store, "org")
    assert not has_model(store, "incomplete") and not has_model(store, "org/adapters/a1")
    assert model_checksum(store, "nope") is None
    assert list_models(store / "empty") == []


def test_delete_removes_model_and_empty_parents(store):
    delete_model(store, "deep/er/model")
    assert not has_model(store, "deep/er/model")
    assert not (store / "transformers" / "deep").exists()
    assert [m["name"] for m in list_models(store)] == ["org/name", "plain"]
    with pytest.raises(NotFoundError, match="deep/er/model") as e:
        delete_model(store, "deep/er/model")
    assert e.value.param == "model"
    with pytest.raises(NotFoundError):
        delete_model(store, "org")  # a directory, but not a model
    assert has_model(store, "org/name")


def test_delete_leaves_foreign_content_inside_the_model_dir(store):
    target = store / "transformers" / "org" / "name"
    (target / "my_adapter").mkdir()
    (target / "my_adapter" / "adapter_config.json").write_text("{}")
    delete_model(store, "org/name")
    assert not has_model(store, "org/name")
    assert sorted(p.name for p in target.iterdir()) == ["my_adapter"]


@pytest.mark.parametrize(
    "bad", ["../x", "a/../../x", "/etc/passwd", "", ".hidden", "org/.tmp-1-2-h", ".."]
)
def test_escaping_and_reserved_names_are_refused(store, tiny_model_src, bad):
    for call in (
        lambda: save_model(bad, store, local_model_path=tiny_model_src),
        lambda: has_model(store, bad),
        lambda: delete_model(store, bad),
        lambda: model_checksum(store, bad),
    ):
        with pytest.raises(InvalidRequestError) as e:
            call()
        assert e.value.param == "model"


def test_unknown_backend_is_refused(store, tiny_model_src):
    with pytest.raises(InvalidRequestError, match="backend") as e:
        save_model("x", store, backend="vllm", local_model_path=tiny_model_src)
    assert e.value.param == "backend"
    with pytest.raises(InvalidRequestError, match="backend"):
        list_models(store, backend="vllm")
    assert not (store / "vllm").exists()


def test_resave_replaces_the_model(store, tmp_path):
    import torch

    from sllm.testing import make_tiny_model_dir

    before = model_checksum(store, "org/name")
    other = make_tiny_model_dir(tmp_path / "other", seed=1)
    save_model("org/name", store, local_model_path=other)
    after = model_checksum(store, "org/name")
    assert after != before
    assert read_manifest(store, "org/name")["source"]["path"] == str(other.resolve())
    assert verify_model(store, "org/name")
    model, tok = load_model(store, "org/name")
    ref, _ = load_model(store, "plain")
    ids = tok("Hello", return_tensors="pt")
    assert not torch.equal(model(**ids).logits, ref(**ids).logits)
    leftovers = [p.name for p in (store / "transformers").iterdir() if p.name.startswith(".")]
    assert leftovers == [".lock"]


def test_conflicting_targets_are_refused(store, tiny_model_src):
    with pytest.raises(ConflictError, match="inside the stored model org/name"):
        save_model("org/name/sub", store, local_model_path=tiny_model_src)
    with pytest.raises(ConflictError, match="already holds other entries"):
        save_model("org", store, local_model_path=tiny_model_src)
    adapter = store / "transformers" / "ad"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ConflictError, match="LoRA adapter"):
        save_model("ad", store, local_model_path=tiny_model_src)
    assert has_model(store, "org/name") and verify_model(store, "org/name")


def test_verify_detects_tampering(store):
    weights = store / "transformers" / "plain" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert not verify_model(store, "plain")
    assert verify_model(store, "org/name")
    with pytest.raises(NotFoundError):
        verify_model(store, "nope")


def test_load_model_of_unknown_model_is_not_found(store):
    with pytest.raises(NotFoundError, match="sllm-store save"):
        load_model(store, "nope")
