"""Fine-tuned models served on demand: three real jobs, no deploy, one instance, an LRU of two.

The tests run in order on one server: errors first (nothing deployed yet), then the first
request that cold-starts the base with its adapter, the model list, a checkpoint's name, the
LRU under concurrent load, and deleting a model.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
from serve_helpers import OPT, ServerProcess, seed_job_config, write_answers

from sllm.serve.finetuned import parse_fine_tuned_model

ANSWERS = {
    "a": "The quick brown fox jumps over the dog.",
    "b": "Write a short poem about the sea.",
    "c": "Seven green apples fell from the tall tree.",
}
PROMPT = "Question: What is the capital of France? Answer:"


def _job(server: ServerProcess, storage, key: str, seed: int) -> str:
    data = write_answers(storage / "data" / f"{key}.jsonl", ANSWERS[key])
    cfg = seed_job_config(num_train_epochs=3, learning_rate=0.03, seed=seed)
    cfg["backend_config"]["dataset_config"]["data_files"] = str(data)
    cfg["backend_config"]["output_dir"] = f"ft/{key}"
    cfg["backend_config"]["training_config"].pop("auto_find_batch_size")
    cfg["backend_config"]["training_config"]["per_device_train_batch_size"] = 16
    r = server.client.post("/v1/fine-tuning/jobs", json=cfg)
    assert r.status_code == 200, r.text
    return r.json()["job_id"]


@pytest.fixture(scope="module")
def ft(tmp_path_factory):
    """A server on a store holding a tiny OPT, and three completed jobs' fine-tuned models."""
    from sllm.store import save_model
    from sllm.testing import make_tiny_model_dir

    src = tmp_path_factory.mktemp("src")
    storage = tmp_path_factory.mktemp("store")
    save_model(OPT, storage, local_model_path=make_tiny_model_dir(src / "opt", arch="opt"))
    server = ServerProcess(storage, "--num-cpus", "2").start()
    try:
        ids = {key: _job(server, storage, key, seed) for seed, key in enumerate(ANSWERS)}
        names = {}
        for key, job_id in ids.items():
            job = server.wait_status(job_id, {"completed", "failed", "cancelled"}, timeout=300)
            assert job["status"]["status"] == "completed", job
            names[key] = f"ft:{OPT}:sllm:{job_id}"
        yield SimpleNamespace(server=server, storage=storage, ids=ids, names=names, solo={})
    finally:
        server.stop()


def chat(server, model: str, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}]}
    return server.client.post(
        "/v1/chat/completions", json={**body, "temperature": 0, "max_tokens": 16, **extra}
    )


def complete(client, model: str) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "temperature": 0, "max_tokens": 16}
    return client.post("/v1/completions", json=body)


def text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def instance(server) -> dict:
    (inst,) = [i for i in server.deployment(OPT)["instances"] if i["state"] == "ready"]
    return inst


