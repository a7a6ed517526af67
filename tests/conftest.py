"""Shared fixtures: tiny stored models, datasets and a real `sllm start` server on loopback."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from sllm.testing import LocalServer, free_port  # noqa: F401 (re-exported for tests)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = "tiny/llama"


@pytest.fixture(scope="session")
def tiny_model_src(tmp_path_factory) -> Path:
    from sllm.testing import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("src") / "tiny-llama")


def write_dataset(path: Path, rows: int = 24, field: str = "prompt") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(rows):
            text = f"Question {i}: how are you? Answer: Arr, I be fine, matey number {i}."
            f.write(json.dumps({field: text}) + "\n")
    return path


def stored_server(root: Path, tiny_model_src: Path, *args: str, **kw) -> LocalServer:
    """A started server on a new store at `root` holding `tiny/llama` and data/train.jsonl."""
    from sllm.store import save_model

    save_model(TINY, root, local_model_path=tiny_model_src)
    write_dataset(root / "data" / "train.jsonl")
    return LocalServer(root, *args, **kw).start()


@pytest.fixture
def storage(tmp_path, tiny_model_src) -> Path:
    """A store holding the tiny model as `tiny/llama`, plus a dataset under data/."""
    from sllm.store import save_model

    root = tmp_path / "store"
    save_model(TINY, root, local_model_path=tiny_model_src)
    write_dataset(root / "data" / "train.jsonl")
    return root


def seed_request(model: str, data_files: str, **training) -> dict:
    """The seed's fine_tuning_config.json shape on a local dataset, CPU only; `training` adds to
    or replaces its training_config."""
    return {
        "model": model,
        "ft_backend": "peft_lora",
        "num_gpus": 0,
        "num_cpus": 1,
        "timeout": 600,
        "backend_config": {
            "dataset_config": {
                "dataset_source": "local",
                "data_files": data_files,
                "extension_type": "json",
                "tokenization_field": "prompt",
                "split": "train",
            },
            "lora_config": {
                "r": 4,
                "lora_alpha": 32,
                "lora_dropout": 0.05,
                "bias": "none",
                "task_type": "CAUSAL_LM",
            },
            "training_config": {
                "auto_find_batch_size": True,
                "save_strategy": "no",
                "num_train_epochs": 2,
                "learning_rate": 0.01,
                "use_cpu": False,
                **training,
            },
        },
    }


def job_config(storage: Path, **overrides) -> dict:
    """The seed's config shape, on the tiny model and a local dataset; CPU only."""
    cfg = seed_request(TINY, str(storage / "data" / "train.jsonl"), per_device_train_batch_size=4)
    cfg["backend_config"]["output_dir"] = "tiny/adapters/test_adapter"
    for key, value in overrides.items():
        if key in cfg["backend_config"] and isinstance(value, dict):
            cfg["backend_config"][key].update(value)
        elif key == "output_dir":
            cfg["backend_config"]["output_dir"] = value
        else:
            cfg[key] = value
    return cfg


Server = LocalServer  # the real server in a subprocess, shared with bench/ and the demo


@pytest.fixture
def server_factory():
    servers: list[Server] = []

    def make(storage: Path, *args: str, **kw) -> Server:
        server = Server(storage, *args, **kw).start()
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()


def record(storage: Path, job_id: str):
    """The job's row as the server stored it (read from its database, server or not)."""
    from sllm.jobs.db import JobStore

    store = JobStore(storage / "sllm.db")
    try:
        return store.get(job_id)
    finally:
        store.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        return state != "Z"
    except OSError:
        return False


def wait_for(cond, timeout: float = 60.0, what: str = "condition", poll: float = 0.05):
    """`cond()`'s first truthy value, polled until `timeout` s have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def wait_dead(pid: int, timeout: float = 15) -> float:
    """Seconds until `pid` is gone (a zombie counts as gone); fails after `timeout`."""
    start = time.monotonic()
    while pid_alive(pid):
        assert time.monotonic() - start < timeout, f"worker {pid} still alive"
        time.sleep(0.05)
    return time.monotonic() - start


def wait_progress(srv, job_id: str, timeout: float = 120) -> dict:
    """The job's body once it reports a trained step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = srv.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if (body["status"].get("progress") or {}).get("step"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"{job_id}: no progress")
