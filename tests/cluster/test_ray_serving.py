"""An adapter trained on one node of a real Ray cluster, served by an instance on another.

The base model is saved by the test (the "head" side) into the shared store; the job trains it
on `node_b`; the deployment's instance then runs on the head node and answers with the
adapter, exactly as `PeftModel` with that adapter answers when loaded directly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from cluster_helpers import raylet_node_of

from tests.conftest import job_config

pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[ray]'")
pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
from serve_helpers import peft_generate  # noqa: E402

PROMPT = "Question 3: how are you? Answer:"


def test_adapter_trained_on_one_node_is_served_from_another(cluster, storage, server_factory):
    srv = server_factory(storage, "--ray-address", cluster.address, env=cluster.env)
    cfg = job_config(storage, output_dir="tiny/adapters/remote", num_cpus=2)
    cfg["backend_config"]["training_config"].update(num_train_epochs=4, learning_rate=0.05)
    job_id = srv.client.post("/v1/fine-tuning/jobs", json=cfg).json()["job_id"]
    body = srv.wait_status(job_id, {"completed", "failed"}, timeout=180)
    assert body["status"]["status"] == "completed", body["status"].get("error")
    r = srv.client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 10000})
    events = r.json()["data"]
    (placed,) = [e for e in events if e["type"] == "placement"]
    assert placed["data"]["node_id"] == cluster.node_ids["node_b"]  # trained on node_b

    r = srv.client.post(
        "/v1/deployments",
        json={
            "model": "tiny/llama",
            "enable_lora": True,
            "lora_adapters": {"remote": "tiny/adapters/remote"},
        },
    )
    assert r.status_code == 200, r.text
    r = srv.client.post(
        "/v1/completions",
        json={
            "model": "tiny/llama",
            "prompt": PROMPT,
            "max_tokens": 8,
            "temperature": 0,
            "lora_adapter_name": "remote",
        },
        timeout=180,
    )
    assert r.status_code == 200, r.text
    served = r.json()["choices"][0]["text"]
    (inst,) = srv.client.get("/v1/deployments/tiny/llama").json()["instances"]
    assert raylet_node_of(inst["pid"]) == cluster.node_ids["head"]  # served on the head node
    adapter = storage / "transformers" / "tiny/adapters/remote"
    assert served == peft_generate(storage, "tiny/llama", adapter, PROMPT, 8)
    assert served != peft_generate(storage, "tiny/llama", None, PROMPT, 8)  # the adapter acts
    assert srv.client.delete("/v1/deployments/tiny/llama").status_code == 200
