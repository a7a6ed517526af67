"""The console's shell and the read-only routes it reads (store models, capacity, adapter files),
against one real server with an API key and real jobs."""

from __future__ import annotations

import http.client
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import job_config, stored_server

KEY = "sk-console-routes-0123"


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_src):
    server = stored_server(
        tmp_path_factory.mktemp("console-routes") / "store",
        tiny_model_src,
        "--num-cpus",
        "2",
        api_key=KEY,
    )
    yield server
    server.stop()


def _raw_get(srv, path: str) -> tuple[int, bytes]:
    """A GET with the path sent byte for byte (httpx would resolve `..` before sending)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_shell_loads_without_a_key_and_holds_no_data(srv):
    with httpx.Client(base_url=srv.url) as anon:
        page = anon.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert '<script type="module" src="/console/app.js">' in page.text
        for asset in (
            "app.js",
            "api.js",
            "jobs.js",
            "job.js",
            "newjob.js",
            "chart.js",
            "style.css",
        ):
            assert anon.get(f"/console/{asset}").status_code == 200, asset
        # exactly the shipped files open, not the prefix
        assert anon.get("/console/nope.js").status_code == 401
        assert srv.client.get("/console/nope.js").status_code == 404
        # everything with data still needs the key
        for path in ("/v1/fine_tuning/jobs", "/v1/store/models", "/v1/capacity"):
            r = anon.get(path)
            assert r.status_code == 401, path
            assert r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "path",
    [
        "/console/../v1/fine_tuning/jobs",
        "/console/%2e%2e/v1/fine_tuning/jobs",
        "/console/..%2fv1/fine_tuning/jobs",
        "/console/../../../etc/passwd",
    ],
)
def test_console_prefix_opens_no_other_route(srv, path):
    status, body = _raw_get(srv, path)
    assert status in (401, 404), (status, body[:200])
    assert b'"object": "list"' not in body and b"root:" not in body


def test_store_models_lists_what_sllm_store_saved(srv):
    body = srv.client.get("/v1/store/models").json()
    assert body["object"] == "list"
    [model] = body["data"]
    assert model["name"] == "tiny/llama" and model["backend"] == "transformers"
    assert model["size_bytes"] > 0 and model["parameter_count"] > 0


def _submit(srv, **overrides) -> str:
    r = srv.client.post("/v1/fine_tuning/jobs", json=job_config(srv.storage, **overrides))
    assert r.status_code == 200, r.text
    return r.json()["job_id"]


@pytest.mark.slow
def test_capacity_names_the_job_holding_cpus(srv):
    before = srv.client.get("/v1/capacity").json()
    assert before == {
        "object": "capacity",
        "total_cpus": 2,
        "total_gpus": 0,
        "free_cpus": 2,
        "free_gpus": 0,
        "holders": [],
    }
    job = _submit(srv, training_config={"max_steps": 100000}, output_dir="tiny/adapters/long")
    srv.wait_status(job, {"running"})
    held = srv.client.get("/v1/capacity").json()
    assert held["free_cpus"] == 1
    assert held["holders"] == [
        {"owner": job, "kind": "job", "cpus": 1, "gpu_ids": [], "node": None}
    ]
    srv.client.post(f"/v1/fine_tuning/jobs/{job}/cancel")
    deadline = time.monotonic() + 30
    while srv.client.get("/v1/capacity").json()["holders"]:
        assert time.monotonic() < deadline, "the cancelled job still holds its CPU"
        time.sleep(0.1)


@pytest.mark.slow
def test_adapter_files_of_a_job(srv):
    job = _submit(srv, training_config={"max_steps": 2}, output_dir="tiny/adapters/files")
    for spelling in ("fine_tuning", "fine-tuning"):  # before it is saved: no path, no files
        early = srv.client.get(f"/v1/{spelling}/jobs/{job}/adapter").json()
        assert early["object"] == "fine_tuning.job.adapter" and early["job_id"] == job
        if early["path"] is None:
            assert early["files"] == []
    done = srv.wait_status(job, {"completed", "failed", "cancelled"})
    assert done["status"]["status"] == "completed", done
    body = srv.client.get(f"/v1/fine-tuning/jobs/{job}/adapter").json()
    root = Path(done["status"]["adapter_path"])
    assert body["path"] == str(root) and not body["truncated"]
    on_disk = {
        p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()
    }
    assert {f["name"]: f["size_bytes"] for f in body["files"]} == on_disk
    assert "adapter_model.safetensors" in on_disk and "adapter_config.json" in on_disk
    # links are not followed: nothing outside the adapter's directory is listed
    (root / "outside").symlink_to("/etc")
    (root / "passwd").symlink_to("/etc/passwd")
    names = {
        f["name"] for f in srv.client.get(f"/v1/fine_tuning/jobs/{job}/adapter").json()["files"]
    }
    assert names == set(on_disk)


@pytest.mark.parametrize("spelling", ["fine_tuning", "fine-tuning"])
def test_adapter_files_of_an_unknown_job_is_404(srv, spelling):
    r = srv.client.get(f"/v1/{spelling}/jobs/job-0000000000000000/adapter")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found_error"
