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


@pytest.mark.parametrize("name", ["a/b/c", "json/..", "owner/.."])
def test_hf_hub_bad_name(backend, ctx, name):
    cfg = {
        "dataset_config": {
            "dataset_source": "hf_hub",
            "hf_dataset_name": name,
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
    reject(backend, cfg, ctx, "backend_config.training_config.logging_steps", "logging_steps")


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


# --- numbers a run would reject (issue 9, section 2) ---------------------------------------------

TC = "backend_config.training_config"

BAD_TRAINING_VALUES = [
    ("per_device_train_batch_size", 0),
    ("per_device_train_batch_size", -4),
    ("per_device_train_batch_size", 2**40),
    ("gradient_accumulation_steps", 0),
    ("eval_accumulation_steps", 0),
    ("save_total_limit", 0),
    ("logging_steps", 0),
    ("logging_steps", -1),
    ("logging_steps", 2.5),
    ("save_steps", 0),
    ("learning_rate", 0),
    ("learning_rate", -1e-4),
    ("learning_rate", float("nan")),
    ("learning_rate", float("inf")),
    ("num_train_epochs", 0),
    ("num_train_epochs", -1),
    ("num_train_epochs", 1e300),
    ("num_train_epochs", float("inf")),
    ("max_steps", 0),
    ("max_steps", -2),
    ("max_steps", 10**12),
    ("seed", -1),
    ("seed", 2**32),
    ("data_seed", 2**40),
    ("dataloader_num_workers", -1),
    ("dataloader_num_workers", 3),  # the job has 2 CPUs
    ("adam_beta1", 1.0),
    ("adam_epsilon", 0),
    ("weight_decay", -0.1),
    ("max_grad_norm", -1),
    ("warmup_steps", -5),
]


@pytest.fixture
def ctx2(ctx) -> ValidationContext:
    """`ctx` for a job with 2 CPUs."""
    return ValidationContext(ctx.storage_path, ctx.data_roots, model=ctx.model, num_cpus=2)


@pytest.mark.parametrize(
    "key,value", BAD_TRAINING_VALUES, ids=[f"{k}={v}" for k, v in BAD_TRAINING_VALUES]
)
def test_training_values_a_run_cannot_use(backend, good, ctx2, key, value):
    cfg = with_(good, "training_config", {key: value})
    err = reject(backend, cfg, ctx2, f"{TC}.{key}", key)
    assert "must be" in err.message


@pytest.mark.parametrize(
    "training_config",
    [
        {"logging_steps": 0.1, "save_steps": 0.5},
        {"max_steps": -1, "num_train_epochs": 0.5},
        {"max_steps": 10_000_000, "num_train_epochs": 10_000},
        {"dataloader_num_workers": 2, "seed": 2**32 - 1, "data_seed": 0},
        {"learning_rate": 5.0, "weight_decay": 0, "adam_beta1": 0, "max_grad_norm": 0},
        {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 64},
    ],
)
def test_training_values_at_the_bounds_are_accepted(backend, good, ctx2, training_config):
    assert backend.validate(with_(good, "training_config", training_config), ctx2)


def test_dataloader_workers_unbounded_without_a_job_cpu_count(backend, good, ctx):
    assert ctx.num_cpus is None  # a caller that does not know the job's CPUs
    backend.validate(with_(good, "training_config", {"dataloader_num_workers": 3}), ctx)


@pytest.mark.parametrize(
    "path,value",
    [
        ("lora_config.lora_alpha", float("nan")),
        ("lora_config.rank_pattern", {"q_proj": float("inf")}),
        ("lora_config.layers_to_transform", [0, float("nan")]),
        ("checkpoint_minutes", float("inf")),
        ("training_config.weight_decay", float("-inf")),
        ("training_config.optim_args_list", [{"x": float("nan")}]),
        ("dataset_config.block_size", float("nan")),
    ],
)
def test_no_non_finite_float_anywhere(backend, good, ctx, path, value):
    """NaN/Infinity anywhere in backend_config: a 400 naming the place (JSON cannot store it)."""
    err = reject(backend, with_(good, path, value), ctx, f"backend_config.{path}" + _index(value))
    assert "finite" in err.message


def _index(value) -> str:
    if isinstance(value, dict):
        return "." + next(iter(value))
    if isinstance(value, list):
        return ".1" if len(value) > 1 else ".0.x"
    return ""


# --- LoRA rank against the model, without allocating --------------------------------------------


def test_lora_rank_is_bounded_by_the_models_hidden_size(backend, good, ctx):
    """`tiny` has hidden size 64: r=64 fits; r=65 and a huge r are a 400 at once."""
    assert backend.validate(with_(good, "lora_config", {"r": 64}), ctx)["lora_config"]["r"] == 64
    reject(backend, with_(good, "lora_config", {"r": 65}), ctx, "backend_config.lora_config.r",
           "hidden size (64)")  # fmt: skip
    cfg = with_(good, "lora_config", {"r": 4, "rank_pattern": {"q_proj": 512}})
    reject(backend, cfg, ctx, "backend_config.lora_config.rank_pattern.q_proj", "hidden size")
    for r in (1_000_001, 10**9, 10**30):
        reject(backend, with_(good, "lora_config", {"r": r}), ctx, "backend_config.lora_config.r")


def test_lora_fit_check_allocates_nothing(backend, good, data_dir, tmp_path):
    """A wide model (hidden 8192) with r=4096 on four layers: 2 GiB of LoRA weights if they
    were built on the CPU; validation injects them on the meta device and stays small."""
    import json
    import resource

    storage = tmp_path / "wide-store"
    model = storage / "transformers" / "wide"
    model.mkdir(parents=True)
    (model / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 8192,
                "intermediate_size": 16384,
                "num_hidden_layers": 4,
                "num_attention_heads": 64,
                "num_key_value_heads": 8,
                "vocab_size": 32000,
                "max_position_embeddings": 4096,
            }  # fmt: skip
        )
    )
    ctx = ValidationContext(storage, data_roots=[data_dir], model="wide")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = backend.validate(with_(good, "lora_config", {"r": 4096}), ctx)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert out["lora_config"]["r"] == 4096
    assert grown_mib < 500, f"validation grew the process by {grown_mib:.0f} MiB"
    reject(backend, with_(good, "lora_config", {"r": 8193}), ctx, "backend_config.lora_config.r")


