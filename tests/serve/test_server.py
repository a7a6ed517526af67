"""Serving end to end: a real `sllm start`, real instance processes, adapters from real
fine-tuning (one job through the server with the seed's config, two runs of the backend), the
`sllm` CLI in subprocesses and the official `openai` client.

Tests share one server and run in file order (deploy, use, replace, delete, scale to zero).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_helpers import LLAMA, OPT, peft_generate

from sllm.serve.auth import auth_headers, instance_headers, secret_of

pytestmark = pytest.mark.slow

QUESTION = "Question: What is the capital of France? Answer:"
SEED_ADAPTER = "ft_facebook/opt-125m_adapter"


def complete(server, model, prompt=QUESTION, adapter=None, n=12, **extra) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, **extra}
    if adapter:
        body["lora_adapter_name"] = adapter
    r = server.client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def text_of(server, model, adapter=None, prompt=QUESTION, n=12) -> str:
    return complete(server, model, prompt, adapter, n)["choices"][0]["text"]


def instance_health(server, model) -> dict:
    inst = server.deployment(model)["instances"][0]
    headers = instance_headers(inst["pid"])
    return httpx.get(f"http://127.0.0.1:{inst['port']}/health", headers=headers, timeout=10).json()


def assert_error(r: httpx.Response, status: int, type_: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    if type_:
        assert err["type"] == type_
    return err


def test_seed_commands_deploy_and_chat(world):
    srv = world.server
    assert world.job["status"]["adapter_path"].endswith(SEED_ADAPTER)
    out = srv.cli(
        "deploy", "--model", OPT, "--backend", "transformers", "--enable-lora",
        "--lora-adapters", f"my_adapter={SEED_ADAPTER}",
    )  # fmt: skip
    assert "Deployed facebook/opt-125m" in out.stdout and "my_adapter" in out.stdout
    r = srv.client.post(  # the seed's curl, byte for byte
        "/v1/chat/completions",
        json={
            "model": OPT,
            "messages": [{"role": "user", "content": "Hello, how are you?"}],
            "lora_adapter_name": "my_adapter",
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == OPT
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def test_an_instance_port_answers_only_its_server(world):
    (inst,) = world.server.deployment(OPT)["instances"]
    url = f"http://127.0.0.1:{inst['port']}"
    secret = secret_of(inst["pid"])
    assert secret not in open(f"/proc/{inst['pid']}/cmdline").read()  # not visible in `ps`
    body = {"prompt": "Hello", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer guess"}, {"Authorization": secret}):
        assert_error(httpx.get(f"{url}/health", headers=headers), 401, "authentication_error")
        r = httpx.post(f"{url}/generate", json=body, headers=headers)
        assert_error(r, 401, "authentication_error")
    good = httpx.get(f"{url}/health", headers=auth_headers(secret), timeout=10)
    assert good.status_code == 200 and "my_adapter" in good.json()["adapters"]
    assert text_of(world.server, OPT, "my_adapter")  # the server itself still gets through


def test_models_list_shows_adapters_with_parent(world):
    from openai import OpenAI

    client = OpenAI(base_url=f"{world.server.url}/v1", api_key="unused")
    models = {m.id: m for m in client.models.list().data}
    assert models[OPT].parent is None
    assert models["my_adapter"].parent == OPT and models["my_adapter"].root == SEED_ADAPTER
    raw = world.server.client.get("/v1/models").json()
    assert raw["object"] == "list" and all(m["object"] == "model" for m in raw["data"])


def test_answers_equal_peft_and_adapters_change_them(world):
    srv, storage = world.server, world.storage
    base = text_of(srv, OPT)
    tuned = text_of(srv, OPT, "my_adapter")
    assert text_of(srv, "my_adapter") == tuned  # the adapter's name in `model`, as in vLLM
    assert base != tuned
    assert base == peft_generate(storage, OPT, None, QUESTION, 12)
    seed_adapter = storage / "transformers" / SEED_ADAPTER
    assert tuned == peft_generate(storage, OPT, seed_adapter, QUESTION, 12)
    middle = len(tuned) // 2
    stop = tuned[middle : middle + 2]
    cut = complete(srv, OPT, adapter="my_adapter", stop=[stop])["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == tuned[: tuned.index(stop)]
    sampled = [complete(srv, OPT, temperature=1.0, top_p=0.9, seed=s) for s in (5, 5, 6)]
    texts = [c["choices"][0]["text"] for c in sampled]
    assert texts[0] == texts[1]  # a seed makes sampling reproducible
    # chat without a chat template uses the documented fallback transcript
    chat = srv.client.post(
        "/v1/chat/completions",
        json={
            "model": OPT,
            "messages": [{"role": "user", "content": "Hello, how are you?"}],
            "lora_adapter_name": "my_adapter",
            "max_tokens": 10,
            "temperature": 0,
        },
    ).json()
    expected = peft_generate(
        storage, OPT, storage / "transformers" / SEED_ADAPTER,
        "User: Hello, how are you?\nAssistant:", 10,
    )  # fmt: skip
    assert chat["choices"][0]["message"]["content"] == expected


def test_streaming_with_the_openai_client(world):
    from openai import OpenAI

    client = OpenAI(base_url=f"{world.server.url}/v1", api_key="unused")
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    whole = client.chat.completions.create(
        model=OPT, messages=messages, max_tokens=16, temperature=0,
        extra_body={"lora_adapter_name": "my_adapter"},
    )  # fmt: skip
    chunks = list(
        client.chat.completions.create(
            model=OPT, messages=messages, max_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True},
            extra_body={"lora_adapter_name": "my_adapter"},
        )
    )  # fmt: skip
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    finals = [f for f in finals if f]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # text completions stream too, ending with [DONE]
    body = {"model": OPT, "prompt": QUESTION, "max_tokens": 8, "temperature": 0, "stream": True}
    with world.server.client.stream("POST", "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    parts = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(p["choices"][0]["text"] for p in parts) == text_of(world.server, OPT, n=8)


def test_mixed_adapter_batch_equals_one_by_one(world):
    srv = world.server
    srv.cli("deploy", "--model", OPT, "--lora-adapters", "b=adapters/b")
    prompts = [QUESTION, "Hello, how are you?", "Write a short poem about the sea", "Arr"]
    jobs = [(p, a) for p in prompts for a in (None, "my_adapter", "b")]
    alone = [text_of(srv, OPT, a, p, 16) for p, a in jobs]
    before = instance_health(srv, OPT)["stats"]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda j: text_of(srv, OPT, j[1], j[0], 16), jobs))
    after = instance_health(srv, OPT)["stats"]
    assert together == alone
    assert after["mixed_steps"] > before["mixed_steps"]  # rows of different adapters, one step
    assert after["max_rows"] >= 3


def test_redeploy_replaces_an_adapter_without_restart(world):
    srv, storage = world.server, world.storage
    pid = srv.deployment(OPT)["instances"][0]["pid"]
    srv.cli("deploy", "--model", OPT, "--lora-adapters", "swap=adapters/b")
    old = text_of(srv, OPT, "swap")
    assert old == text_of(srv, OPT, "b")
    srv.cli("deploy", "--model", OPT, "--lora-adapters", "swap=adapters/c")
    new = text_of(srv, OPT, "swap")  # the very next request
    assert new == peft_generate(storage, OPT, storage / "transformers/adapters/c", QUESTION, 12)
    assert new != old
    status = srv.deployment(OPT)
    assert status["instances"][0]["pid"] == pid  # same instance: no restart
    assert {a["name"]: a["path"] for a in status["adapters"]}["swap"] == "adapters/c"


def test_delete_adapters_then_the_deployment(world):
    srv = world.server
    out = srv.cli("delete", OPT, "--lora-adapters", "swap b")
    assert "Deleted adapters swap, b" in out.stdout
    body = {"model": OPT, "prompt": "x", "lora_adapter_name": "b"}
    r = srv.client.post("/v1/completions", json=body)
    assert_error(r, 404, "not_found_error")
    names = {m["id"] for m in srv.client.get("/v1/models").json()["data"]}
    assert "b" not in names and "swap" not in names and "my_adapter" in names
    assert "b" not in instance_health(srv, OPT)["adapters"]
    pid = srv.deployment(OPT)["instances"][0]["pid"]
    srv.cli("delete", OPT)
    assert_error(srv.client.post("/v1/completions", json={"model": OPT, "prompt": "x"}), 404)
    assert OPT not in srv.cli("status").stdout
    assert not _alive(pid)


def test_cold_start_then_scale_to_zero(world):
    srv = world.server
    config = world.storage / "llama_deploy.json"  # ServerlessLLM's config shape
    # keep_alive leaves time for `sllm status` (a fresh CLI process) on a loaded machine
    scaling = {"metric": "concurrency", "target": 4, "min_instances": 0, "keep_alive": 6}
    config.write_text(json.dumps({"model": LLAMA, "auto_scaling_config": scaling}))
    srv.cli("deploy", "--config", str(config), "--backend", "transformers")
    assert srv.deployment(LLAMA)["config"]["target_concurrency"] == 4
    assert "tiny/llama  state=cold  instances=0" in srv.cli("status").stdout
    t0 = time.monotonic()
    chat = srv.client.post(
        "/v1/chat/completions",
        json={"model": LLAMA, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    )
    assert chat.status_code == 200, chat.text
    cold = time.monotonic() - t0
    status = srv.cli("status", LLAMA).stdout
    assert "state=warm  instances=1" in status and " ready " in status, status
    pid = srv.deployment(LLAMA)["instances"][0]["pid"]
    assert _alive(pid)
    t1 = time.monotonic()
    warm = srv.client.post("/v1/completions", json={"model": LLAMA, "prompt": "Hi"})
    assert warm.status_code == 200
    assert time.monotonic() - t1 < cold  # warm: no model load
    deadline = time.monotonic() + 30
    while "instances=0" not in (status := srv.cli("status", LLAMA).stdout):
        assert time.monotonic() < deadline, status
        time.sleep(0.3)
    assert "state=cold" in status
    assert not _alive(pid)  # the instance exited and freed its memory
    assert srv.client.get("/health").status_code == 200


def test_http_errors_are_openai_shaped(world):
    c = world.server.client
    msgs = [{"role": "user", "content": "Hi"}]
    assert_error(c.post("/v1/chat/completions", json={"model": "nope", "messages": msgs}), 404)
    bad_adapter = {"model": LLAMA, "messages": msgs, "lora_adapter_name": "nope"}
    assert_error(c.post("/v1/chat/completions", json=bad_adapter), 404, "not_found_error")
    for body in (
        {"model": LLAMA, "messages": msgs, "n": 2},
        {"model": LLAMA},
        {"model": LLAMA, "messages": msgs, "temperature": 5},
        {"model": LLAMA, "messages": msgs, "stop": ["a", "b", "c", "d", "e"]},
        {"model": LLAMA, "prompt": "x"},
    ):
        assert_error(c.post("/v1/chat/completions", json=body), 400, "invalid_request_error")
    assert_error(c.post("/v1/completions", json={"model": LLAMA, "prompt": ["a", "b"]}), 400)
    json_header = {"content-type": "application/json"}
    r = c.post("/v1/chat/completions", content=b"{not json", headers=json_header)
    assert_error(r, 400)
    long_prompt = {"model": LLAMA, "prompt": "Hello " * 600, "stream": True}
    assert_error(c.post("/v1/completions", json=long_prompt), 400)  # before the stream starts
    assert_error(c.post("/v1/deployments", json={"model": LLAMA, "max_instances": 0}), 400)
    assert_error(c.delete("/v1/deployments/nope"), 404)


def test_hostile_numbers_are_400_and_a_degenerate_row_hurts_no_one(world):
    c = world.server.client

    def post(path: str, body: dict) -> httpx.Response:  # json.dumps writes Infinity and NaN
        headers = {"content-type": "application/json"}
        return c.post(path, content=json.dumps(body), headers=headers)

    before = world.server.deployment(LLAMA)["config"]
    for bad in ({"keep_alive": float("inf")}, {"queue_timeout": float("nan")}, {"num_cpus": 2**64}):
        err = assert_error(post("/v1/deployments", {"model": LLAMA, **bad}), 400)
        assert err["param"] == next(iter(bad))
    assert world.server.deployment(LLAMA)["config"] == before  # nothing was stored
    msgs = [{"role": "user", "content": "Hi"}]
    for bad in ({"temperature": float("inf")}, {"seed": 2**64}, {"max_tokens": 10**9}):
        body = {"model": LLAMA, "messages": msgs, **bad}
        assert assert_error(post("/v1/chat/completions", body), 400)["param"] == next(iter(bad))
    greedy = {"model": LLAMA, "prompt": "Hello", "max_tokens": 24, "temperature": 0}
    alone = c.post("/v1/completions", json=greedy).json()["choices"][0]["text"]
    tiny_t = {**greedy, "temperature": 1e-300, "seed": 1}
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda b: c.post("/v1/completions", json=b), [greedy, tiny_t] * 2))
    assert [r.status_code for r in results] == [200] * 4, [r.text for r in results]
    assert {r.json()["choices"][0]["text"] for r in results} == {alone}  # 1e-300 is greedy


def test_overload_is_429_with_retry_after(world):
    srv = world.server
    srv.cli("deploy", "--model", LLAMA, "--target", "1", "--max-queue", "0", "--max-instances", "1")
    body = {"model": LLAMA, "prompt": "Hello", "max_tokens": 300, "temperature": 0}
    warm = srv.client.post("/v1/completions", json=body).json()
    assert warm["usage"]["completion_tokens"] == 300  # so the first request holds its slot
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: srv.client.post("/v1/completions", json=body), range(3)))
    codes = sorted(r.status_code for r in results)
    assert codes[0] == 200 and 429 in codes, codes
    rejected = next(r for r in results if r.status_code == 429)
    assert int(rejected.headers["Retry-After"]) >= 1
    assert_error(rejected, 429, "rate_limit_error")


def test_disconnects_cancel_and_crashes_are_reported_in_the_stream(world):
    import os
    import signal

    srv = world.server
    srv.cli("deploy", "--model", LLAMA, "--keep-alive", "60")  # no reaping during the test
    body = {"model": LLAMA, "prompt": "Hello", "max_tokens": 300, "temperature": 0, "stream": True}
    with srv.client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the client leaves after the first chunk
    wait = time.monotonic() + 10
    while (
        srv.deployment(LLAMA)["instances"][0]["in_flight"]
        or instance_health(srv, LLAMA)["in_flight"]
    ):
        assert time.monotonic() < wait, "the abandoned request was not cancelled"
        time.sleep(0.05)

    (instance,) = srv.deployment(LLAMA)["instances"]
    assert instance["state"] == "ready"
    pid = instance["pid"]
    with srv.client.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        os.kill(pid, signal.SIGKILL)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["error"]["type"] == "instance_error"
    deadline = time.monotonic() + 10
    while srv.deployment(LLAMA)["instances"]:
        assert time.monotonic() < deadline, "the dead instance is still listed"
        time.sleep(0.1)
    assert "exited" in srv.deployment(LLAMA)["last_error"]
    body["stream"] = False
    assert srv.client.post("/v1/completions", json=body).status_code == 200  # a new instance


def test_cli_failures_exit_nonzero_with_the_servers_message(world):
    srv = world.server
    cases = [
        (("deploy", "--model", "no/such-model"), "not in the store"),
        (("deploy", "--model", OPT, "--enable-lora", "--lora-adapters", "x=../../etc"), "escapes"),
        (("deploy", "--model", OPT, "--enable-lora", "--lora-adapters", "x=/etc"), "outside"),
        (("deploy", "--model", OPT, "--enable-lora", "--lora-adapters", "x=ads/zz"), "no adapter"),
        (("deploy", "--model", OPT, "--lora-adapters", "x=adapters/b"), "enable_lora"),
        (("deploy", "--model", LLAMA, "--enable-lora", "--lora-adapters", "x=adapters/b"),
         "not trained"),
        (("deploy", "--model", OPT, "--lora-adapters", "oops"), "NAME=PATH"),
        (("delete", "nope"), "not deployed"),
        (("status", "nope"), "not deployed"),
    ]  # fmt: skip
    for args, message in cases:
        out = srv.cli(*args, check=False)
        assert out.returncode != 0, (args, out.stdout)
        assert message in out.stderr, (args, out.stderr)
    out = srv.cli("status", check=False)
    assert out.returncode == 0
    dead = srv.cli("status", "--url", "http://127.0.0.1:9", check=False)
    assert dead.returncode != 0 and "cannot reach" in dead.stderr


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"
