"""Submit-time checks of the validation, early-stopping and `init_adapter` keys: each bad value is
a 400 naming its field, before any job exists."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from ft_helpers import write_jsonl

from sllm.errors import InvalidRequestError
from sllm.finetune.base import ValidationContext, get_backend

P = "backend_config"
VDS = f"{P}.validation_dataset_config"


@pytest.fixture
def backend():
    return get_backend("peft_lora")


@pytest.fixture
def train_file(data_dir: Path) -> Path:
    return write_jsonl(
        data_dir / "train.jsonl", [{"prompt": f"Question {i}? Arr!"} for i in range(10)]
    )


@pytest.fixture
def ctx(ft_storage: Path, data_dir: Path) -> ValidationContext:
    return ValidationContext(storage_path=ft_storage, data_roots=[data_dir], model="tiny")


@pytest.fixture
def good(train_file: Path) -> dict:
    return {
        "dataset_config": {
            "dataset_source": "local",
            "data_files": str(train_file),
            "extension_type": "json",
            "tokenization_field": "prompt",
        }
    }


def with_(cfg: dict, **changes) -> dict:
    out = copy.deepcopy(cfg)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def reject(backend, cfg, ctx, param: str, *fragments: str) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        backend.validate(cfg, ctx)
    err = info.value
    assert err.param == param, (err.param, err.message)
    assert err.status_code == 400
    for fragment in fragments:
        assert fragment in err.message, (fragment, err.message)
    return err


def test_validation_keys_are_accepted_and_kept(backend, good, ctx, train_file):
    out = backend.validate(with_(good, dataset_config__validation_split=0.2), ctx)
    assert out["dataset_config"]["validation_split"] == 0.2
    cfg = with_(
        good,
        validation_dataset_config=dict(good["dataset_config"]),
        early_stopping_patience=2,
        early_stopping_threshold=0.01,
        training_config={"eval_strategy": "steps", "eval_steps": 5, "eval_on_start": True},
    )
    out = backend.validate(cfg, ctx)
    assert out["validation_dataset_config"]["data_files"] == str(train_file)
    assert out["early_stopping_patience"] == 2 and out["early_stopping_threshold"] == 0.01
    assert "init_adapter" not in out  # absent keys stay absent
    assert "validation_dataset_config" not in backend.validate(good, ctx)


@pytest.mark.parametrize(
    "split,fragment",
    [(10, "leaves 0 to train on"), (0.95, "leaves 0 to train on"), (11, "leaves 0")],
)
def test_a_split_that_leaves_nothing_to_train_on(backend, good, ctx, split, fragment):
    cfg = with_(good, dataset_config__validation_split=split)
    reject(backend, cfg, ctx, f"{P}.dataset_config.validation_split", fragment)


@pytest.mark.parametrize("split", [0, -1, 1.0, 1.5, "0.1", True, None])
def test_a_split_that_is_neither_a_fraction_nor_a_count(backend, good, ctx, split):
    if split is None:  # null is "no split": accepted
        backend.validate(with_(good, dataset_config__validation_split=None), ctx)
        return
    with pytest.raises(InvalidRequestError) as info:
        backend.validate(with_(good, dataset_config__validation_split=split), ctx)
    assert info.value.param.startswith(f"{P}.dataset_config.validation_split")


def test_early_stopping_needs_validation_data(backend, good, ctx):
    reject(
        backend,
        with_(good, early_stopping_patience=3),
        ctx,
        f"{P}.early_stopping_patience",
        "validation data",
    )
    reject(
        backend,
        with_(good, dataset_config__validation_split=2, early_stopping_threshold=0.1),
        ctx,
        f"{P}.early_stopping_threshold",
    )
    cfg = with_(
        good,
        dataset_config__validation_split=2,
        early_stopping_patience=1,
        training_config={"eval_strategy": "no"},
    )
    reject(backend, cfg, ctx, f"{P}.early_stopping_patience", '"no"')
    for bad in (0, 1.5, "2"):
        cfg = with_(good, dataset_config__validation_split=2, early_stopping_patience=bad)
        reject(backend, cfg, ctx, f"{P}.early_stopping_patience")


def test_evaluation_keys_need_validation_data(backend, good, ctx):
    for key, value in (("eval_strategy", "steps"), ("eval_on_start", True)):
        cfg = with_(good, training_config={key: value})
        reject(backend, cfg, ctx, f"{P}.training_config.{key}", "no validation data")
    cfg = with_(
        good, dataset_config__validation_split=2, training_config={"load_best_model_at_end": True}
    )
    reject(backend, cfg, ctx, f"{P}.training_config.load_best_model_at_end", "saved anyway")


def test_bad_validation_data_names_validation_dataset_config(backend, good, ctx, data_dir):
    both = with_(
        good,
        dataset_config__validation_split=0.1,
        validation_dataset_config=dict(good["dataset_config"]),
    )
    reject(backend, both, ctx, f"{P}.dataset_config.validation_split", "exclude each other")
    nested = with_(
        good, validation_dataset_config={**good["dataset_config"], "validation_split": 2}
    )
    reject(backend, nested, ctx, f"{VDS}.validation_split")
    missing = with_(
        good, validation_dataset_config={**good["dataset_config"], "data_files": "nope.jsonl"}
    )
    err = reject(backend, missing, ctx, f"{VDS}.data_files")
    assert "dataset_config" not in err.message.replace("validation_dataset_config", "")
    outside = with_(
        good, validation_dataset_config={**good["dataset_config"], "data_files": "/etc/hostname"}
    )
    reject(backend, outside, ctx, f"{VDS}.data_files")
    other = write_jsonl(data_dir / "valid.jsonl", [{"text": "x"}])
    column = with_(
        good, validation_dataset_config={**good["dataset_config"], "data_files": str(other)}
    )
    reject(backend, column, ctx, f"{VDS}.tokenization_field", "'prompt'")
    shape = with_(good, validation_dataset_config={"dataset_source": "local"})
    with pytest.raises(InvalidRequestError) as info:
        backend.validate(shape, ctx)
    assert info.value.param.startswith(VDS)


# ------------------------------------------------------------------------------ init_adapter


def fake_adapter(storage: Path, name: str, base: str = "tiny", *, weights=True, **config) -> str:
    d = storage / "transformers" / name
    d.mkdir(parents=True, exist_ok=True)
    body = {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "base_model_name_or_path": base}
    (d / "adapter_config.json").write_text(json.dumps({**body, **config}))
    if weights:
        (d / "adapter_model.safetensors").write_bytes(b"\0" * 8)
    return name


def test_init_adapter_accepted_with_its_lora_config(backend, good, ctx, ft_storage):
    name = fake_adapter(ft_storage, "init_ok", target_modules=["q_proj", "v_proj"])
    cfg = with_(
        good, init_adapter=name, lora_config={"r": 4, "target_modules": ["v_proj", "q_proj"]}
    )
    out = backend.validate(cfg, ctx)
    assert out["init_adapter"] == name
    assert out["lora_config"] == {"r": 4, "target_modules": ["v_proj", "q_proj"]}  # as given


def test_init_adapter_refusals(backend, good, ctx, ft_storage):
    param = f"{P}.init_adapter"
    reject(backend, with_(good, init_adapter="no_such_adapter"), ctx, param, "no LoRA adapter")
    (ft_storage / "transformers" / "not_an_adapter").mkdir(exist_ok=True)
    reject(backend, with_(good, init_adapter="not_an_adapter"), ctx, param, "no LoRA adapter")
    reject(backend, with_(good, init_adapter="/abs/path"), ctx, param, "relative")
    reject(backend, with_(good, init_adapter="../../etc"), ctx, param, "escapes")
    reject(backend, with_(good, init_adapter=""), ctx, param)
    name = fake_adapter(ft_storage, "init_no_weights", weights=False)
    reject(backend, with_(good, init_adapter=name), ctx, param, "no weights")
    name = fake_adapter(ft_storage, "init_other_base", base="someone/else")
    reject(backend, with_(good, init_adapter=name), ctx, param, "'someone/else'", "'tiny'")
    name = fake_adapter(ft_storage, "init_meta_other")
    meta = {"base_model": {"name": "tiny-opt"}}
    (ft_storage / "transformers" / name / "training_metadata.json").write_text(json.dumps(meta))
    reject(backend, with_(good, init_adapter=name), ctx, param, "'tiny-opt'")
    name = fake_adapter(ft_storage, "init_same_out")
    reject(backend, with_(good, init_adapter=name, output_dir=name), ctx, param, "same directory")
    name = fake_adapter(ft_storage, "init_prefix", peft_type="PREFIX_TUNING")
    reject(backend, with_(good, init_adapter=name), ctx, param, "not a LoRA adapter")
    name = fake_adapter(ft_storage, "init_conflict")
    cfg = with_(good, init_adapter=name, lora_config={"r": 8})
    reject(backend, cfg, ctx, f"{P}.lora_config.r", "contradicts", "r=4")