# --- dataset keywords ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extras,param,fragment",
    [
        ({"colour": "blue"}, "colour", "not a keyword"),
        ({"sep": ";"}, "sep", "'json' builder"),  # a csv keyword on a json file
        ({"num_proc": 3}, "num_proc", "num_cpus (2)"),
        ({"num_proc": 0}, "num_proc", "num_cpus"),
        ({"features": {"prompt": "string"}}, "features", "refused"),
        ({"save_infos": True}, "save_infos", "refused"),
        ({"download_mode": "always"}, "download_mode", "force_redownload"),
        ({"encoding": 8}, "encoding", "must be str"),
        ({"encoding": "no-such-codec"}, "encoding", "unknown"),
        ({"chunksize": "big"}, "chunksize", "must be int"),
        ({"chunksize": 0}, "chunksize", "at least 1"),
        ({"use_threads": "yes"}, "use_threads", "must be bool"),
    ],
)
def test_dataset_keywords_the_loader_does_not_accept(backend, good, ctx2, extras, param, fragment):
    cfg = with_(good, "dataset_config", {**good["dataset_config"], **extras})
    reject(backend, cfg, ctx2, f"backend_config.dataset_config.{param}", fragment)


def test_dataset_keywords_the_loader_accepts(backend, good, ctx2, data_dir):
    extras = {"num_proc": 2, "keep_in_memory": True, "encoding": "utf-8", "block_size": 1 << 20}
    out = backend.validate(
        with_(good, "dataset_config", {**good["dataset_config"], **extras}), ctx2
    )
    assert out["dataset_config"]["num_proc"] == 2
    (data_dir / "t.csv").write_text("prompt;label\nhello there;1\n")
    csv_cfg = {"dataset_source": "local", "data_files": str(data_dir / "t.csv"),
               "extension_type": "csv", "tokenization_field": "prompt", "sep": ";"}  # fmt: skip
    assert backend.validate({"dataset_config": csv_cfg}, ctx2)["dataset_config"]["sep"] == ";"


