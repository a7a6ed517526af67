"""Every refusal of the OpenAI fine-tuning surface, over raw HTTP: OpenAI's error shape, a clear
message naming the parameter, and no job stored."""

from __future__ import annotations

import pytest

from sllm.openai.names import fine_tuned_model_name, parse_fine_tuned_model
from tests.openai_api.conftest import text_rows, upload

WRONG_KEY = {"Authorization": "Bearer sk-not-the-servers-key"}
NO_JOB = "job-0123456789abcdef"
CHAT = {"model": "no/such", "messages": [{"role": "user", "content": "hi"}]}

JOBS = "/openai/v1/fine_tuning/jobs"


@pytest.fixture(scope="module")
def file_id(api_server) -> str:
    return upload(api_server, text_rows(8), prefix="/openai/v1").json()["id"]


def job_count(server) -> int:
    return len(server.client.get(f"{JOBS}?limit=1000").json()["data"])


def sup(**hp) -> dict:
    return {"type": "supervised", "supervised": {"hyperparameters": hp}}


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"training_file": "file-0123456789abcdef"}, "training_file", "no uploaded file"),
        ({"method": {"type": "dpo", "dpo": {}}}, "method.type", "'dpo' is not supported"),
        ({"method": {"type": "reinforcement"}}, "method.type", "supervised"),
        ({"method": sup(n_epochs=0)}, "method.supervised.hyperparameters.n_epochs", "1 to 50"),
        ({"method": sup(batch_size="big")}, "method.supervised.hyperparameters.batch_size", ""),
        ({"method": sup(learning_rate_multiplier=-1)}, None, "(0, 10]"),
        ({"hyperparameters": {"n_epochs": 2}, "method": sup(n_epochs=3)}, "hyperparameters",
         "not both"),
        ({"suffix": "has:colon"}, "suffix", ""),
        ({"seed": -1}, "seed", ""),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "16"),
        ({"integrations": [{"type": "wandb"}]}, "integrations", "not supported"),
        ({"model": "no/such-model"}, "model", "not in the store"),
        ({"unknown": 1}, "unknown", "unknown field"),
    ],
)  # fmt: skip
def test_bad_create_is_a_400_and_stores_nothing(api_server, file_id, body, param, words):
    before = job_count(api_server)
    r = api_server.client.post(JOBS, json={"model": "tiny/llama", "training_file": file_id, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and words in err["message"]
    if param is not None:
        assert err["param"] == param
    assert job_count(api_server) == before


def test_unknown_job_is_404_everywhere(api_server):
    for method, tail in [
        ("GET", ""),
        ("POST", "/cancel"),
        ("POST", "/pause"),
        ("POST", "/resume"),
        ("GET", "/events"),
        ("GET", "/checkpoints"),
    ]:
        r = api_server.client.request(method, f"{JOBS}/job-0123456789abcdef{tail}")
        assert r.status_code == 404, (tail, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"  # as OpenAI answers a 404


def test_bad_cursors_and_limits(api_server):
    assert api_server.client.get(f"{JOBS}?after=job-nope").status_code == 400
    assert api_server.client.get(f"{JOBS}?limit=0").status_code == 400


def test_resume_or_pause_in_the_wrong_state_is_409(api_server, file_id):
    r = api_server.client.post(
        JOBS, json={"model": "tiny/llama", "training_file": file_id, "method": sup(n_epochs=1)}
    )
    job_id = r.json()["id"]
    cancelled = api_server.client.post(f"{JOBS}/{job_id}/cancel").json()
    assert cancelled["status"] == "cancelled"
    for verb in ("pause", "resume"):
        r = api_server.client.post(f"{JOBS}/{job_id}/{verb}")
        assert r.status_code == 409 and "cancelled" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "conflict"
        seed = api_server.client.post(f"/v1/fine_tuning/jobs/{job_id}/{verb}")
        assert seed.status_code == 409 and seed.json()["error"]["code"] == 409
    r = api_server.client.get(f"{JOBS}/{job_id}/events?after=nonsense")
    assert r.status_code == 400 and r.json()["error"]["param"] == "after"
    r = api_server.client.get(f"{JOBS}/{job_id}/checkpoints?after=ftckpt-other-3")
    assert r.status_code == 400


def test_validation_file_maps_to_validation_dataset_config(api_server, file_id):
    from sllm.finetune.config import BackendConfig

    if "validation_dataset_config" not in BackendConfig.model_fields:
        pytest.skip("needs validation_dataset_config (#10)")
    r = api_server.client.post(
        JOBS,
        json={
            "model": "tiny/llama",
            "training_file": file_id,
            "validation_file": file_id,
            "method": sup(n_epochs=1),
        },
    )
    assert r.status_code == 200, r.text
    job = api_server.wait_status(r.json()["id"], {"completed", "failed"})
    assert job["status"]["status"] == "completed", job
    vds = job["status"]["config"]["backend_config"]["validation_dataset_config"]
    assert vds["dataset_source"] == "file" and vds["file_id"] == file_id


def test_names_round_trip():
    from types import SimpleNamespace

    job = SimpleNamespace(
        id="job-0123456789abcdef",
        model="org/model:v2",
        status="completed",
        adapter_path="/x",
        openai={"suffix": "my-suffix"},
    )
    name = fine_tuned_model_name(job)
    assert name == "ft:org/model:v2:my-suffix:job-0123456789abcdef"
    assert parse_fine_tuned_model(name) == ("job-0123456789abcdef", None)
    assert parse_fine_tuned_model(name + ":ckpt-step-40") == ("job-0123456789abcdef", 40)
    assert (
        fine_tuned_model_name(SimpleNamespace(**{**vars(job), "openai": None})).split(":")[-2]
        == "sllm"
    )
    assert fine_tuned_model_name(SimpleNamespace(**{**vars(job), "status": "running"})) is None
    for bad in (
        "tiny/llama",
        "ft:x:job-0123456789abcdef",
        "ft:a:b:job-XYZ",
        "ft:a:b:c:ckpt-step-1",
    ):
        assert parse_fine_tuned_model(bad) is None


def test_deprecated_hyperparameters_map_onto_the_seed_config(api_server, file_id):
    r = api_server.client.post(
        JOBS,
        json={
            "model": "tiny/llama",
            "training_file": file_id,
            "hyperparameters": {"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 0.5},
        },
    )
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["hyperparameters"] == {
        "n_epochs": 1,
        "batch_size": 2,
        "learning_rate_multiplier": 0.5,
    }
    assert job["method"]["supervised"]["hyperparameters"] == job["hyperparameters"]
    assert job["seed"] == 42 and job["fine_tuned_model"] is None and job["error"] is None
    seed_view = api_server.client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"]
    config = seed_view["config"]
    training = config["backend_config"]["training_config"]
    assert (config["num_cpus"], config["num_gpus"]) == (1, 0)
    assert training["learning_rate"] == 1e-4 and training["per_device_train_batch_size"] == 2
    ds = config["backend_config"]["dataset_config"]
    assert (ds["dataset_source"], ds["file_id"], ds["tokenization_field"]) == (
        "file",
        file_id,
        "text",
    )
    api_server.client.post(f"{JOBS}/{job['id']}/cancel")


def test_serving_routes_answer_under_openai_too(api_server):
    for prefix in ("/v1", "/openai/v1"):
        r = api_server.client.post(
            f"{prefix}/chat/completions",
            json={"model": "no/such", "messages": [{"role": "user", "content": "hi"}]},
        )
        want = "invalid_request_error" if prefix == "/openai/v1" else "not_found_error"
        assert r.status_code == 404 and r.json()["error"]["type"] == want
        assert api_server.client.get(f"{prefix}/models").json()["object"] == "list"


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


# (method, path under the prefix, request kwargs, status, the code under /openai/v1)
BOTH_SURFACES = [
    ("GET", "/fine_tuning/jobs", {"headers": WRONG_KEY}, 401, "invalid_api_key"),
    ("GET", f"/fine_tuning/jobs/{NO_JOB}", {}, 404, "fine_tune_not_found"),
    ("POST", f"/fine_tuning/jobs/{NO_JOB}/cancel", {}, 404, "fine_tune_not_found"),
    ("GET", "/files/file-0123456789abcdef", {}, 404, "file_not_found"),
    ("DELETE", "/files/file-0123456789abcdef", {}, 404, "file_not_found"),
    ("GET", "/files/file-0123456789abcdef/content", {}, 404, "file_not_found"),
    ("POST", "/chat/completions", {"json": CHAT}, 404, "model_not_found"),
    ("POST", "/completions", {"json": {"model": "no/such", "prompt": "hi"}}, 404,
     "model_not_found"),
    ("GET", "/models/no/such", {}, 404, "model_not_found"),
    ("DELETE", "/models/ft:tiny/llama:x:job-0123456789abcdef", {}, 404, "model_not_found"),
    ("POST", "/chat/completions", {"json": {**CHAT, "temperature": "hot"}}, 400, "invalid_type"),
    ("POST", "/chat/completions", {"json": {"model": "no/such"}}, 400,
     "missing_required_parameter"),
    ("POST", "/chat/completions", {"json": {**CHAT, "n": -1}}, 400, "invalid_value"),
    ("POST", "/chat/completions", {"content": b'{"model": NaN}'}, 400, None),  # the edge's parse
    ("POST", "/chat/completions", {"json": {**CHAT, "pad": "x" * (1 << 20)}}, 413,
     "request_too_large"),
    ("POST", "/files", {"files": {"file": ("big.jsonl", b"x" * 70_000)},
                        "data": {"purpose": "fine-tune"}}, 413, "file_too_large"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "code"), BOTH_SURFACES)
def test_openai_surface_answers_string_codes_and_v1_numbers(
    api_server, method, path, kwargs, status, code
):
    err = error_of(api_server.client.request(method, f"/openai/v1{path}", **kwargs), status)
    assert err["code"] == code, err
    seed = error_of(api_server.client.request(method, f"/v1{path}", **kwargs), status)
    # /v1 keeps the seed's numbers; the key check's `invalid_api_key` was always a string
    assert seed["code"] == ("invalid_api_key" if status == 401 else status), seed
    assert seed["message"] == err["message"]
    if status == 404:  # OpenAI's type for a missing job, file or model; /v1 keeps its own
        assert (seed["type"], err["type"]) == ("not_found_error", "invalid_request_error")
    else:
        assert seed["type"] == err["type"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"unknown": 1}, "unknown_parameter"),
        ({"seed": "42"}, "invalid_type"),
        ({"seed": -1}, "invalid_value"),
        ({"training_file": "file-0123456789abcdef"}, None),  # the service's 400: no code
        ({"method": {"type": "dpo", "dpo": {}}}, None),
    ],
)
def test_create_400_codes(api_server, file_id, body, code):
    r = api_server.client.post(JOBS, json={"model": "tiny/llama", "training_file": file_id, **body})
    err = error_of(r, 400)
    assert err["type"] == "invalid_request_error" and err["code"] == code, err
    missing = error_of(api_server.client.post(JOBS, json={"training_file": file_id}), 400)
    assert missing["code"] == "missing_required_parameter" and missing["param"] == "model"


def test_unknown_route_under_openai_is_a_404_with_a_string_or_null_code(api_server):
    err = error_of(api_server.client.get("/openai/v1/no-such-thing"), 404)
    assert err["code"] is None
    assert error_of(api_server.client.get("/v1/no-such-thing"), 404)["code"] == 404
