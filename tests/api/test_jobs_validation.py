"""Every bad submission is a 400 at submit time with an actionable message, and creates nothing."""

from __future__ import annotations

import copy

import pytest

from tests.conftest import job_config


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_src):
    from tests.conftest import stored_server

    root = tmp_path_factory.mktemp("valid") / "store"
    server = stored_server(root, tiny_model_src, "--num-cpus", "2", "--num-gpus", "0")
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
    # what a run would reject (issue 9, section 2)
    ("backend_config.training_config.per_device_train_batch_size", 0, "batch_size"),
    ("backend_config.training_config.gradient_accumulation_steps", -1, "accumulation"),
    ("backend_config.training_config.learning_rate", 0, "learning_rate"),
    ("backend_config.training_config.num_train_epochs", 1e300, "num_train_epochs"),
    ("backend_config.training_config.max_steps", 10**12, "max_steps"),
    ("backend_config.training_config.seed", 2**32, "seed"),
    ("backend_config.training_config.dataloader_num_workers", 2, "num_cpus"),  # the job has 1
    ("backend_config.lora_config.r", 1000001, "lora_config.r"),
    ("backend_config.lora_config.r", 10**9, "lora_config.r"),
    ("backend_config.lora_config.r", 65, "hidden size"),
    ("backend_config.dataset_config.colour", "blue", "colour"),
    ("backend_config.dataset_config.num_proc", 4, "num_proc"),
    ("backend_config.dataset_config.tokenization_field", "answer", "'prompt'"),  # the columns
]


def assert_refused(srv, expect: str, **request) -> dict:
    """POST a job: a 400 whose message or param matches `expect`, and no job stored."""
    import re

    before = srv.client.get("/v1/fine_tuning/jobs", params={"limit": 1000}).json()["data"]
    r = srv.client.post("/v1/fine-tuning/jobs", **request)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert re.search(expect, err["message"] + str(err.get("param")), re.I), err
    after = srv.client.get("/v1/fine_tuning/jobs", params={"limit": 1000}).json()["data"]
    assert after == before
    return err


@pytest.mark.parametrize("field,value,expect", BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_bad_submission_is_400_and_creates_nothing(srv, field, value, expect):
    assert_refused(srv, expect, json=_set(job_config(srv.storage), field, value))


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize(
    "field",
    [
        "backend_config.training_config.learning_rate",
        "backend_config.lora_config.lora_alpha",
        "backend_config.checkpoint_minutes",
        "backend_config.dataset_config.block_size",
    ],
)
def test_non_finite_numbers_are_400_and_never_stored(srv, field, literal):
    """JSON has no NaN/Infinity; Python's parser takes them (and 1e999 is infinite)."""
    import json

    body = json.dumps(_set(job_config(srv.storage), field, "__X__")).replace('"__X__"', literal)
    headers = {"content-type": "application/json"}
    assert_refused(srv, field.rsplit(".", 1)[1], content=body.encode(), headers=headers)


def _dataset(srv, **dataset) -> dict:
    return _set(job_config(srv.storage), "backend_config.dataset_config", dataset)


def test_bad_data_is_400_at_submit_naming_the_line(srv):
    path = srv.storage / "data" / "broken.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": "SECRET\n')
    cfg = _set(job_config(srv.storage), "backend_config.dataset_config.data_files", str(path))
    err = assert_refused(srv, "line 2", json=cfg)
    assert "SECRET" not in err["message"]


@pytest.mark.parametrize("builder", ["json", "text", "csv"])
def test_hf_hub_builder_cannot_read_outside_the_data_roots(srv, builder):
    """The report: hf_hub + `text` + data_files=/etc/passwd trained on it, and the failed job's
    error printed its first line as column names."""
    cfg = _dataset(srv, dataset_source="hf_hub", hf_dataset_name=builder,
                   data_files="/etc/passwd", tokenization_field="text")  # fmt: skip
    err = assert_refused(srv, "dataset_source 'local'", json=cfg)
    assert "root:" not in err["message"]


def test_uncached_hf_hub_dataset_is_400_when_offline(srv):
    cfg = _dataset(srv, dataset_source="hf_hub", hf_dataset_name="nobody/not-cached-anywhere",
                   tokenization_field="text")  # fmt: skip
    assert_refused(srv, "offline", json=cfg)


@pytest.mark.parametrize("rel", ["sllm.db", "_jobs"])
def test_the_stores_own_files_are_not_training_data(srv, rel):
    """The storage path is a default data root; its database and job scratch are still off."""
    target = srv.storage / rel
    if rel == "_jobs":
        target = target / "job-x" / "rows.jsonl"  # refused by where it is, existing or not
    cfg = _set(job_config(srv.storage), "backend_config.dataset_config.data_files", str(target))
    assert_refused(srv, "store's own files", json=cfg)


@pytest.mark.slow
def test_a_job_that_trains_into_nan_fails_as_diverged(server_factory, tmp_path, tiny_model_src):
    """Through the real server and worker: `failed` with error kind `diverged`, no adapter."""
    from tests.conftest import write_dataset
    from tests.finetune.ft_helpers import store_nan_model

    root = tmp_path / "store"
    store_nan_model(root, "tiny/nan", tmp_path)
    write_dataset(root / "data" / "train.jsonl")
    srv = server_factory(root, "--num-cpus", "1", "--num-gpus", "0")
    cfg = _set(job_config(root, model="tiny/nan"), "backend_config.training_config.max_steps", 5)
    r = srv.client.post("/v1/fine-tuning/jobs", json=cfg)
    assert r.status_code == 200, r.text
    body = srv.wait_status(r.json()["job_id"], {"completed", "failed"})
    status = body["status"]
    assert status["status"] == "failed" and status["error"]["kind"] == "diverged", status
    assert "diverged at step 1" in status["error"]["message"]
    assert status["adapter_path"] is None
    assert not (root / "transformers" / "tiny" / "adapters" / "test_adapter").exists()


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
