"""`PeftLoraBackend.validate`: each bad input is a 400 naming its field; good ones get defaults."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ft_helpers import PIRATE_DATA, hub_cache_entry, pirate_dataset, write_jsonl

from sllm.errors import InvalidRequestError
from sllm.finetune.base import ValidationContext, get_backend


@pytest.fixture
def backend():
    return get_backend("peft_lora")


@pytest.fixture
def train_file(data_dir: Path) -> Path:
    return write_jsonl(data_dir / "train.jsonl", [{"prompt": "Question: hi? Answer: Arr!"}] * 4)


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


def with_(cfg: dict, path: str, value) -> dict:
    """A deep copy of `cfg` with `value` at dotted `path` (a `...DELETE` value removes the key)."""
    out = copy.deepcopy(cfg)
    *parents, last = path.split(".")
    node = out
    for part in parents:
        node = node.setdefault(part, {})
    if value is ...:
        node.pop(last, None)
    else:
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


def test_good_config_gets_defaults(backend, good, ctx, train_file):
    out = backend.validate(good, ctx)
    assert out["output_dir"] == "ft_tiny_adapter"
    assert out["lora_config"] == {
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    assert out["training_config"] == {}
    assert out["max_seq_length"] is None
    ds = out["dataset_config"]
    assert ds["data_files"] == str(train_file.resolve())
    assert ds["split"] == "train" and ds["extension_type"] == "json"
    assert ds["tokenization_field"] == "prompt"


def test_seed_example_config_is_accepted(backend, ctx, offline_hub):
    """The seed's example file, as shipped in examples/, validates without the network once its
    Hub dataset is in the datasets cache (and is a 400 naming the dataset before that)."""
    import json

    example = Path(__file__).parents[2] / "examples" / "fine_tuning" / "fine_tuning_config.json"
    cfg = json.loads(example.read_text())["backend_config"]
    name = "backend_config.dataset_config.hf_dataset_name"
    reject(backend, cfg, ctx, name, "fka/awesome-chatgpt-prompts", "offline", "local")
    hub_cache_entry(offline_hub, "fka/awesome-chatgpt-prompts", [{"prompt": "Act as a pirate"}])
    out = backend.validate(cfg, ctx)
    assert out["output_dir"] == cfg["output_dir"]
    assert out["dataset_config"]["hf_dataset_name"] == "fka/awesome-chatgpt-prompts"
    assert out["lora_config"] == cfg["lora_config"]
    assert out["training_config"] == cfg["training_config"]


def test_partial_lora_config_is_merged_with_defaults(backend, good, ctx):
    out = backend.validate(with_(good, "lora_config", {"r": 4, "target_modules": ["q_proj"]}), ctx)
    assert out["lora_config"]["r"] == 4
    assert out["lora_config"]["lora_alpha"] == 16
    assert out["lora_config"]["target_modules"] == ["q_proj"]


def test_relative_and_glob_data_files(backend, good, ctx, data_dir, monkeypatch):
    write_jsonl(data_dir / "more.jsonl", [{"prompt": "x y z"}])
    monkeypatch.chdir(data_dir)
    out = backend.validate(with_(good, "dataset_config.data_files", "train.jsonl"), ctx)
    assert out["dataset_config"]["data_files"] == str((data_dir / "train.jsonl").resolve())
    out = backend.validate(with_(good, "dataset_config.data_files", ["*.jsonl"]), ctx)
    assert sorted(out["dataset_config"]["data_files"]) == sorted(
        str((data_dir / n).resolve()) for n in ("more.jsonl", "train.jsonl")
    )


def test_jsonl_extension_is_normalised(backend, good, ctx):
    out = backend.validate(with_(good, "dataset_config.extension_type", ".JSONL"), ctx)
    assert out["dataset_config"]["extension_type"] == "json"


def test_shipped_demo_dataset_validates(backend, ft_storage):
    ctx = ValidationContext(ft_storage, data_roots=[PIRATE_DATA.parent], model="tiny")
    cfg = {"dataset_config": pirate_dataset()}
    assert backend.validate(cfg, ctx)["dataset_config"]["data_files"] == str(PIRATE_DATA)


# --- shape ---------------------------------------------------------------------------------------


def test_not_an_object(backend, ctx):
    reject(backend, ["nope"], ctx, "backend_config")


def test_unknown_top_level_key(backend, good, ctx):
    reject(backend, with_(good, "bogus", 1), ctx, "backend_config.bogus")


def test_missing_dataset_config(backend, ctx):
    reject(backend, {}, ctx, "backend_config.dataset_config")


def test_missing_tokenization_field(backend, good, ctx):
    cfg = with_(good, "dataset_config.tokenization_field", ...)
    reject(backend, cfg, ctx, "backend_config.dataset_config.tokenization_field")


def test_unknown_dataset_source(backend, good, ctx):
    cfg = with_(good, "dataset_config.dataset_source", "s3")
    reject(backend, cfg, ctx, "backend_config.dataset_config.dataset_source", "hf_hub", "local")


@pytest.mark.parametrize("value", [0, -5, "long"])
def test_bad_max_seq_length(backend, good, ctx, value):
    reject(backend, with_(good, "max_seq_length", value), ctx, "backend_config.max_seq_length")


def test_max_seq_length_above_model_positions(backend, good, ctx):
    err = reject(backend, with_(good, "max_seq_length", 4096), ctx, "backend_config.max_seq_length")
    assert "512" in err.message


# --- dataset -------------------------------------------------------------------------------------


def test_hf_hub_needs_a_name(backend, good, ctx):
    cfg = {"dataset_config": {"dataset_source": "hf_hub", "tokenization_field": "prompt"}}
    reject(backend, cfg, ctx, "backend_config.dataset_config.hf_dataset_name", "required")


def test_hf_hub_bad_name(backend, ctx):
    cfg = {
        "dataset_config": {
            "dataset_source": "hf_hub",
            "hf_dataset_name": "a/b/c",
            "tokenization_field": "prompt",
        }
    }
    reject(backend, cfg, ctx, "backend_config.dataset_config.hf_dataset_name")


def test_hf_hub_local_directory_must_be_inside_roots(backend, ctx, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    write_jsonl(outside / "train.jsonl", [{"prompt": "hi"}])
    cfg = {
        "dataset_config": {
            "dataset_source": "hf_hub",
            "hf_dataset_name": str(outside),
            "tokenization_field": "prompt",
        }
    }
    reject(backend, cfg, ctx, "backend_config.dataset_config.hf_dataset_name", "data roots")


def test_local_needs_data_files(backend, good, ctx):
    cfg = with_(good, "dataset_config.data_files", "")
    reject(backend, cfg, ctx, "backend_config.dataset_config.data_files")


@pytest.mark.parametrize("ext", ["", "xml"])
def test_local_needs_a_known_extension(backend, good, ctx, ext):
    cfg = with_(good, "dataset_config.extension_type", ext)
    reject(backend, cfg, ctx, "backend_config.dataset_config.extension_type", "json")


def test_local_file_missing(backend, good, ctx, data_dir):
    cfg = with_(good, "dataset_config.data_files", str(data_dir / "nope.jsonl"))
    reject(backend, cfg, ctx, "backend_config.dataset_config.data_files", "does not exist")


def test_local_file_empty(backend, good, ctx, data_dir):
    (data_dir / "empty.jsonl").write_text("")
    cfg = with_(good, "dataset_config.data_files", str(data_dir / "empty.jsonl"))
    reject(backend, cfg, ctx, "backend_config.dataset_config.data_files", "empty")


def test_local_file_outside_data_roots(backend, good, ctx, tmp_path, data_dir):
    outside = write_jsonl(tmp_path / "outside.jsonl", [{"prompt": "hi"}])
    cfg = with_(good, "dataset_config.data_files", [str(outside)])
    err = reject(backend, cfg, ctx, "backend_config.dataset_config.data_files", "data roots")
    assert str(data_dir.resolve()) in err.message and "--data-root" in err.message


def test_symlink_out_of_data_roots_is_refused(backend, good, ctx, tmp_path, data_dir):
    outside = write_jsonl(tmp_path / "secret.jsonl", [{"prompt": "hi"}])
    (data_dir / "link.jsonl").symlink_to(outside)
    cfg = with_(good, "dataset_config.data_files", str(data_dir / "link.jsonl"))
    reject(backend, cfg, ctx, "backend_config.dataset_config.data_files", "outside")


def test_dotdot_out_of_data_roots_is_refused(backend, good, ctx, tmp_path, data_dir):
    write_jsonl(tmp_path / "secret.jsonl", [{"prompt": "hi"}])
    cfg = with_(good, "dataset_config.data_files", str(data_dir / ".." / "secret.jsonl"))
    reject(backend, cfg, ctx, "backend_config.dataset_config.data_files", "outside")


def test_no_data_roots_means_no_local_files(backend, good, ft_storage):
    ctx = ValidationContext(ft_storage, data_roots=[], model="tiny")
    reject(backend, good, ctx, "backend_config.dataset_config.data_files", "none are configured")


@pytest.mark.parametrize(
    "key,value",
    [("token", "hf_xxx"), ("cache_dir", "/tmp/x"), ("storage_options", {}), ("streaming", True)],
)
def test_refused_dataset_extras(backend, good, ctx, key, value):
    cfg = with_(good, f"dataset_config.{key}", value)
    reject(backend, cfg, ctx, f"backend_config.dataset_config.{key}", "refused")


def test_harmless_dataset_extras_pass_through(backend, good, ctx):
    out = backend.validate(with_(good, "dataset_config.keep_in_memory", True), ctx)
    assert out["dataset_config"]["keep_in_memory"] is True


# --- output_dir ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["../escape", "/abs/path", "a/../../b", ""])
def test_output_dir_escaping(backend, good, ctx, value):
    reject(backend, with_(good, "output_dir", value), ctx, "backend_config.output_dir")


def test_output_dir_must_not_clobber_a_model(backend, good, ctx):
    reject(backend, with_(good, "output_dir", "tiny-opt"), ctx, "backend_config.output_dir", "not")
    reject(backend, with_(good, "output_dir", "tiny"), ctx, "backend_config.output_dir", "inside")
    reject(backend, with_(good, "output_dir", "tiny/x"), ctx, "backend_config.output_dir", "inside")


def test_output_dir_may_replace_an_adapter(backend, good, ctx, ft_storage):
    target = ft_storage / "transformers" / "adapters" / "old"
    target.mkdir(parents=True)
    (target / "adapter_config.json").write_text("{}")
    assert backend.validate(with_(good, "output_dir", "adapters/old"), ctx)["output_dir"] == (
        "adapters/old"
    )


# --- lora_config ---------------------------------------------------------------------------------


def test_bad_lora_key(backend, good, ctx):
    cfg = with_(good, "lora_config", {"rank": 4})
    reject(backend, cfg, ctx, "backend_config.lora_config.rank", "unknown", "rank")


@pytest.mark.parametrize(
    "key,value", [("r", 0), ("r", "8"), ("lora_dropout", 1.5), ("bias", "some"), ("lora_alpha", -1)]
)
def test_bad_lora_values(backend, good, ctx, key, value):
    reject(
        backend, with_(good, f"lora_config.{key}", value), ctx, f"backend_config.lora_config.{key}"
    )


def test_lora_task_type_must_be_causal_lm(backend, good, ctx):
    cfg = with_(good, "lora_config.task_type", "SEQ_CLS")
    reject(backend, cfg, ctx, "backend_config.lora_config.task_type", "CAUSAL_LM")


def test_lora_invalid_value_from_peft(backend, good, ctx):
    cfg = with_(good, "lora_config.task_type", "NOPE")
    reject(backend, cfg, ctx, "backend_config.lora_config.task_type")
    cfg = with_(good, "lora_config.init_lora_weights", "bogus-init")
    reject(backend, cfg, ctx, "backend_config.lora_config")


def test_lora_target_modules_must_exist_in_model(backend, good, ctx):
    cfg = with_(good, "lora_config.target_modules", ["no_such_proj"])
    reject(backend, cfg, ctx, "backend_config.lora_config.target_modules", "no_such_proj")


def test_lora_fit_is_checked_once_per_model_config_and_lora_config(
    backend, good, data_dir, tmp_path, monkeypatch
):
    """Identical submissions reuse the answer (a meta model + LoRA injection each was most of a
    submission's cost); a changed model config or LoRA config is checked again, and a cached
    misfit is still refused every time."""
    import json

    import peft

    storage = tmp_path / "storage"
    from sllm.store import save_model
    from sllm.testing import make_tiny_model_dir

    save_model("m", storage, local_model_path=make_tiny_model_dir(tmp_path / "src", arch="llama"))
    ctx = ValidationContext(storage_path=storage, data_roots=[data_dir], model="m")
    calls = []
    real = peft.get_peft_model
    monkeypatch.setattr(peft, "get_peft_model", lambda *a, **k: calls.append(1) or real(*a, **k))

    for _ in range(3):
        backend.validate(good, ctx)
    assert len(calls) == 1
    backend.validate(with_(good, "lora_config", {"r": 2}), ctx)
    assert len(calls) == 2
    bad = with_(good, "lora_config.target_modules", ["no_such_proj"])
    for _ in range(2):
        reject(backend, bad, ctx, "backend_config.lora_config.target_modules", "no_such_proj")
    assert len(calls) == 3

    config = storage / "transformers" / "m" / "config.json"
    data = json.loads(config.read_text())
    data["num_hidden_layers"] = 1
    config.write_text(json.dumps(data, indent=1))
    backend.validate(good, ctx)
    assert len(calls) == 4


def test_checkpoint_minutes_defaults_and_is_validated(backend, good, ctx):
    assert backend.validate(good, ctx)["checkpoint_minutes"] == 10.0
    assert backend.validate(with_(good, "checkpoint_minutes", 0), ctx)["checkpoint_minutes"] == 0
    assert backend.validate(with_(good, "compile", True), ctx)["compile"] is True
    reject(backend, with_(good, "compile", "yes"), ctx, "backend_config.compile")
    param = "backend_config.checkpoint_minutes"
    for bad in (-1, "often", "5", True, 10_000):
        reject(backend, with_(good, "checkpoint_minutes", bad), ctx, param)


# --- training_config -----------------------------------------------------------------------------


def test_bad_training_key(backend, good, ctx):
    cfg = with_(good, "training_config", {"no_such_arg": 1})
    reject(backend, cfg, ctx, "backend_config.training_config.no_such_arg", "TrainingArguments")


def test_removed_training_keys_get_a_hint(backend, good, ctx):
    cfg = with_(good, "training_config", {"group_by_length": True})
    reject(
        backend,
        cfg,
        ctx,
        "backend_config.training_config.group_by_length",
        "train_sampling_strategy",
    )
    cfg = with_(good, "training_config", {"torch_dtype": "float16"})
    reject(backend, cfg, ctx, "backend_config.training_config.torch_dtype", "dtype")


def test_bad_training_value(backend, good, ctx):
    cfg = with_(good, "training_config", {"lr_scheduler_type": "wobbly"})
    reject(backend, cfg, ctx, "backend_config.training_config", "wobbly")
    cfg = with_(good, "training_config", {"num_train_epochs": "two"})
    reject(backend, cfg, ctx, "backend_config.training_config.num_train_epochs", "float")
    cfg = with_(good, "training_config", {"logging_steps": 0})
    reject(backend, cfg, ctx, "backend_config.training_config", "logging_steps")


@pytest.mark.parametrize(
    "key,value",
    [
        ("push_to_hub", True),
        ("hub_token", "hf_secret"),
        ("hub_model_id", "me/model"),
        ("hub_strategy", "end"),
        ("hub_private_repo", True),
        ("push_to_hub_model_id", "me/model"),
        ("report_to", "wandb"),
        ("report_to", ["tensorboard"]),
        ("report_to", "all"),
        ("trackio_space_id", "me/space"),
        ("output_dir", "/tmp/elsewhere"),
        ("logging_dir", "/tmp/logs"),
        ("resume_from_checkpoint", "/tmp/ckpt"),
        ("deepspeed", "/etc/ds.json"),
        ("accelerator_config", "/etc/accel.json"),
        ("eval_strategy", "steps"),
        ("load_best_model_at_end", True),
    ],
)
def test_refused_training_keys(backend, good, ctx, key, value):
    cfg = with_(good, "training_config", {key: value})
    reject(backend, cfg, ctx, f"backend_config.training_config.{key}", "refused")


@pytest.mark.parametrize(
    "training_config",
    [
        {"push_to_hub": False},
        {"report_to": "none"},
        {"report_to": []},
        {"report_to": None},
        {"eval_strategy": "no"},
        {"use_cpu": False, "auto_find_batch_size": True},
        {"train_sampling_strategy": "group_by_length"},
        {"accelerator_config": {"split_batches": False}},
    ],
)
def test_allowed_training_keys(backend, good, ctx, training_config):
    out = backend.validate(with_(good, "training_config", training_config), ctx)
    assert out["training_config"] == training_config


def test_refusal_rule_is_documented():
    from sllm.finetune.config import check_training_keys

    doc = check_training_keys.__doc__
    for word in ("output_dir", "push_to_hub", "hub_", "report_to", "resume_from_checkpoint"):
        assert word in doc


def test_validate_is_fast_after_first_import(backend, good, ctx):
    import time

    backend.validate(good, ctx)
    t0 = time.perf_counter()
    for _ in range(5):
        backend.validate(good, ctx)
    assert (time.perf_counter() - t0) / 5 < 0.5


def test_module_import_does_not_import_torch():
    code = (
        "import sys, sllm.finetune.peft_lora, sllm.finetune.data, sllm.finetune.config; "
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_warm_up_runs_in_a_cold_process_and_loads_what_validate_needs():
    """The server calls `warm_up` before it listens, so the first submission does not pay for
    imports and PEFT's one-time tables."""
    code = (
        "import sys; from sllm.finetune.peft_lora import PeftLoraBackend; "
        "PeftLoraBackend().warm_up(); "
        "missing = [m for m in ('peft', 'transformers', 'accelerate') if m not in sys.modules]; "
        "assert not missing, missing"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
