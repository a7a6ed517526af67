"""`backend_config.init_adapter`: a job that continues from the weights of an earlier adapter.

The adapter lives in the store (a path relative to `$STORAGE_PATH/transformers`, like
`output_dir`), was trained on the job's base model (its `adapter_config.json` and, when sllm
wrote it, its `training_metadata.json` say so), and brings its own LoRA config: the job's
`lora_config` may repeat keys of it but not contradict them (a different rank or other target
modules would be a different adapter). The run loads it with
`PeftModel.from_pretrained(..., is_trainable=True)` in place of fresh LoRA weights; the new
adapter is written to `output_dir`, which must be another directory, so the earlier one stays.

Importing this module does not import torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sllm.errors import InvalidRequestError
from sllm.finetune.config import P
from sllm.paths import backend_root, resolve_inside

PARAM = f"{P}.init_adapter"
ADAPTER_CONFIG = "adapter_config.json"
METADATA = "training_metadata.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# adapter_config.json keys that describe the file, not the LoRA layers
_HOUSEKEEPING = frozenset(
    {"base_model_name_or_path", "revision", "peft_type", "inference_mode", "auto_mapping",
     "peft_version"}
)  # fmt: skip


def resolve_init_adapter(storage: Path, relative: str, model: str, output_dir: Path) -> Path:
    """The adapter directory for `init_adapter`, or a 400 saying what is wrong with it."""
    from sllm.store import layout

    root = backend_root(storage)
    target = resolve_inside(root, relative, param=PARAM)
    layout.check_own_names(target.relative_to(root.resolve()).as_posix(), param=PARAM)
    if not (target / ADAPTER_CONFIG).is_file():
        raise InvalidRequestError(
            f"`{PARAM}`: no LoRA adapter at {relative!r} (no {ADAPTER_CONFIG} in {target}).",
            param=PARAM,
        )
    if not any((target / name).is_file() for name in WEIGHT_FILES):
        raise InvalidRequestError(
            f"`{PARAM}`: the adapter at {relative!r} has no weights ({' or '.join(WEIGHT_FILES)}).",
            param=PARAM,
        )
    if target == output_dir:
        raise InvalidRequestError(
            f"`{PARAM}` and `{P}.output_dir` are the same directory ({relative!r}); the new "
            "adapter goes to another `output_dir`, so the earlier one is kept.",
            param=PARAM,
        )
    for base, where in _recorded_bases(target):
        if base != model:
            raise InvalidRequestError(
                f"`{PARAM}`: the adapter at {relative!r} was trained on {base!r} (its {where}), "
                f"not on this job's model {model!r}.",
                param=PARAM,
            )
    return target


def _recorded_bases(adapter: Path) -> list[tuple[str, str]]:
    out = []
    config = read_adapter_config(adapter)
    base = config.get("base_model_name_or_path")
    if isinstance(base, str) and base:
        out.append((base, ADAPTER_CONFIG))
    try:
        meta = json.loads((adapter / METADATA).read_text())
        name = (meta.get("base_model") or {}).get("name")
    except (OSError, ValueError, AttributeError):
        name = None
    if isinstance(name, str) and name:
        out.append((name, METADATA))
    return out


def read_adapter_config(adapter: Path) -> dict[str, Any]:
    try:
        data = json.loads((adapter / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError):
        raise InvalidRequestError(
            f"`{PARAM}`: {adapter / ADAPTER_CONFIG} is not readable JSON.", param=PARAM
        ) from None
    if not isinstance(data, dict) or data.get("peft_type", "LORA") != "LORA":
        raise InvalidRequestError(
            f"`{PARAM}`: {adapter} is not a LoRA adapter (peft_type "
            f"{data.get('peft_type') if isinstance(data, dict) else None!r}).",
            param=PARAM,
        )
    return data


def _same(key: str, given: Any, saved: Any) -> bool:
    if key == "target_modules" and isinstance(given, list) and isinstance(saved, list):
        return sorted(given) == sorted(saved)
    if isinstance(given, (int, float)) and isinstance(saved, (int, float)):
        return float(given) == float(saved)
    return given == saved


def adapter_lora_config(adapter: Path, given: dict[str, Any]) -> dict[str, Any]:
    """The adapter's LoRA config; a key of `given` (the job's `lora_config`) that contradicts it
    is a 400."""
    saved = {k: v for k, v in read_adapter_config(adapter).items() if k not in _HOUSEKEEPING}
    for key, value in given.items():
        if key in saved and not _same(key, value, saved[key]):
            param = f"{P}.lora_config.{key}"
            raise InvalidRequestError(
                f"`{param}`={value!r} contradicts the `init_adapter`'s {key}={saved[key]!r}; "
                "the LoRA config comes from that adapter, so leave the key out (or give its "
                "value).",
                param=param,
            )
    return saved


def adapter_digest(adapter: Path) -> str:
    """What the adapter's weights and config are, for the run's resume fingerprint."""
    digest = hashlib.sha256()
    for name in (ADAPTER_CONFIG, *WEIGHT_FILES):
        path = adapter / name
        if path.is_file():
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def load_trainable(model, adapter: Path):
    """`model` wrapped by PEFT with the adapter's weights, trainable."""
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    except Exception as exc:  # noqa: BLE001 - shapes that do not fit, a corrupt file
        raise InvalidRequestError(
            f"`{PARAM}`: the adapter at {adapter} does not load onto the base model "
            f"({type(exc).__name__}: {str(exc)[:200]}).",
            param=PARAM,
        ) from None
    # As `get_peft_model` records it: the base model's local path, so that saving finds its
    # config on disk (the adapter's file names the model by its store name instead).
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = getattr(model, "name_or_path", None)
    return peft_model
