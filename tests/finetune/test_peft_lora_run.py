"""`PeftLoraBackend.run`: real LoRA training of tiny models on CPU, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ft_helpers import (
    PIRATE_DATA,
    RecordingReporter,
    hub_cache_entry,
    store_nan_model,
    write_jsonl,
)

from sllm.errors import InvalidRequestError
from sllm.finetune.base import JobSpec, TrainResult, ValidationContext, get_backend

ADAPTER_FILES = {"adapter_model.safetensors", "adapter_config.json", "training_metadata.json"}


@pytest.fixture
def backend():
    return get_backend("peft_lora")


def local_config(data_file: Path, **overrides) -> dict:
    cfg = {
        "dataset_config": {
            "dataset_source": "local",
            "data_files": str(data_file),
            "extension_type": "json",
            "tokenization_field": "prompt",
        },
        "lora_config": {"r": 4, "lora_alpha": 16},
        "training_config": {
            "num_train_epochs": 1,
            "learning_rate": 1e-2,
            "per_device_train_batch_size": 16,
            "seed": 0,
        },
        "max_seq_length": 64,
    }
    cfg.update(overrides)
    return cfg


def run_job(backend, storage, cfg, reporter, *, model="tiny", job_id="job-1", roots=None):
    """Validate as the server would, then run as the worker would."""
    ctx = ValidationContext(storage, data_roots=roots or [storage, PIRATE_DATA.parent], model=model)
    normalised = backend.validate(cfg, ctx)
    spec = JobSpec(job_id, model, storage, normalised, num_cpus=2, num_gpus=0)
    return backend.run(spec, reporter)


def base_and_adapter_logits(storage: Path, model: str, adapter_dir: Path):
    import torch
    from peft import PeftModel

    from sllm.store.loader import load_model

    base, tok = load_model(storage, model, dtype=torch.float32)
    base.eval()
    ids = tok("Question: What is the capital of France? Answer:", return_tensors="pt").input_ids
    with torch.no_grad():
        before = base(ids).logits.clone()
        tuned = PeftModel.from_pretrained(base, adapter_dir)
        tuned.eval()
        after = tuned(ids).logits
    return before, after


def check_progress(reporter: RecordingReporter, steps: int) -> None:
    progress = reporter.progress_calls
    assert progress, "no progress reported"
    step_values = [p["step"] for p in progress]
    assert step_values == sorted(step_values) and step_values[-1] == steps
    assert len(set(step_values)) == steps  # every step reported
    last = progress[-1]
    assert set(last) == {
        "step",
        "total_steps",
        "epoch",
        "loss",
        "learning_rate",
        "trained_tokens",
        "start_trained_tokens",  # what the attempt started from (for the /metrics counter)
        "processed_tokens",
        "tokens_per_second",
        "eta_seconds",
        "train_mean_token_accuracy",  # no validation data: no valid_* fields
    }
    assert 0 <= last["train_mean_token_accuracy"] <= 1
    assert {p["start_trained_tokens"] for p in progress} == {0}  # a fresh start
    assert last["total_steps"] == steps and last["epoch"] == pytest.approx(1.0)
    assert isinstance(last["loss"], float) and last["learning_rate"] > 0
    assert last["eta_seconds"] == 0
    tokens = [p["trained_tokens"] for p in progress]
    assert tokens == sorted(tokens) and tokens[-1] > 0
    assert last["processed_tokens"] > last["trained_tokens"]  # the first tokens carry no loss
    losses = reporter.events("loss")
    assert [e["data"]["step"] for e in losses] == list(range(1, steps + 1))
    assert all(isinstance(e["data"]["loss"], float) for e in losses)


def test_end_to_end_llama_on_the_demo_dataset(backend, ft_storage, reporter, pirate_rows):
    result = run_job(backend, ft_storage, local_config(PIRATE_DATA), reporter)

    assert isinstance(result, TrainResult)
    adapter_dir = ft_storage / "transformers" / "ft_tiny_adapter"
    assert result.adapter_path == adapter_dir
    steps = -(-len(pirate_rows) // 16)
    assert result.metrics["steps"] == steps
    assert set(result.metrics) == {"final_loss", "trained_tokens", "runtime_s", "steps"}
    check_progress(reporter, steps)
    assert reporter.progress_calls[-1]["trained_tokens"] == result.metrics["trained_tokens"]

    files = {p.name for p in adapter_dir.iterdir()}
    assert ADAPTER_FILES <= files
    assert "tokenizer_config.json" in files
    # nothing but the adapter beside it: scratch dirs are gone, trainer output lives in _jobs
    assert sorted(p.name for p in adapter_dir.parent.iterdir() if p.name.startswith(".t")) == []
    assert (ft_storage / "_jobs" / "job-1" / "trainer").is_dir()
    assert not any(p.name.startswith("checkpoint-") for p in adapter_dir.iterdir())
    # only the epoch checkpoints (one epoch here: the final step), out of the loader's way
    assert [p.name for p in (adapter_dir / "checkpoints").iterdir()] == [f"step-{steps}"]

    meta = json.loads((adapter_dir / "training_metadata.json").read_text())
    from sllm.store import model_checksum

    assert meta["job_id"] == "job-1"
    assert meta["base_model"] == {"name": "tiny", "checksum": model_checksum(ft_storage, "tiny")}
    assert meta["base_model"]["checksum"]
    assert meta["dataset"]["source"] == "local"
    assert meta["dataset"]["num_rows"] == len(pirate_rows)
    assert meta["dataset"]["data_files"] == str(PIRATE_DATA)
    assert meta["dataset"]["tokenization_field"] == "prompt"
    assert meta["lora_config"]["r"] == 4 and meta["lora_config"]["task_type"] == "CAUSAL_LM"
    assert meta["training_config"]["learning_rate"] == 1e-2
    assert meta["dataset_config"]["dataset_source"] == "local"
    assert [p["step"] for p in meta["loss_history"]] == list(range(1, steps + 1))
    assert meta["final_loss"] == meta["loss_history"][-1]["loss"] == result.metrics["final_loss"]
    assert meta["trained_tokens"] == result.metrics["trained_tokens"] > 0
    assert meta["runtime_s"] == result.metrics["runtime_s"] > 0
    assert meta["max_seq_length"] == 64
    assert set(meta["versions"]) == {"torch", "transformers", "peft", "datasets", "sllm"}
    adapter_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "tiny"

    before, after = base_and_adapter_logits(ft_storage, "tiny", adapter_dir)
    assert before.shape == after.shape
    assert (before - after).abs().max().item() > 1e-3

    # Running again into the same output_dir replaces the adapter whole.
    again = RecordingReporter()
    cfg = local_config(PIRATE_DATA)
    cfg["training_config"] = {**cfg["training_config"], "max_steps": 2}
    run_job(backend, ft_storage, cfg, again, job_id="job-2")
    meta2 = json.loads((adapter_dir / "training_metadata.json").read_text())
    assert meta2["job_id"] == "job-2" and meta2["steps"] == 2
    replaced = [e for e in again.events("info") if e["message"].startswith("Replaced")]
    assert [e["data"]["replaced"]["job_id"] for e in replaced] == [meta["job_id"]]
    assert meta["job_id"] in replaced[0]["message"]
    leftovers = [
        p.name for p in adapter_dir.parent.iterdir() if p.name.startswith((".tmp", ".old"))
    ]
    assert leftovers == []


def test_opt_model_and_explicit_output_dir(backend, ft_storage, reporter, data_dir):
    rows = [{"prompt": f"Question: what is {i}? Answer: Arr, {i} doubloons!"} for i in range(24)]
    data = write_jsonl(data_dir / "train.jsonl", rows)
    cfg = local_config(data, output_dir="adapters/opt-pirate")
    cfg["training_config"] = {**cfg["training_config"], "per_device_train_batch_size": 8}
    result = run_job(backend, ft_storage, cfg, reporter, model="tiny-opt", roots=[data_dir])

    adapter_dir = ft_storage / "transformers" / "adapters" / "opt-pirate"
    assert result.adapter_path == adapter_dir and result.metrics["steps"] == 3
    check_progress(reporter, 3)
    meta = json.loads((adapter_dir / "training_metadata.json").read_text())
    assert meta["base_model"] == {"name": "tiny-opt", "checksum": None}  # no manifest
    before, after = base_and_adapter_logits(ft_storage, "tiny-opt", adapter_dir)
    assert (before - after).abs().max().item() > 1e-3


def test_hf_hub_dataset_from_the_offline_cache(backend, ft_storage, reporter, offline_hub):
    """`hf_hub` with a Hub id, no network: datasets falls back to its cache of that repo."""
    rows = [{"text": f"Question: {i}? Answer: Arr, matey {i}."} for i in range(12)]
    hub_cache_entry(offline_hub, "sllm-test/pirates", rows)
    cfg = {
        "output_dir": "adapters/from-hub",
        "dataset_config": {
            "dataset_source": "hf_hub",
            "hf_dataset_name": "sllm-test/pirates",
            "tokenization_field": "text",
            "split": "train",
            "data_files": "",
            "extension_type": "",
        },
        "training_config": {"max_steps": 2, "per_device_train_batch_size": 4},
    }
    result = run_job(backend, ft_storage, cfg, reporter, job_id="hub-1")
    assert result.metrics["steps"] == 2
    meta = json.loads((result.adapter_path / "training_metadata.json").read_text())
    assert meta["dataset"]["source"] == "hf_hub"
    assert meta["dataset"]["name"] == "sllm-test/pirates"
    assert meta["dataset"]["num_rows"] == 12


def test_hf_hub_dataset_from_a_local_repository_dir(backend, ft_storage, reporter, data_dir):
    """`hf_hub` pointed at a dataset repository laid out on disk (inside the data roots)."""
    repo = data_dir / "pirate-repo"
    (repo / "data").mkdir(parents=True)
    write_jsonl(repo / "data" / "train.jsonl", [{"prompt": f"Arr {i}, matey"} for i in range(8)])
    cfg = {
        "output_dir": "adapters/from-repo-dir",
        "dataset_config": {
            "dataset_source": "hf_hub",
            "hf_dataset_name": str(repo),
            "tokenization_field": "prompt",
        },
        "training_config": {"max_steps": 1, "per_device_train_batch_size": 8},
    }
    result = run_job(backend, ft_storage, cfg, reporter, job_id="repo-1", roots=[data_dir])
    meta = json.loads((result.adapter_path / "training_metadata.json").read_text())
    assert meta["dataset"]["name"] == str(repo.resolve()) and meta["dataset"]["num_rows"] == 8


def test_missing_tokenization_field_in_the_data(backend, ft_storage, reporter, data_dir):
    data = write_jsonl(data_dir / "train.jsonl", [{"question": "hi", "answer": "arr"}] * 4)
    cfg = local_config(data, output_dir="adapters/never")
    with pytest.raises(InvalidRequestError) as info:
        run_job(backend, ft_storage, cfg, reporter, roots=[data_dir])
    err = info.value
    assert err.param == "backend_config.dataset_config.tokenization_field"
    assert "'prompt'" in err.message and "'question'" in err.message and "'answer'" in err.message
    assert not (ft_storage / "transformers" / "adapters" / "never").exists()


def test_all_empty_texts_is_a_clear_error(backend, ft_storage, reporter, data_dir):
    data = write_jsonl(data_dir / "train.jsonl", [{"prompt": ""}, {"prompt": None}])
    with pytest.raises(InvalidRequestError, match="empty"):
        run_job(backend, ft_storage, local_config(data), reporter, roots=[data_dir])


def test_empty_file_at_run_time_is_a_clear_error(backend, ft_storage, reporter, data_dir):
    """The file was fine at submission and emptied before the job ran."""
    data = write_jsonl(data_dir / "train.jsonl", [{"prompt": "hello there"}])
    ctx = ValidationContext(ft_storage, data_roots=[data_dir], model="tiny")
    normalised = backend.validate(local_config(data), ctx)
    data.write_text("")
    spec = JobSpec("job-empty", "tiny", ft_storage, normalised, num_cpus=1)
    with pytest.raises(InvalidRequestError, match="empty"):
        backend.run(spec, reporter)


def test_non_text_field_is_a_clear_error(backend, ft_storage, reporter, data_dir):
    """Refused at submit; and when the file changes after submission, the run says it too,
    without echoing the value."""
    data = write_jsonl(data_dir / "train.jsonl", [{"prompt": "fine"}, {"prompt": "also"}])
    with pytest.raises(InvalidRequestError, match="holds a number, not text"):
        run_job(
            backend, ft_storage, local_config(write_jsonl(data, [{"prompt": 3}])), reporter,
            roots=[data_dir],
        )  # fmt: skip
    write_jsonl(data, [{"prompt": "fine"}, {"prompt": "also"}])
    ctx = ValidationContext(ft_storage, data_roots=[data_dir], model="tiny")
    normalised = backend.validate(local_config(data), ctx)
    write_jsonl(data, [{"prompt": 31337}, {"prompt": 4}])
    with pytest.raises(
        InvalidRequestError, match="row 1: column .prompt. holds a number, not text"
    ) as info:
        backend.run(JobSpec("job-int", "tiny", ft_storage, normalised, num_cpus=1), reporter)
    assert "31337" not in info.value.message


def test_a_loader_error_at_run_time_quotes_nothing_from_the_file(
    backend, ft_storage, reporter, data_dir
):
    """A file broken after submission fails the run with a message naming no content (parsers
    quote rows and column names of whatever they read)."""
    data = write_jsonl(data_dir / "train.jsonl", [{"prompt": "fine"}])
    ctx = ValidationContext(ft_storage, data_roots=[data_dir], model="tiny")
    normalised = backend.validate(local_config(data), ctx)
    data.write_text('{"prompt": "ok"}\n{"SECRET_COLUMN": "SECRET_VALUE\n')
    with pytest.raises(InvalidRequestError) as info:
        backend.run(JobSpec("job-broken", "tiny", ft_storage, normalised, num_cpus=1), reporter)
    err = info.value
    assert err.param == "backend_config.dataset_config" and "could not be loaded" in err.message
    assert "SECRET" not in err.message and "prompt" not in err.message


def test_user_logging_steps_are_respected(backend, ft_storage, reporter, data_dir):
    data = write_jsonl(data_dir / "train.jsonl", [{"prompt": f"Arr number {i}"} for i in range(8)])
    cfg = local_config(data, output_dir="adapters/logging")
    cfg["training_config"] = {"max_steps": 4, "logging_steps": 2, "per_device_train_batch_size": 2}
    result = run_job(backend, ft_storage, cfg, reporter, roots=[data_dir])
    assert [e["data"]["step"] for e in reporter.events("loss")] == [2, 4]
    assert sorted({p["step"] for p in reporter.progress_calls}) == [1, 2, 3, 4]
    meta = json.loads((result.adapter_path / "training_metadata.json").read_text())
    assert [p["step"] for p in meta["loss_history"]] == [2, 4]
    assert meta["training_overrides"]["report_to"] == "none"
    assert "logging_steps" not in meta["training_overrides"]


def test_trains_on_gpu_when_assigned(backend, ft_storage, reporter, data_dir):
    """Device check: only meaningful on a machine with CUDA (skipped elsewhere)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    data = write_jsonl(data_dir / "train.jsonl", [{"prompt": f"Arr number {i}"} for i in range(8)])
    cfg = local_config(data, output_dir="adapters/gpu")
    cfg["training_config"] = {**cfg["training_config"], "use_cpu": False, "bf16": True}
    ctx = ValidationContext(ft_storage, data_roots=[data_dir], model="tiny")
    spec = JobSpec("gpu-1", "tiny", ft_storage, backend.validate(cfg, ctx), num_cpus=2, num_gpus=1)
    result = backend.run(spec, reporter)
    meta = json.loads((result.adapter_path / "training_metadata.json").read_text())
    assert meta["device"] == "cuda" and "use_cpu" not in meta["training_overrides"]
    before, after = base_and_adapter_logits(ft_storage, "tiny", result.adapter_path)
    assert (before - after).abs().max().item() > 1e-3


