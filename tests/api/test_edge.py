"""The server's edge (sllm.api.edge): strict JSON, the body limit, API keys, documented errors.

Through a real `sllm start` on loopback: each hostile body is a 400/413 naming the problem, and
nothing was stored (the job list and the deployments stay as they were, also after a restart).
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from sllm.cli.start import is_loopback, refuse_open_server
from sllm.strictjson import BadJSON, parse_json
from tests.conftest import job_config

KEY = "sk-test-edge-0123456789"


# --- strict JSON, unit ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, says",
    [
        (b'{"a": NaN}', "NaN"),
        (b'{"a": Infinity}', "Infinity"),
        (b'{"a": [-Infinity]}', "-Infinity"),
        (b'{"a": 1e999}', "too large"),
        (b'{"a": -1e999}', "too large"),
        (b'{"a": 9223372036854775808}', "64 bits"),
        (b'{"a": -9223372036854775809}', "64 bits"),
        (b'{"a": 1' + b"0" * 5000 + b"}", "64 bits"),
        (b'{"a": {"b": "x\\ud800y"}}', "surrogate"),
        (b'{"a": "\\udfff"}', "surrogate"),
        (b'{"a": "nul\\u0000"}', "U+0000"),
        (b'{"\\u0000": 1}', "U+0000"),
        (b'{"a\\u0007": 1}', "U+0007"),
        (b'{"a\\u0085": 1}', "U+0085"),
        (b'{"' + b"k" * 300 + b'": 1}', "keys are at most"),
        (b"[" * 100 + b"]" * 100, "nested too deeply"),
        (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
        (b'{"a": 1', "Malformed JSON"),
        (b"\xff\xfe", "UTF-8"),
    ],
)
def test_strict_json_refuses(raw, says):
    with pytest.raises(BadJSON) as info:
        parse_json(raw)
    assert says in info.value.message


def test_strict_json_names_where_the_bad_value_is():
    with pytest.raises(BadJSON) as info:
        parse_json(b'{"backend_config": {"training_config": {"run_name": "\\ud800"}}}')
    assert info.value.param == "backend_config.training_config.run_name"
    with pytest.raises(BadJSON) as info:
        parse_json(b'{"a": [1, {"lr": NaN}]}')
    assert info.value.param == "a.1.lr" and info.value.message.startswith("`a.1.lr`: `NaN`")


def test_strict_json_accepts_ordinary_bodies():
    body = {
        "messages": [{"role": "user", "content": "tab\there\nline, \x0c \x1b[1m émoji 😀"}],
        "n": 9223372036854775807,
        "t": 0.7,
        "deep": [[[[1]]]],
    }
    assert parse_json(json.dumps(body).encode()) == body
    assert parse_json(json.dumps(body, ensure_ascii=False).encode()) == body


# --- the server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_src):
    from tests.conftest import stored_server

    root = tmp_path_factory.mktemp("edge") / "store"
    args = ("--num-cpus", "1", "--max-body-bytes", "65536")
    server = stored_server(root, tiny_model_src, *args, api_key=KEY)
    yield server
    server.stop()


def _stored(srv) -> tuple[list, list]:
    jobs = srv.client.get("/v1/fine_tuning/jobs", params={"limit": 1000}).json()["data"]
    deps = srv.client.get("/v1/deployments").json()["data"]
    return jobs, deps


def _assert_error(r: httpx.Response, status: int, says: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert says in err["message"], err
    assert err["code"] in (status, "invalid_api_key")
    return err


def _post_raw(srv, path: str, raw: bytes) -> httpx.Response:
    return srv.client.post(path, content=raw, headers={"Content-Type": "application/json"})


def test_hostile_job_bodies_are_400_and_store_nothing(srv):
    before = _stored(srv)
    good = json.dumps(job_config(srv.storage, num_cpus=1))
    hostile = {
        "surrogate": good.replace('"save_strategy"', '"run_name": "\\ud800", "save_strategy"'),
        "nul": good.replace('"save_strategy"', '"run_name": "a\\u0000b", "save_strategy"'),
        "nan": good.replace('"learning_rate": 0.01', '"learning_rate": NaN'),
        "inf": good.replace('"learning_rate": 0.01', '"learning_rate": 1e999'),
        "big_priority": good[:-1] + ', "priority": 99999999999999999999}',
        "big_seed": good.replace('"save_strategy"', '"seed": 1' + "0" * 30 + ', "save_strategy"'),
    }
    for name, raw in hostile.items():
        for path in ("/v1/fine-tuning/jobs", "/v1/fine_tuning/jobs"):
            r = _post_raw(srv, path, raw.encode())
            assert r.status_code == 400, (name, r.text)
            assert r.json()["error"]["type"] == "invalid_request_error"
    assert _stored(srv) == before


def test_hostile_deploy_and_chat_bodies_are_400(srv):
    before = _stored(srv)
    for raw in (
        b'{"model": "tiny/llama", "keep_alive": Infinity}',
        b'{"model": "tiny/llama", "keep_alive": 1e999}',
        b'{"model": "tiny/llama", "queue_timeout": NaN}',
        b'{"model": "tiny/\\ud800"}',
        b'{"model": "tiny/llama", "lora_adapters": {"a\\u0000": "x"}}',
    ):
        _assert_error(_post_raw(srv, "/v1/deployments", raw), 400, "")
    for raw in (
        b'{"model": "tiny/llama", "messages": [{"role": "user", "content": "\\ud83d"}]}',
        b'{"model": "tiny/llama", "messages": [{"role": "user", "content": "hi"}], '
        b'"temperature": NaN}',
        b'{"model": "tiny/llama", "messages": [{"role": "user", "content": "hi"}], '
        b'"seed": 18446744073709551616}',
    ):
        _assert_error(_post_raw(srv, "/v1/chat/completions", raw), 400, "")
    assert _stored(srv) == before


def test_a_body_over_the_limit_is_413_and_stores_nothing(srv):
    before = _stored(srv)
    cfg = job_config(srv.storage, num_cpus=1)
    cfg["backend_config"]["training_config"]["run_name"] = "x" * 70_000
    r = srv.client.post("/v1/fine_tuning/jobs", json=cfg)
    _assert_error(r, 413, "65536 bytes")
    # streamed without a Content-Length: counted as it arrives
    chunks = (b'{"model": "' + b"m" * 10_000 for _ in range(10))
    r = srv.client.post(
        "/v1/deployments", content=chunks, headers={"Content-Type": "application/json"}
    )
    _assert_error(r, 413, "limit")
    assert _stored(srv) == before
    assert srv.client.get("/health").status_code == 200  # and the server is fine


def test_every_route_but_health_needs_the_key(srv):
    bare = httpx.Client(base_url=srv.url, timeout=30)
    assert bare.get("/health").status_code == 200
    for method, path in [
        ("GET", "/v1/models"),
        ("GET", "/v1/deployments"),
        ("GET", "/v1/fine_tuning/jobs"),
        ("GET", "/v1/fine-tuning/jobs/job-x"),
        ("POST", "/v1/fine_tuning/jobs"),
        ("POST", "/v1/chat/completions"),
        ("DELETE", "/v1/deployments/tiny/llama"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
    ]:
        r = bare.request(method, path)
        err = _assert_error(r, 401, "didn't provide an API key")
        assert err["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        r = bare.request(method, path, headers={"Authorization": "Bearer wrong"})
        _assert_error(r, 401, "Incorrect API key")
        r = bare.request(method, path, headers={"Authorization": f"Basic {KEY}"})
        assert r.status_code == 401
    assert srv.client.get("/v1/models").status_code == 200  # the fixture's client sends KEY


def test_the_openai_sdk_and_the_cli_use_the_key(srv):
    import openai

    good = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0)
    assert good.models.list().data == []
    bad = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert "No deployments" in srv.cli("status").stdout  # SLLM_API_KEY from the env
    out = srv.cli("status", "--api-key", "nope", check=False)
    assert out.returncode == 1 and "401" in out.stderr


def test_openapi_documents_the_real_errors(srv):
    schema = srv.client.get("/openapi.json").json()
    assert "ErrorResponse" in schema["components"]["schemas"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    submit = schema["paths"]["/v1/fine_tuning/jobs"]["post"]["responses"]
    assert {"400", "401", "409", "413"} <= set(submit) and "422" not in submit
    chat = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "401", "404", "413", "429", "503"} <= set(chat)
    for methods in schema["paths"].values():
        for op in methods.values():
            assert "422" not in op["responses"]


# --- start-up refusals ------------------------------------------------------------------------


def test_loopback_detection():
    for host in ("127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "192.168.1.2", "example.com"):
        assert not is_loopback(host), host
    assert refuse_open_server("127.0.0.1", [], False) is None
    assert refuse_open_server("0.0.0.0", ["k"], False) is None
    assert refuse_open_server("0.0.0.0", [], True) is None
    assert "--api-key" in refuse_open_server("0.0.0.0", [], False)


def test_start_on_a_public_address_without_a_key_refuses(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "SLLM_API_KEY"}
    out = subprocess.run(
        [sys.executable, "-m", "sllm.cli.main", "start", "--host", "0.0.0.0", "--port", "1"]
        + ["--storage-path", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 2
    assert "--api-key" in out.stderr and "--allow-unauthenticated" in out.stderr
    assert not (tmp_path / "sllm.db").exists()  # refused before anything was opened


# --- an unexpected error ----------------------------------------------------------------------


@pytest.fixture
def boom_server(tmp_path):
    """The real app on a loopback port, plus one route that fails the way a bug would."""
    import threading
    import time

    import uvicorn

    from sllm.api.app import create_app
    from sllm.config import Settings
    from sllm.testing import free_port

    app = create_app(Settings(storage_path=tmp_path / "store", num_cpus=1, num_gpus=0))

    @app.get("/boom")
    def boom() -> dict:
        raise RuntimeError("a bug")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 90
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(timeout=30)


def _read_response(sock) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head.split(b" ", 2)[1]), rest[:length]


def test_an_unexpected_error_is_a_whole_500_and_the_connection_stays_usable(boom_server):
    import socket

    with socket.create_connection(("127.0.0.1", boom_server), timeout=30) as sock:
        request = "GET {} HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n"
        sock.sendall(request.format("/boom").encode())
        status, body = _read_response(sock)
        assert status == 500
        err = json.loads(body)["error"]
        assert err["type"] == "internal_error" and "RuntimeError" in err["message"]
        assert "a bug" not in err["message"]  # no internals in the answer
        sock.sendall(request.format("/health").encode())  # the same connection
        status, body = _read_response(sock)
        assert status == 200 and json.loads(body)["status"] == "ok"


def test_config_strings_are_bounded(srv):
    before = _stored(srv)
    cfg = job_config(srv.storage, num_cpus=1)
    cfg["backend_config"]["training_config"]["run_name"] = "x" * 5000
    err = _assert_error(srv.client.post("/v1/fine_tuning/jobs", json=cfg), 400, "at most 4096")
    assert "training_config.run_name" in err["message"]
    cfg = job_config(srv.storage, num_cpus=1, output_dir="a/" + "b" * 300)
    _assert_error(srv.client.post("/v1/fine_tuning/jobs", json=cfg), 400, "longer than 255")
    assert _stored(srv) == before


def test_the_cli_refuses_numbers_json_cannot_carry(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "sllm.cli.main", "deploy", "--model", "m", "--keep-alive", "inf"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "finite" in out.stderr and "Traceback" not in out.stderr
    config = tmp_path / "dep.json"
    config.write_text('{"model": "m", "keep_alive": Infinity}')
    out = subprocess.run(
        [sys.executable, "-m", "sllm.cli.main", "deploy", "--config", str(config)]
        + ["--url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "cannot send" in out.stderr and "Traceback" not in out.stderr


def test_a_surrogate_stored_by_an_older_version_still_reads_back(srv):
    """Rows written before the edge refused them must not turn every read into a 500."""
    from sllm.jobs.db import JobStore
    from sllm.paths import db_path

    cfg = job_config(srv.storage, num_cpus=1)
    cfg["backend_config"]["training_config"]["run_name"] = "\ud800"
    store = JobStore(db_path(srv.storage))
    try:
        rec = store.create(
            model="tiny/llama", ft_backend="peft_lora", num_cpus=99, num_gpus=0, timeout=60,
            priority=0, config=cfg, backend_config=cfg["backend_config"],
        )  # fmt: skip
        store.transition(rec.id, JobStatusCancelled(), message="An old row.")
    finally:
        store.close()
    r = srv.client.get(f"/v1/fine_tuning/jobs/{rec.id}")
    assert r.status_code == 200, r.text
    assert r.json()["status"]["config"]["backend_config"]["training_config"]["run_name"]
    assert srv.client.get("/v1/fine_tuning/jobs").status_code == 200
    assert srv.client.get(f"/v1/fine_tuning/jobs/{rec.id}/events").status_code == 200


def JobStatusCancelled():  # noqa: N802 - reads like the enum member it returns
    from sllm.jobs.states import JobStatus

    return JobStatus.CANCELLED
