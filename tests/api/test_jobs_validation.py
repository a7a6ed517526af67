"""Every bad submission is a 400 at submit time with an actionable message, and creates nothing."""

from __future__ import annotations

import copy

import pytest

from tests.conftest import job_config


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_src):
    from sllm.store import save_model
    from tests.conftest import Server, write_dataset

    root = tmp_path_factory.mktemp("valid") / "store"
    save_model("tiny/llama", root, local_model_path=tiny_model_src)
    write_dataset(root / "data" / "train.jsonl")
    server = Server(root, "--num-cpus", "2", "--num-gpus", "0").start()
    yield server
    server.stop()


def _set(cfg: dict, dotted: str, value) -> dict:
    cfg = copy.deepcopy(cfg)
    *parents, last = dotted.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return cfg


_DELETE = object()

BAD = [
    ("model", _DELETE, "model"),
    ("model", "", "model"),
    ("model", "nobody/missing-model", "not in the store"),
    ("num_cpus", "two", "num_cpus"),
    ("num_cpus", 0, "num_cpus"),
    ("num_cpus", 3, "more than any one machine"),
    ("num_gpus", 1, "GPUs"),
    ("num_gpus", 1.5, "num_gpus"),
    ("timeout", 0, "timeout"),
    ("timeout", -5, "timeout"),
    ("timeout", "1h", "timeout"),
    ("priority", "high", "priority"),
    ("ft_backend", "full_ft", "ft_backend"),
    ("surprise", 1, "surprise"),
    ("backend_config.lora_config.rank", 4, "lora_config"),
    ("backend_config.lora_config.r", "four", "lora_config"),
    ("backend_config.training_config.bogus_argument", 1, "training_config"),
    ("backend_config.training_config.learning_rate", "fast", "training_config"),
    ("backend_config.training_config.push_to_hub", True, "push_to_hub"),
    ("backend_config.training_config.hub_token", "hf_x", "hub_token"),
    ("backend_config.training_config.report_to", "wandb", "report_to"),
    ("backend_config.dataset_config.tokenization_field", _DELETE, "tokenization_field"),
    ("backend_config.dataset_config.dataset_source", "s3", "dataset_source"),
    ("backend_config.dataset_config.data_files", "/no/such/file.jsonl", "data_files"),
    ("backend_config.output_dir", "../../../etc", "output_dir"),
    ("backend_config.output_dir", "/tmp/elsewhere", "output_dir"),
]


@pytest.mark.parametrize("field,value,expect", BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_bad_submission_is_400_and_creates_nothing(srv, field, value, expect):
    import re

    before = srv.client.get("/v1/fine_tuning/jobs", params={"limit": 1000}).json()["data"]
    r = srv.client.post("/v1/fine-tuning/jobs", json=_set(job_config(srv.storage), field, value))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert re.search(expect, err["message"] + str(err.get("param")), re.I), err
    after = srv.client.get("/v1/fine_tuning/jobs", params={"limit": 1000}).json()["data"]
    assert after == before


def test_dataset_outside_data_roots_is_refused(srv, tmp_path):
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text('{"prompt": "hi"}\n')
    cfg = _set(job_config(srv.storage), "backend_config.dataset_config.data_files", str(outside))
    r = srv.client.post("/v1/fine-tuning/jobs", json=cfg)
    assert r.status_code == 400 and "data_files" in r.text


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b"", b'"model"'],
    ids=["malformed", "array", "empty", "string"],
)
def test_malformed_bodies_are_400(srv, body):
    r = srv.client.post(
        "/v1/fine_tuning/jobs", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


@pytest.mark.parametrize("spelling", ["fine-tuning", "fine_tuning"])
def test_unknown_job_is_404_on_every_route(srv, spelling):
    base = f"/v1/{spelling}/jobs/job-nope"
    for method, path in [("GET", base), ("POST", base + "/cancel"), ("GET", base + "/events")]:
        r = srv.client.request(method, path)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(
    "params", [{"status": "done"}, {"limit": 0}, {"limit": "ten"}, {"after": "job-nope"}]
)
def test_bad_list_queries_are_400(srv, params):
    r = srv.client.get("/v1/fine_tuning/jobs", params=params)
    assert r.status_code == 400, r.text


def test_openapi_lists_the_documented_routes(srv):
    paths = srv.client.get("/openapi.json").json()["paths"]
    assert "/v1/fine-tuning/jobs" in paths
    assert "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel" in paths
    assert "/v1/fine_tuning/jobs/{fine_tuning_job_id}" in paths
