"""The model store: base models saved under `$STORAGE_PATH/transformers/<name>/` with a manifest.

    save_model(model, storage, backend="transformers", local_model_path=None, progress=None) -> Path
    has_model(storage, model) -> bool
    list_models(storage) -> list[dict]
    delete_model(storage, model, force=False) -> list[ModelUser]   # refuses a model in use
    model_users(storage, model) -> list[ModelUser]
    model_checksum(storage, model) -> str | None
    verify_model(storage, model) -> bool
    load_model(storage, model, device="cpu", dtype=None, *, fast=None, stats=None)
        -> (model, tokenizer)   # fast path on accelerators: store/fastload.py
    read_manifest(storage, model) -> dict | None

Importing this package does not import torch or transformers.
"""

from sllm.store.catalog import delete_model, has_model, list_models, model_checksum, verify_model
from sllm.store.layout import SUPPORTED_BACKENDS
from sllm.store.loader import MANIFEST_NAME, load_model, read_manifest
from sllm.store.save import HubUnreachableError, save_model
from sllm.store.usage import ModelUser, model_users

__all__ = [
    "MANIFEST_NAME",
    "ModelUser",
    "SUPPORTED_BACKENDS",
    "HubUnreachableError",
    "delete_model",
    "has_model",
    "list_models",
    "load_model",
    "model_checksum",
    "model_users",
    "read_manifest",
    "save_model",
    "verify_model",
]