# --- the data itself, at submit -----------------------------------------------------------------

DS_ = "backend_config.dataset_config"


def local_cfg(path: Path, extension: str = "json", field: str = "prompt", **extras) -> dict:
    return {
        "dataset_config": {
            "dataset_source": "local",
            "data_files": str(path),
            "extension_type": extension,
            "tokenization_field": field,
            **extras,
        }
    }


def test_bad_jsonl_line_is_named_by_number_without_its_content(backend, ctx, data_dir):
    path = data_dir / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "SECRET unterminated\n')
    err = reject(backend, local_cfg(path), ctx, f"{DS_}.data_files", "line 4", "not valid JSON")
    assert "SECRET" not in err.message
    path.write_text('{"prompt": "a"}\n["SECRET", "list"]\n')
    err = reject(backend, local_cfg(path), ctx, f"{DS_}.data_files", "line 2", "not a JSON object")
    assert "SECRET" not in err.message


def test_data_without_rows_is_refused(backend, ctx, data_dir):
    path = data_dir / "blank.jsonl"
    path.write_text("\n   \n\n")
    reject(backend, local_cfg(path), ctx, f"{DS_}.data_files", "no rows")
    path.write_text("[]")
    reject(backend, local_cfg(path), ctx, f"{DS_}.data_files", "no rows")


def test_missing_column_lists_the_columns(backend, ctx, data_dir):
    path = write_jsonl(data_dir / "qa.jsonl", [{"question": "SECRET q", "answer": "SECRET a"}])
    err = reject(backend, local_cfg(path), ctx, f"{DS_}.tokenization_field", "'answer', 'question'")
    assert "SECRET" not in err.message


@pytest.mark.parametrize("value", [7, 2.5, True, ["SECRET"], {"SECRET": 1}])
def test_non_text_column_is_refused_without_its_value(backend, ctx, data_dir, value):
    path = write_jsonl(data_dir / "mixed.jsonl", [{"prompt": "fine"}, {"prompt": value}])
    err = reject(backend, local_cfg(path), ctx, f"{DS_}.tokenization_field", "line 2", "not text")
    assert "SECRET" not in err.message and "2.5" not in err.message


def test_json_documents_are_checked_too(backend, ctx, data_dir):
    import json

    path = data_dir / "doc.json"
    path.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}], indent=2))
    assert backend.validate(local_cfg(path), ctx)
    path.write_text(json.dumps({"prompt": ["a", "b"], "n": [1, 2]}, indent=2))
    assert backend.validate(local_cfg(path), ctx)
    path.write_text(json.dumps({"rows": [{"prompt": "a"}]}, indent=2))
    assert backend.validate(with_(local_cfg(path), "dataset_config.field", "rows"), ctx)
    path.write_text(json.dumps([{"prompt": 1}], indent=2))
    reject(backend, local_cfg(path), ctx, f"{DS_}.tokenization_field", "item 0", "not text")
    path.write_text('[{"prompt": "a"},\n {"prompt": ')
    reject(backend, local_cfg(path), ctx, f"{DS_}.data_files", "not valid JSON")


def test_bad_encoding_is_named_by_line(backend, ctx, data_dir):
    path = data_dir / "latin.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    reject(backend, local_cfg(path), ctx, f"{DS_}.data_files", "line 2", "utf-8")