class _WorkerReporter(RecordingReporter):
    """The worker's reporting surface (progress throttling aside), recording the outcome."""

    def __init__(self) -> None:
        super().__init__()
        self.outcome: tuple[str, ...] | None = None

    def flush(self) -> None:
        pass

    def result(self, adapter_path: str) -> None:
        self.outcome = ("result", adapter_path)

    def error(self, message: str, kind: str) -> None:
        self.outcome = ("error", message, kind)


@pytest.fixture(scope="module")
def nan_storage(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nan-store")
    store_nan_model(root, "tiny-nan", tmp_path_factory.mktemp("nan-src"))
    return root


def test_divergence_fails_the_job_as_diverged_and_saves_nothing(backend, nan_storage, data_dir):
    """Training into NaN ends with error kind `diverged` (through the worker's own `run_spec`),
    stopped at the first bad step, with no adapter written, instead of `completed` with a NaN
    adapter."""
    from sllm.jobs.worker import run_spec

    data = write_jsonl(data_dir / "train.jsonl", [{"prompt": f"Arr {i}, matey"} for i in range(8)])
    cfg = local_config(data, output_dir="adapters/diverged")
    cfg["training_config"].update({"max_steps": 6, "per_device_train_batch_size": 2})
    ctx = ValidationContext(nan_storage, data_roots=[data_dir], model="tiny-nan")
    spec = JobSpec("job-nan", "tiny-nan", nan_storage, backend.validate(cfg, ctx), num_cpus=1)
    reporter = _WorkerReporter()
    assert run_spec(spec, "peft_lora", reporter) == 1
    kind, message, error_kind = reporter.outcome
    assert (kind, error_kind) == ("error", "diverged"), reporter.outcome
    assert "diverged at step 1" in message and "learning_rate" in message
    assert max(p["step"] for p in reporter.progress_calls) == 1  # stopped there, not at step 6
    assert not (nan_storage / "transformers" / "adapters" / "diverged").exists()


def test_a_data_file_swapped_for_a_link_after_submit_is_not_read(
    backend, ft_storage, reporter, data_dir, tmp_path
):
    """Submit checks the roots; the worker, which does not know them, refuses a path that no
    longer resolves to itself (its header would otherwise be listed as column names)."""
    outside = tmp_path / "elsewhere.csv"
    outside.write_text("SECRET_HEADER\nSECRET_VALUE\n")
    data = write_jsonl(data_dir / "train.jsonl", [{"prompt": "fine"}])
    ctx = ValidationContext(ft_storage, data_roots=[data_dir], model="tiny")
    normalised = backend.validate(local_config(data), ctx)
    data.unlink()
    data.symlink_to(outside)
    with pytest.raises(InvalidRequestError, match="replaced by a link") as info:
        backend.run(JobSpec("job-swap", "tiny", ft_storage, normalised, num_cpus=1), reporter)
    assert "SECRET" not in info.value.message and str(outside) not in info.value.message
