"""Property-based fuzz of the whole API from its own OpenAPI schema (schemathesis + hypothesis).

The server is real (`sllm start` on loopback, with an API key) and its store holds a real model
(`tiny/llama`, deployed, so chat requests reach a real instance) and a dataset, so generated
requests get past the "model not in the store" and "not deployed" checks into validation,
scheduling and decoding. Every operation gets positive and negative cases; the property is that no
answer is a 5xx and every status code is one the schema documents. Afterwards every stored job and
deployment still reads back, also after a restart.

Examples per operation: $SLLM_FUZZ_EXAMPLES (default 25); derandomized unless $SLLM_FUZZ_RANDOM=1,
so CI is reproducible and a local run can go wider.
"""

from __future__ import annotations

import os
import signal

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

pytestmark = pytest.mark.slow

KEY = "sk-fuzz-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = int(os.environ.get("SLLM_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tiny_model_src):
    from tests.conftest import stored_server

    root = tmp_path_factory.mktemp("fuzz") / "store"
    server = stored_server(root, tiny_model_src, "--num-cpus", "2", "--num-gpus", "0", api_key=KEY)
    deployed = server.client.post(
        "/v1/deployments", json={"model": "tiny/llama", "keep_alive": 600, "max_queue": 4}
    )
    assert deployed.status_code == 200, deployed.text
    from tests.openai_api.conftest import text_rows

    uploaded = server.client.post(
        "/v1/files", files={"file": ("t.jsonl", text_rows(8))}, data={"purpose": "fine-tune"}
    )
    assert uploaded.status_code == 200, uploaded.text
    server.file_id = uploaded.json()["id"]
    yield server
    server.stop()


def _app_schema() -> dict:
    """The schema the server serves at /openapi.json, built without starting anything."""
    from sllm.api.app import create_app
    from sllm.config import Settings

    return create_app(Settings(api_keys=[KEY])).openapi()


schema = schemathesis.openapi.from_dict(_app_schema())


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("SLLM_FUZZ_RANDOM") != "1",
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_request_breaks_the_server(case, fuzz_server):
    case.call_and_validate(
        base_url=fuzz_server.url,
        headers=AUTH,
        checks=[not_a_server_error, status_code_conformance, content_type_conformance],
        timeout=120,
    )


def test_everything_stored_reads_back_after_the_fuzz(fuzz_server):
    """Whatever the fuzz got stored still serialises: every job, its events, every deployment,
    and again after a restart (a bad string or number stored once would break these forever)."""

    def read_all(srv) -> int:
        jobs, after = [], None
        while True:
            params = {"limit": 100, **({"after": after} if after else {})}
            page = srv.client.get("/v1/fine_tuning/jobs", params=params)
            assert page.status_code == 200, page.text
            jobs += page.json()["data"]
            if not page.json()["has_more"]:
                break
            after = jobs[-1]["id"]
        for job in jobs:
            assert srv.client.get(f"/v1/fine_tuning/jobs/{job['id']}").status_code == 200
            assert srv.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").status_code == 200
            for tail in ("", "/events", "/checkpoints"):
                r = srv.client.get(f"/openai/v1/fine_tuning/jobs/{job['id']}{tail}")
                assert r.status_code == 200, r.text
        for f in srv.client.get("/v1/files").json()["data"]:
            assert srv.client.get(f"/openai/v1/files/{f['id']}/content").status_code == 200
        assert srv.client.get("/v1/deployments").status_code == 200
        assert srv.client.get("/v1/models").status_code == 200
        return len(jobs)

    count = read_all(fuzz_server)
    fuzz_server.kill(signal.SIGTERM)
    fuzz_server.start()
    assert read_all(fuzz_server) == count


# --- valid requests, one leaf at a time made hostile -------------------------------------------
# Random bodies rarely get past the first check; these start from requests the server accepts
# (a job on the stored model and its dataset, a deployment, a chat with the deployed model) and
# replace one value, anywhere in the tree, with something hostile, so every check behind the first
# one (the backend's validation, the data, scheduling, decoding) meets it too.

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

HOSTILE_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # beyond 64 bits too
    st.sampled_from([0, -1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e-300, -0.0, 1e308, 5e-324]),
    st.text(max_size=40),  # surrogates and control characters included
    st.sampled_from(["\ud800", "a\x00b", "../../etc/passwd", "/etc/passwd", ".tmp-x", "x" * 5000]),
)
HOSTILE = st.recursive(
    HOSTILE_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=6,
)


def _leaves(node, path=()):
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, i))


def _replace(node, path, value):
    import copy

    out = copy.deepcopy(node)
    if not path:
        return value
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


def _valid_bodies(storage, file_id: str) -> dict[str, dict]:
    from tests.conftest import job_config

    job = job_config(storage, num_cpus=1)
    job["backend_config"]["training_config"].update(max_steps=1, num_train_epochs=1)
    on_file = job_config(storage, num_cpus=1, output_dir="tiny/adapters/on_file")
    on_file["backend_config"]["dataset_config"] = {
        "dataset_source": "file",
        "file_id": file_id,
        "tokenization_field": "text",
    }
    on_file["backend_config"]["training_config"].update(max_steps=1, num_train_epochs=1)
    hp = {"n_epochs": 1, "batch_size": "auto", "learning_rate_multiplier": 2}
    return {
        "/v1/fine_tuning/jobs": job,
        "/v1/fine-tuning/jobs": on_file,
        "/openai/v1/fine_tuning/jobs": {
            "model": "tiny/llama",
            "training_file": file_id,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
            "suffix": "fuzz",
            "seed": 3,
            "metadata": {"k": "v"},
        },
        "/v1/deployments": {"model": "tiny/llama", "keep_alive": 600, "max_queue": 4},
        "/v1/chat/completions": {
            "model": "tiny/llama",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4,
            "temperature": 0.7,
            "seed": 1,
        },
        "/v1/completions": {"model": "tiny/llama", "prompt": "hi", "max_tokens": 4},
    }


DOCUMENTED = {200, 400, 401, 404, 409, 413, 429, 503}


@given(data=st.data())
@settings(
    max_examples=EXAMPLES * 4,
    deadline=None,
    derandomize=os.environ.get("SLLM_FUZZ_RANDOM") != "1",
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_valid_requests_with_one_hostile_value(fuzz_server, data):
    import json

    bodies = _valid_bodies(fuzz_server.storage, fuzz_server.file_id)
    route = data.draw(st.sampled_from(sorted(bodies)))
    body = bodies[route]
    path = data.draw(st.sampled_from(list(_leaves(body))))
    mutated = _replace(body, path, data.draw(HOSTILE))
    raw = json.dumps(mutated, allow_nan=True).encode("utf-8", "surrogatepass")
    r = fuzz_server.client.post(route, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code in DOCUMENTED, (route, path, mutated, r.status_code, r.text[:500])
    if r.status_code >= 400:
        assert set(r.json()["error"]) >= {"message", "type"}, r.text