def test_csv_checks(backend, ctx, data_dir):
    path = data_dir / "t.csv"
    path.write_text("prompt,label\nhello there,1\n")
    assert backend.validate(local_cfg(path, "csv"), ctx)
    path.write_text("question,answer\nSECRET,x\n")
    err = reject(backend, local_cfg(path, "csv"), ctx, f"{DS_}.tokenization_field", "'answer'")
    assert "SECRET" not in err.message
    path.write_text("prompt,label\nhello,1\nSECRET,2,extra\n")
    err = reject(backend, local_cfg(path, "csv"), ctx, f"{DS_}.data_files", "line 3", "3 fields")
    assert "SECRET" not in err.message
    path.write_text("prompt,label\n1,a\n2.5,b\n")
    reject(backend, local_cfg(path, "csv"), ctx, f"{DS_}.tokenization_field", "only numbers")
    path.write_text("prompt,label\n")
    reject(backend, local_cfg(path, "csv"), ctx, f"{DS_}.data_files", "no rows")


def test_parquet_checks_read_only_the_footer(backend, ctx, data_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = data_dir / "t.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "n": [1, 2]}), path)
    assert backend.validate(local_cfg(path, "parquet"), ctx)
    reject(backend, local_cfg(path, "parquet", field="n"), ctx, f"{DS_}.tokenization_field",
           "int64", "not text")  # fmt: skip
    reject(backend, local_cfg(path, "parquet", field="x"), ctx, f"{DS_}.tokenization_field",
           "'n', 'prompt'")  # fmt: skip
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    reject(backend, local_cfg(path, "parquet"), ctx, f"{DS_}.data_files", "no rows")
    path.write_bytes(b"SECRET, not parquet at all")
    err = reject(backend, local_cfg(path, "parquet"), ctx, f"{DS_}.data_files", "not a readable")
    assert "SECRET" not in err.message


def test_text_checks(backend, ctx, data_dir):
    path = data_dir / "t.txt"
    path.write_text("one line\nanother\n")
    assert backend.validate(local_cfg(path, "text", field="text"), ctx)
    reject(backend, local_cfg(path, "text"), ctx, f"{DS_}.tokenization_field", "'text'")
    path.write_text("\n\n  \n")
    reject(backend, local_cfg(path, "text", field="text"), ctx, f"{DS_}.data_files", "no rows")


def test_big_files_are_scanned_only_up_to_the_budget(backend, ctx, data_dir, monkeypatch):
    """A bad line past the scan budget is left to the run; the submission stays cheap."""
    from sllm.finetune import datascan as data

    path = data_dir / "big.jsonl"
    path.write_text('{"prompt": "a"}\n' * 100 + "not json\n")
    monkeypatch.setattr(data, "SCAN_BUDGET_BYTES", 16 * 50)
    assert backend.validate(local_cfg(path), ctx)
    monkeypatch.setattr(data, "SCAN_BUDGET_BYTES", 1 << 20)
    reject(backend, local_cfg(path), ctx, f"{DS_}.data_files", "line 101")


# --- hf_hub: cached or reachable, and never a way around the data roots -------------------------


def test_uncached_hub_dataset_offline_is_a_400_at_once(backend, ctx, offline_hub):
    import time

    cfg = {"dataset_config": {"dataset_source": "hf_hub", "hf_dataset_name": "nobody/nothing",
                              "tokenization_field": "text"}}  # fmt: skip
    started = time.monotonic()
    reject(backend, cfg, ctx, f"{DS_}.hf_dataset_name", "'nobody/nothing'", "offline", "cache")
    assert time.monotonic() - started < 5
    hub_cache_entry(offline_hub, "nobody/nothing", [{"text": "now it is cached"}])
    assert backend.validate(cfg, ctx)["dataset_config"]["hf_dataset_name"] == "nobody/nothing"


@pytest.mark.parametrize(
    "builder", ["json", "csv", "text", "parquet", "arrow", "pandas", "imagefolder", "JSON"]
)
def test_packaged_builder_names_under_hf_hub_are_refused(backend, ctx, builder):
    """`hf_hub` + a builder name + `data_files` read any file the server could read."""
    cfg = {"dataset_config": {"dataset_source": "hf_hub", "hf_dataset_name": builder,
                              "data_files": "/etc/passwd", "tokenization_field": "x"}}  # fmt: skip
    err = reject(backend, cfg, ctx, f"{DS_}.hf_dataset_name", "file format", "'local'")
    assert "root:" not in err.message


def test_dataset_dir_may_not_link_out_of_the_roots(backend, ctx, data_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    write_jsonl(outside / "secret.jsonl", [{"prompt": "SECRET"}])
    repo = data_dir / "repo"
    repo.mkdir()
    write_jsonl(repo / "train.jsonl", [{"prompt": "fine"}])
    cfg = {"dataset_config": {"dataset_source": "hf_hub", "hf_dataset_name": str(repo),
                              "tokenization_field": "prompt"}}  # fmt: skip
    assert backend.validate(cfg, ctx)
    (repo / "more.jsonl").symlink_to(outside / "secret.jsonl")
    err = reject(
        backend, cfg, ctx, f"{DS_}.hf_dataset_name", "more.jsonl", "outside the data roots"
    )
    assert str(outside) not in err.message


def test_resolved_target_outside_the_roots_is_not_revealed(backend, ctx, data_dir, tmp_path):
    hidden_place = tmp_path / "private-place"
    hidden_place.mkdir()
    write_jsonl(hidden_place / "x.jsonl", [{"prompt": "x"}])
    (data_dir / "link.jsonl").symlink_to(hidden_place / "x.jsonl")
    err = reject(backend, local_cfg(data_dir / "link.jsonl"), ctx, f"{DS_}.data_files", "outside")
    assert "private-place" not in err.message


# --- the store's own files are never training data ----------------------------------------------


@pytest.fixture
def store_ctx(tmp_path, ft_storage) -> tuple[Path, ValidationContext]:
    """A storage path that is also the only data root (the server's default), holding a job
    database, job scratch and a dot-file, each a parseable JSON Lines file."""
    store = tmp_path / "store"
    for rel in ("sllm.db", "sllm.db-wal", "_jobs/abc/worker.log", ".hidden.jsonl",
                ".tmp-1-x/rows.jsonl", "data/train.jsonl"):  # fmt: skip
        path = store / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, [{"prompt": "row"}])
    ctx = ValidationContext(store, data_roots=[store], model="tiny")
    # the model lives in ft_storage; validation reads it from the ctx's storage path
    (store / "transformers").symlink_to(ft_storage / "transformers")
    return store, ctx


@pytest.mark.parametrize(
    "rel",
    ["sllm.db", "sllm.db-wal", "_jobs/abc/worker.log", ".hidden.jsonl", ".tmp-1-x/rows.jsonl"],
)
def test_store_files_are_never_training_data(backend, store_ctx, rel):
    store, ctx = store_ctx
    err = reject(backend, local_cfg(store / rel), ctx, f"{DS_}.data_files", "store's own files")
    assert "row" not in err.message.replace("rows", "")


def test_a_pattern_over_the_store_skips_its_own_files(backend, store_ctx):
    store, ctx = store_ctx
    out = backend.validate(local_cfg(store / "**" / "*.jsonl"), ctx)
    assert out["dataset_config"]["data_files"] == str((store / "data" / "train.jsonl").resolve())
    reject(backend, local_cfg(store / "_jobs" / "*" / "*"), ctx, f"{DS_}.data_files", "matches no")


def test_a_dataset_dir_holding_the_store_is_refused(backend, store_ctx):
    """`datasets` would read every data file below it, job scratch included."""
    store, ctx = store_ctx
    for where in (store, store.parent):
        cfg = {"dataset_config": {"dataset_source": "hf_hub", "hf_dataset_name": str(where),
                                  "tokenization_field": "prompt"}}  # fmt: skip
        ctx_wide = ValidationContext(store, data_roots=[store.parent], model="tiny")
        reject(backend, cfg, ctx_wide, f"{DS_}.hf_dataset_name", "whole store")
    cfg["dataset_config"]["hf_dataset_name"] = str(store / "data")
    assert backend.validate(cfg, ctx)


@pytest.mark.parametrize("key", ["max_seq_length", "tokens_per_batch"])
def test_token_counts_fit_an_int32(backend, good, ctx, key):
    cfg = with_(good, key, 2**31)
    if key == "tokens_per_batch":
        cfg["batching"] = "token_budget"
    reject(backend, cfg, ctx, f"backend_config.{key}", "less than or equal")


def test_a_data_root_inside_a_dot_directory_is_fine(backend, good, tmp_path):
    """Hidden means hidden below the closest data root, e.g. a store kept in `~/.sllm`."""
    root = tmp_path / ".sllm" / "data"
    root.mkdir(parents=True)
    path = write_jsonl(root / "train.jsonl", [{"prompt": "hi"}])
    ctx = ValidationContext(tmp_path / ".sllm", data_roots=[tmp_path, root], model="tiny")
    assert backend.validate(local_cfg(path), ctx)
    ctx = ValidationContext(tmp_path / ".sllm", data_roots=[tmp_path], model="tiny")
    reject(backend, local_cfg(path), ctx, f"{DS_}.data_files", "hidden")


@pytest.fixture
def fake_hub(monkeypatch):
    """Online mode against a Hub on loopback that knows one dataset, `sllm-test/known`."""
    import http.server
    import json
    import threading

    import datasets.config
    import huggingface_hub.constants

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            known = self.path.startswith("/api/datasets/sllm-test/known")
            body = {"id": "sllm-test/known", "sha": "0" * 40} if known else {"error": "nope"}
            self.send_response(200 if known else 404)
            if not known:
                self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(
        huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}"
    )
    yield server
    server.shutdown()


