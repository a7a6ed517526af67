"""Hostile and unlucky inputs to the serving services, called directly (no HTTP edge in front):
wire models refuse what they cannot hold, nothing bad is stored, a diverged adapter is never
deployed, and an instance answers only the server that holds its secret."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError
from serve_helpers import make_random_adapter, nan_copy

from sllm.errors import InvalidRequestError
from sllm.serve.fields import MAX_SEED, MAX_TOKENS
from sllm.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DeploymentConfig,
    DeployRequest,
)
from tests.conftest import TINY

MSGS = [{"role": "user", "content": "Hi"}]


def refused(cls, field: str, **body) -> str:
    """The validation message of `cls(**body)`, which must name `field`."""
    with pytest.raises(ValidationError) as info:
        cls.model_validate(body)
    errors = info.value.errors()
    assert any(str(e["loc"][0]) == field for e in errors), errors
    return str(info.value)


# --- wire models ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", -math.inf),
        ("temperature", True),
        ("temperature", "0.5"),
        ("temperature", 2.5),
        ("top_p", math.nan),
        ("top_p", 0.0),
        ("presence_penalty", math.nan),
        ("frequency_penalty", math.inf),
        ("seed", -1),
        ("seed", MAX_SEED + 1),
        ("seed", 2**200),
        ("seed", 1.5),
        ("max_tokens", MAX_TOKENS + 1),
        ("max_tokens", 0),
        ("max_completion_tokens", 10**30),
        ("stop", "x" * 257),
        ("stop", ["ok", "\ud800"]),
        ("stop", "\x00"),
        ("model", "m" * 300),
        ("model", "a\x00b"),
        ("model", "\ud800"),
        ("model", "_jobs/job-1"),
        ("model", "x/.tmp-1-ab-host"),
        ("lora_adapter_name", "a b"),
        ("lora_adapter_name", "a\nb"),
        ("lora_adapter_name", "x" * 200),
    ],
)
def test_sampling_fields_refuse_what_they_cannot_hold(field, value):
    body = {"model": "tiny/llama", "messages": MSGS, field: value}
    refused(ChatCompletionRequest, field, **body)
    if field != "max_completion_tokens":
        refused(CompletionRequest, field, **{**body, "prompt": "x", "messages": None})


def test_json_non_finite_numbers_are_refused_not_parsed_as_inf():
    for raw in ("NaN", "Infinity", "-Infinity", "1e999"):
        body = '{"model": "m", "messages": [{"role": "user", "content": "x"}], '
        body += f'"temperature": {raw}}}'
        with pytest.raises(ValidationError, match="temperature"):
            ChatCompletionRequest.model_validate_json(body)


def test_free_text_must_be_valid_unicode_without_nul():
    refused(CompletionRequest, "prompt", model="m", prompt="a\ud800b")
    refused(CompletionRequest, "prompt", model="m", prompt=["nul\x00"])
    refused(
        ChatCompletionRequest,
        "messages",
        model="m",
        messages=[{"role": "user", "content": "\udfff"}],
    )  # noqa: E501
    parts = [{"type": "text", "text": "a\x00"}]
    refused(
        ChatCompletionRequest, "messages", model="m", messages=[{"role": "user", "content": parts}]
    )  # noqa: E501
    ok = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "tab\tnew\nline"}])
    assert ok.temperature == 1.0 and ok.seed is None
    fine = ChatCompletionRequest(model="m", messages=MSGS, seed=MAX_SEED, temperature=0, top_p=1)
    assert fine.seed == MAX_SEED and fine.temperature == 0.0


@pytest.mark.parametrize(
    "field, value",
    [
        ("keep_alive", math.inf),
        ("keep_alive", math.nan),
        ("keep_alive", -1.0),
        ("keep_alive", 1e12),
        ("queue_timeout", math.inf),
        ("queue_timeout", 0),
        ("num_cpus", 2**63),
        ("num_gpus", 10**9),
        ("max_instances", 10**6),
        ("min_instances", -1),
        ("target_concurrency", 2**40),
        ("max_queue", 10**12),
        ("model", "bad\x7fname"),
        ("model", ".hidden/model"),
        ("model", "a//b"),
        ("model", "/etc/passwd"),
        ("lora_adapters", {"a": "_jobs/job-1/trainer"}),
        ("lora_adapters", {"a": "adapters/.tmp-123-ab-host"}),
        ("lora_adapters", {"a": "ok/../.lock"}),
        ("lora_adapters", {"a": "x\x00y"}),
        ("lora_adapters", {"a": "p" * 2000}),
        ("lora_adapters", {"a b": "adapters/x"}),
        ("lora_adapters", {"__base__": "adapters/x"}),
        ("lora_adapters", {f"a{i}": "adapters/x" for i in range(65)}),
    ],
)
def test_deploy_request_refuses_what_it_cannot_hold(field, value):
    refused(DeployRequest, field, **{"model": TINY, field: value})


def test_deploy_request_json_infinity_is_a_refusal_not_null():
    for raw in ("Infinity", "NaN", "1e999"):
        with pytest.raises(ValidationError, match="keep_alive"):
            DeployRequest.model_validate_json(f'{{"model": "{TINY}", "keep_alive": {raw}}}')
    ok = DeployRequest.model_validate_json(f'{{"model": "{TINY}", "keep_alive": 5}}')
    assert ok.keep_alive == 5.0


# --- the registry never stores null for a number -----------------------------------------------


def test_registry_refuses_non_finite_and_repairs_old_nulls(tmp_path):
    from sllm.serve.registry import DeploymentRegistry

    reg = DeploymentRegistry(tmp_path / "sllm.db")
    try:
        good = DeploymentConfig(model=TINY, keep_alive=5.0)
        reg.save(good, 1.0)
        (raw,) = reg._conn.execute("SELECT config FROM deployments").fetchone()
        assert "null" not in raw and json.loads(raw)["keep_alive"] == 5.0
        bad = good.model_copy(update={"keep_alive": math.inf})  # bypasses validation
        with pytest.raises(ValidationError, match="keep_alive"):
            reg.save(bad, 1.0)
        with pytest.raises(ValidationError):
            good.keep_alive = math.nan  # assignment is validated too
        (raw,) = reg._conn.execute("SELECT config FROM deployments").fetchone()
        assert json.loads(raw)["keep_alive"] == 5.0  # nothing was overwritten
        # a row an older version wrote for `keep_alive: Infinity` comes back, with the default
        old = {**json.loads(raw), "model": "old/model", "keep_alive": None, "queue_timeout": None}
        reg._conn.execute(
            "INSERT INTO deployments VALUES (?, ?, ?, ?)", ("old/model", json.dumps(old), 2.0, 2.0)
        )
        loaded = {c.model: c for c, _ in reg.load()}
        assert loaded["old/model"].keep_alive == 60.0 and loaded["old/model"].queue_timeout == 60.0
        assert loaded[TINY].keep_alive == 5.0
    finally:
        reg.close()


# --- deploying refuses a diverged adapter, and store-internal paths ------------------------------


@pytest.fixture
def service(storage):
    from sllm.jobs.resources import ResourcePool
    from sllm.serve.deployments import DeploymentService
    from sllm.serve.registry import DeploymentRegistry

    base = storage / "transformers" / TINY
    make_random_adapter(base, storage / "transformers" / "adapters" / "good", seed=1)
    nan_copy(storage / "transformers/adapters/good", storage / "transformers/adapters/nan")
    registry = DeploymentRegistry(storage / "sllm.db")
    svc = DeploymentService(storage, ResourcePool(2, []), registry=registry)
    yield svc
    svc.stop()


def stored_rows(svc) -> list:
    return svc._registry._conn.execute("SELECT model, config FROM deployments").fetchall()


def test_a_nan_adapter_is_refused_at_deploy_and_nothing_is_stored(service):
    req = DeployRequest(model=TINY, enable_lora=True, lora_adapters={"bad": "adapters/nan"})
    with pytest.raises(InvalidRequestError) as info:
        service.deploy(req)
    assert info.value.param == "lora_adapters.bad"
    assert "`lora_adapters.bad`" in info.value.message and "non-finite" in info.value.message
    assert stored_rows(service) == [] and service.status().data == []
    ok = service.deploy(
        DeployRequest(model=TINY, enable_lora=True, lora_adapters={"g": "adapters/good"})
    )  # noqa: E501
    assert [a.name for a in ok.adapters] == ["g"]
    with pytest.raises(InvalidRequestError, match="non-finite"):  # nor added to a deployment
        service.deploy(DeployRequest(model=TINY, lora_adapters={"bad": "adapters/nan"}))
    (row,) = stored_rows(service)
    assert json.loads(row[1])["lora_adapters"] == {"g": "adapters/good"}


def test_absolute_or_linked_paths_into_store_internals_are_refused(service, storage):
    root = storage / "transformers"
    scratch = root / ".tmp-1-ab-host"
    (root / "adapters" / "good").rename(scratch)
    (root / "adapters" / "link").symlink_to(scratch)
    for path in (str(scratch), "adapters/link"):
        req = DeployRequest(model=TINY, enable_lora=True, lora_adapters={"x": path})
        with pytest.raises(InvalidRequestError, match="starts with '.'") as info:
            service.deploy(req)
        assert info.value.param == "lora_adapters.x"
    assert stored_rows(service) == []


# --- the instance's own port takes only its server's secret ------------------------------------


@pytest.fixture(scope="module")
def instance_app(tmp_path_factory):
    from fastapi.testclient import TestClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sllm.serve.auth import new_secret
    from sllm.serve.engine import Engine
    from sllm.serve.instance import create_instance_app
    from sllm.testing import make_tiny_model_dir

    base = make_tiny_model_dir(tmp_path_factory.mktemp("inst") / "base")
    tok = AutoTokenizer.from_pretrained(base)
    engine = Engine(AutoModelForCausalLM.from_pretrained(base), tok, max_batch_size=2).start()
    secret = new_secret()
    with TestClient(create_instance_app(engine, "tiny", secret)) as client:
        yield client, secret
    engine.close()


def test_an_instance_refuses_requests_without_its_secret(instance_app):
    from sllm.serve.auth import auth_headers, new_secret

    client, secret = instance_app
    body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0}
    for headers in ({}, auth_headers(new_secret()), {"Authorization": secret}):
        for method, path, kw in (
            ("GET", "/health", {}),
            ("POST", "/generate", {"json": body}),
            ("POST", "/adapters", {"json": {"name": "a", "path": "/etc"}}),
            ("DELETE", "/adapters/a", {}),
        ):
            r = client.request(method, path, headers=headers, **kw)
            assert r.status_code == 401, (method, path, r.text)
            assert r.json()["error"]["type"] == "authentication_error"
    assert client.get("/health", headers=auth_headers(secret)).json()["status"] == "ok"
    r = client.post("/generate", json=body, headers=auth_headers(secret))
    events = [json.loads(line) for line in r.text.splitlines()]
    assert r.status_code == 200 and events[-1]["type"] == "done"


def test_an_instance_refuses_bad_generate_bodies(instance_app):
    from sllm.serve.auth import auth_headers

    client, secret = instance_app
    for extra in ({"temperature": 1e999}, {"seed": -5}, {"max_tokens": 10**9}, {"stop": ["\x00"]}):
        body = {"prompt": "Hello", **extra}
        r = client.post("/generate", content=json.dumps(body), headers=auth_headers(secret))
        assert r.status_code == 400, r.text


def test_an_instance_without_a_secret_does_not_start(monkeypatch):
    from sllm.serve.auth import SECRET_ENV, take_secret_from_env

    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(SystemExit, match=SECRET_ENV):
        take_secret_from_env()
    monkeypatch.setenv(SECRET_ENV, "short")
    with pytest.raises(SystemExit):
        take_secret_from_env()


def test_the_secret_travels_in_the_environment_not_the_command_line(tmp_path):
    from sllm.jobs.resources import Allocation
    from sllm.serve.process import InstanceProcess, instance_args

    proc = InstanceProcess(tmp_path, "x")
    other = InstanceProcess(tmp_path, "y")
    assert len(proc.secret) >= 32 and proc.secret != other.secret
    args = instance_args(tmp_path, "m", proc.ready_file, Allocation("o", 1, ()), 8, "auto")
    assert not any(proc.secret in a for a in args)


def test_only_the_same_user_tools_can_read_an_instance_secret():
    import os
    import subprocess
    import sys

    from sllm.serve.auth import SECRET_ENV, new_secret, secret_of

    secret = new_secret()
    env = {**os.environ, SECRET_ENV: secret}
    code = "import time; print('up', flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"up\n"  # exec'd: /proc shows its own environment
        assert secret_of(child.pid) == secret
        assert secret not in open(f"/proc/{child.pid}/cmdline").read()
        assert oct(os.stat(f"/proc/{child.pid}/environ").st_mode & 0o777) == "0o400"
    finally:
        child.kill()
        child.wait()
    if SECRET_ENV not in open(f"/proc/{os.getpid()}/environ", "rb").read().decode(errors="replace"):
        with pytest.raises(LookupError):
            secret_of(os.getpid())


def test_a_merge_with_an_invalid_stored_config_is_a_400_not_a_crash(service):
    service.deploy(DeployRequest(model=TINY))
    dep = service._deps[TINY]
    dep.config = DeploymentConfig.model_construct(**{**dep.config.model_dump(), "keep_alive": -1.0})
    with pytest.raises(InvalidRequestError, match="keep_alive") as info:
        service.deploy(DeployRequest(model=TINY, max_instances=2))
    assert info.value.param == "keep_alive"
    service.deploy(DeployRequest(model=TINY, keep_alive=3))  # setting it again repairs it
    assert service.status(TINY).data[0].config.keep_alive == 3.0