def error(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    for word in words:
        assert word in message, message


def test_parse_names():
    ft = parse_fine_tuned_model("ft:org/m:v1:x:job-1:ckpt-step-20")
    assert (ft.base, ft.suffix, ft.job_id, ft.step) == ("org/m:v1", "x", "job-1", 20)
    assert ft.key == "ft:job-1:ckpt-step-20"
    assert parse_fine_tuned_model("ft:m:sllm:job-2").step is None
    for bad in ("m", "ft:m:job-1", "ft::s:job", "ft:m:s:", None):
        assert parse_fine_tuned_model(bad) is None


def test_bad_names_are_404_and_deploy_nothing(ft):
    server, a = ft.server, ft.names["a"]
    error(chat(server, f"ft:{OPT}:sllm:job-0000000000000000"), 404, "no fine-tuning job")
    error(chat(server, a.replace(":sllm:", ":other:")), 404, f"model is {a!r}")
    error(chat(server, a.replace(OPT, "tiny/other")), 404, f"model is {a!r}")
    error(chat(server, f"{a}:ckpt-step-3"), 404, "no checkpoint at step 3")
    error(chat(server, OPT, lora_adapter_name="ft:other:sllm:job-1"), 404, "no fine-tuning job")
    cfg = seed_job_config()
    cfg["backend_config"]["output_dir"] = "ft/cancelled"
    job_id = server.client.post("/v1/fine-tuning/jobs", json=cfg).json()["job_id"]
    assert server.client.post(f"/v1/fine-tuning/jobs/{job_id}/cancel").status_code == 200
    error(chat(server, f"ft:{OPT}:sllm:{job_id}"), 404, "is cancelled", "completed")
    error(server.client.delete(f"/v1/models/{OPT}"), 400, "sllm-store delete")
    error(server.client.delete("/v1/models/nothing"), 404, "does not exist")
    reserved = {"model": OPT, "enable_lora": True, "lora_adapters": {"ft:x": "ft/a"}}
    error(server.client.post("/v1/deployments", json=reserved), 400, "fine-tuned models")
    assert server.client.get("/v1/deployments").json()["data"] == []


def test_first_request_cold_starts_the_base_with_the_adapter(ft):
    server, a = ft.server, ft.names["a"]
    r = chat(server, a)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == a
    dep = server.deployment(OPT)
    assert dep["on_demand"] is True and dep["state"] == "warm"
    assert dep["config"]["max_loras"] == 8
    inst = instance(server)
    assert inst["lora_cache"] == [f"ft:{ft.ids['a']}"] and inst["lora_loads"] == 1
    ft.solo["a"] = text(complete(server.client, a))
    base = text(complete(server.client, OPT))
    assert ft.solo["a"] != base, "the adapter's answer should differ from the base model's"
    assert instance(server)["lora_loads"] == 1  # cached: not loaded again


def test_models_lists_fine_tuned_models_with_parent(ft):
    body = ft.server.client.get("/v1/models").json()
    assert body["object"] == "list"
    cards = {c["id"]: c for c in body["data"]}
    assert cards[OPT]["parent"] is None
    for name in ft.names.values():
        assert cards[name]["parent"] == OPT and cards[name]["object"] == "model"
    assert {c for c in cards if c.startswith("ft:")} == set(ft.names.values())  # not cancelled
    from openai import OpenAI

    sdk = OpenAI(base_url=f"{ft.server.url}/v1", api_key="unused")
    assert {m.id: m.parent for m in sdk.models.list().data}[ft.names["c"]] == OPT
    messages = [{"role": "user", "content": PROMPT}]
    answer = sdk.chat.completions.create(model=ft.names["c"], messages=messages, max_tokens=4)
    assert answer.model == ft.names["c"] and answer.usage.completion_tokens >= 1
    one = ft.server.client.get(f"/v1/models/{ft.names['b']}")
    assert one.status_code == 200 and one.json() == cards[ft.names["b"]]
    error(ft.server.client.get("/v1/models/nothing"), 404, "does not exist")


def test_a_checkpoint_name_serves_its_files(ft):
    """`<adapter dir>/checkpoints/step-<N>/` (here: job c's adapter, copied there)."""
    server = ft.server
    ft.solo["c"] = text(complete(server.client, ft.names["c"]))
    step = ft.storage / "transformers" / "ft" / "a" / "checkpoints" / "step-7"
    shutil.copytree(ft.storage / "transformers" / "ft" / "c", step)
    assert text(complete(server.client, f"{ft.names['a']}:ckpt-step-7")) == ft.solo["c"]
    shutil.rmtree(step.parent)


def test_lru_of_two_over_three_adapters_under_concurrent_load(ft):
    server, names, ids = ft.server, ft.names, ft.ids
    r = server.client.post("/v1/deployments", json={"model": OPT, "max_loras": 2})
    assert r.status_code == 200, r.text
    assert r.json()["on_demand"] is False and r.json()["config"]["max_loras"] == 2
    ft.solo["b"] = text(complete(server.client, names["b"]))
    assert len(set(ft.solo.values())) == 3, ft.solo
    loads = instance(server)["lora_loads"]
    for key in "abca":  # each evicts the least recently used: a, b, c, a all load
        assert text(complete(server.client, names[key])) == ft.solo[key]
    inst = instance(server)
    assert inst["lora_loads"] - loads == 3  # a, c, a (b was still cached)
    assert inst["lora_cache"] == [f"ft:{ids['c']}", f"ft:{ids['a']}"]

    order = list("abcabcabcbca")
    with httpx.Client(base_url=server.url, timeout=120) as client:
        with ThreadPoolExecutor(len(order)) as pool:
            got = list(pool.map(lambda k: text(complete(client, names[k])), order))
    assert got == [ft.solo[k] for k in order]  # evictions never touched a running request
    assert text(complete(server.client, names["b"])) == ft.solo["b"]
    assert len(instance(server)["lora_cache"]) <= 2


def test_delete_removes_the_model_and_nothing_else(ft):
    server, a, b = ft.server, ft.names["a"], ft.names["b"]
    bee = {"model": OPT, "enable_lora": True, "lora_adapters": {"bee": "ft/b"}}
    assert server.client.post("/v1/deployments", json=bee).status_code == 200
    error(server.client.delete(f"/v1/models/{b}"), 409, "sllm delete")
    error(server.client.delete("/v1/models/bee"), 400, "--lora-adapters bee")

    r = server.client.delete(f"/v1/models/{a}")
    assert r.status_code == 200, r.text
    assert r.json() == {"id": a, "object": "model", "deleted": True}
    assert not (ft.storage / "transformers" / "ft" / "a").exists()
    error(chat(server, a), 404, "was deleted")
    error(server.client.delete(f"/v1/models/{a}"), 404, "was deleted")
    ids = [c["id"] for c in server.client.get("/v1/models").json()["data"]]
    assert a not in ids and b in ids and "bee" in ids
    assert text(complete(server.client, b)) == ft.solo["b"]
    assert f"ft:{ft.ids['a']}" not in instance(server)["lora_cache"]
    assert text(complete(server.client, ft.names["c"])) == ft.solo["c"]
    job = server.client.get(f"/v1/fine_tuning/jobs/{ft.ids['a']}").json()
    assert job["status"]["status"] == "completed"


def test_an_output_dir_rewritten_by_another_job_is_not_served_under_the_old_name(ft):
    """What a later job with the same output_dir leaves: its own id in training_metadata.json."""
    import json

    meta = ft.storage / "transformers" / "ft" / "c" / "training_metadata.json"
    original = meta.read_text()
    meta.write_text(json.dumps({**json.loads(original), "job_id": "job-later"}))
    try:
        error(chat(ft.server, ft.names["c"]), 404, "job job-later wrote its own adapter")
    finally:
        meta.write_text(original)
    assert text(complete(ft.server.client, ft.names["c"])) == ft.solo["c"]