def _hub_cfg(name: str) -> dict:
    return {"dataset_config": {"dataset_source": "hf_hub", "hf_dataset_name": name,
                               "tokenization_field": "text"}}  # fmt: skip


def test_online_hub_dataset_is_checked_on_the_hub(backend, ctx, fake_hub):
    assert backend.validate(_hub_cfg("sllm-test/known"), ctx)
    reject(backend, _hub_cfg("sllm-test/unknown"), ctx, f"{DS_}.hf_dataset_name", "no dataset")


def test_unreachable_hub_is_a_400_at_once(backend, ctx, fake_hub, monkeypatch):
    import socket
    import time

    import huggingface_hub.constants

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    reject(
        backend, _hub_cfg("sllm-test/known"), ctx, f"{DS_}.hf_dataset_name", "could not be reached"
    )
    assert time.monotonic() - started < 15


def test_builder_keyword_values_follow_the_builders_types(backend, ctx, data_dir):
    path = data_dir / "t.txt"
    path.write_text("one line\n")
    cfg = local_cfg(path, "text", field="text", sample_by="sentence")
    reject(backend, cfg, ctx, f"{DS_}.sample_by", "line, paragraph, document")
    assert backend.validate(local_cfg(path, "text", field="text", sample_by="paragraph"), ctx)


def test_scheduler_kwargs_must_belong_to_the_scheduler(backend, good, ctx):
    tc = {"lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {"power": 2.0}}
    reject(backend, with_(good, "training_config", tc), ctx,
           f"{TC}.lr_scheduler_kwargs.power", "'cosine'", "num_cycles")  # fmt: skip
    tc["lr_scheduler_kwargs"] = {"num_cycles": 0.5}
    assert backend.validate(with_(good, "training_config", tc), ctx)
