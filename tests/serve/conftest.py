"""A store with tiny models, adapters from real fine-tuning, and a real server, per module."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from serve_helpers import (
    LLAMA,
    OPT,
    ServerProcess,
    seed_job_config,
    train_adapter,
    write_answers,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """`facebook/opt-125m` (tiny OPT, no chat template), `tiny/llama` (chat template), and two
    adapters of the OPT trained by the peft_lora backend on different fixed answers:
    adapters/b (a fox) and adapters/c (the sea)."""
    from sllm.store import save_model
    from sllm.testing import make_tiny_model_dir

    src = tmp_path_factory.mktemp("src")
    storage = tmp_path_factory.mktemp("store")
    opt = make_tiny_model_dir(src / "opt", arch="opt", with_chat_template=False)
    save_model(OPT, storage, local_model_path=opt)
    save_model(LLAMA, storage, local_model_path=make_tiny_model_dir(src / "llama"))
    fox = write_answers(storage / "data" / "fox.jsonl", "The quick brown fox jumps over the dog.")
    sea = write_answers(storage / "data" / "sea.jsonl", "Write a short poem about the sea.")
    train_adapter(storage, OPT, "adapters/b", fox, lr=0.03, epochs=3, seed=1)
    train_adapter(storage, OPT, "adapters/c", sea, lr=0.03, epochs=3, seed=2)
    return storage


@pytest.fixture(scope="module")
def world(store):
    """The server, plus `ft_facebook/opt-125m_adapter` from the seed's job submitted to it."""
    server = ServerProcess(store, "--num-cpus", "2").start()
    try:
        r = server.client.post("/v1/fine-tuning/jobs", json=seed_job_config())
        assert r.status_code == 200, r.text
        job = server.wait_status(r.json()["job_id"], {"completed", "failed", "cancelled"})
        assert job["status"]["status"] == "completed", job
        yield SimpleNamespace(server=server, storage=store, job=job)
    finally:
        server.stop()
