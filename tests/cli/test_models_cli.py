"""`sllm models list` and `sllm models delete` against a real server: a job trained on an upload
yields a fine-tuned model the list shows with its parent; deleting it takes it off the list and
out of the store; the server's refusals exit 1 with its message, usage errors 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import stored_server
from tests.openai_api.conftest import text_rows

KEY = "sk-cli-models-0123456789"
JOBS = "/openai/v1/fine_tuning/jobs"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_src):
    root = tmp_path_factory.mktemp("cli_models") / "store"
    srv = stored_server(root, tiny_model_src, "--num-cpus", "1", "--num-gpus", "0", api_key=KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def fine_tuned(server) -> tuple[str, Path]:
    """A completed job's model name and adapter directory."""
    up = server.client.post(
        "/openai/v1/files", files={"file": ("t.jsonl", text_rows(8))}, data={"purpose": "fine-tune"}
    )
    assert up.status_code == 200, up.text
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}}
    body = {"model": "tiny/llama", "training_file": up.json()["id"], "suffix": "cli"}
    r = server.client.post(JOBS, json={**body, "method": method})
    assert r.status_code == 200, r.text
    job = server.wait_status(r.json()["id"], {"completed", "failed"})
    assert job["status"]["status"] == "completed", job
    name = server.client.get(f"{JOBS}/{job['id']}").json()["fine_tuned_model"]
    return name, Path(job["status"]["adapter_path"])


def test_list_shows_the_fine_tuned_model_with_its_parent(server, fine_tuned):
    name, _ = fine_tuned
    out = server.cli("models", "list")
    rows = [line.split() for line in out.stdout.splitlines()]
    assert rows[0] == ["MODEL", "PARENT"]
    assert [name, "tiny/llama"] in rows[1:]
    as_json = json.loads(server.cli("models", "list", "--json").stdout)
    assert {m["id"]: m["parent"] for m in as_json["data"]}[name] == "tiny/llama"


def test_delete_removes_it_and_a_second_delete_is_refused(server, fine_tuned):
    name, adapter = fine_tuned
    assert adapter.is_dir()
    out = server.cli("models", "delete", name, "--json")
    assert json.loads(out.stdout) == {"id": name, "object": "model", "deleted": True}
    assert not adapter.exists()
    assert name not in server.cli("models", "list").stdout
    again = server.cli("models", "delete", name, check=False)
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr.startswith("error (404): ") and name in again.stderr


def test_unknown_model_is_a_404_and_exit_1(server):
    out = server.cli("models", "delete", "ft:tiny/llama:x:job-0123456789abcdef", check=False)
    assert out.returncode == 1 and out.stderr.startswith("error (404): "), out.stderr
    out = server.cli("models", "delete", "no/such-model", check=False)
    assert out.returncode == 1 and "error (404)" in out.stderr, out.stderr
    base = server.cli("models", "delete", "tiny/llama", check=False)  # not through this command
    assert base.returncode == 1 and base.stderr.startswith("error (400): "), base.stderr
    assert "base model" in base.stderr


def test_wrong_key_exits_1_with_the_servers_message(server):
    out = server.cli("models", "list", "--api-key", "sk-wrong", check=False)
    assert out.returncode == 1 and out.stderr.startswith("error (401): Incorrect API key")


def test_usage_errors_exit_2(server):
    assert server.cli("models", check=False).returncode == 2
    assert server.cli("models", "delete", check=False).returncode == 2
    assert server.cli("models", "rename", "x", check=False).returncode == 2
