"""A job that completes into a deployed adapter's directory: the files are swapped atomically, its
events say what was replaced, and the very next request to the warm instance gets the new weights
(never the stale ones), without a redeploy or a restart."""

from __future__ import annotations

import pytest
from serve_helpers import peft_generate, write_answers

from tests.conftest import TINY, job_config

PROMPT = "Question: What is the capital of France? Answer:"


def completion(srv, adapter: str) -> str:
    body = {"model": TINY, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    r = srv.client.post("/v1/completions", json={**body, "lora_adapter_name": adapter})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def instance_pid(srv) -> int:
    return srv.client.get(f"/v1/deployments/{TINY}").json()["instances"][0]["pid"]


def train_into(srv, storage, data, seed: int) -> str:
    cfg = job_config(
        storage,
        output_dir="adapters/live",
        dataset_config={"data_files": str(data)},
        training_config={"num_train_epochs": 3, "learning_rate": 0.05, "seed": seed},
    )
    r = srv.client.post("/v1/fine_tuning/jobs", json=cfg)
    assert r.status_code == 200, r.text
    job = r.json()["job_id"]
    body = srv.wait_status(job, {"completed", "failed", "cancelled"})
    assert body["status"]["status"] == "completed", body
    return job


@pytest.mark.slow
def test_a_completed_job_replaces_a_deployed_adapter_and_is_served_at_once(storage, server_factory):
    fox = write_answers(storage / "data" / "fox.jsonl", "The quick brown fox jumps over the dog.")
    sea = write_answers(storage / "data" / "sea.jsonl", "Write a short poem about the sea.")
    adapter = storage / "transformers" / "adapters" / "live"
    srv = server_factory(storage, "--num-cpus", "2")

    first = train_into(srv, storage, fox, seed=1)
    srv.cli("deploy", "--model", TINY, "--enable-lora", "--lora-adapters", "live=adapters/live")
    before = completion(srv, "live")
    assert before == peft_generate(storage, TINY, adapter, PROMPT, 12)
    pid = instance_pid(srv)

    second = train_into(srv, storage, sea, seed=2)
    events = srv.client.get(f"/v1/fine_tuning/jobs/{second}/events").json()["data"]
    replaced = [e for e in events if e["message"].startswith("Replaced the previous adapter")]
    assert len(replaced) == 1, events
    assert first in replaced[0]["message"]
    assert replaced[0]["data"]["replaced"]["job_id"] == first
    assert replaced[0]["data"]["replaced"]["created_at"]
    leftovers = [p.name for p in adapter.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the previous adapter and the scratch dir are gone

    after = completion(srv, "live")  # the very next request, no redeploy
    assert after == peft_generate(storage, TINY, adapter, PROMPT, 12)
    assert after != before
    assert instance_pid(srv) == pid  # same warm instance
