"""Metrics, the logs route, pending reasons, the job life in the server log and `sllm jobs`,
against one real server: real jobs (real training steps on the tiny model) and a real chat."""

from __future__ import annotations

import json
import re
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sllm.cli.main import main as sllm_main
from tests.conftest import TINY, job_config, stored_server, wait_for

pytestmark = pytest.mark.slow

LONG = {"num_train_epochs": 10000}
CHAT = {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
JOB = "/v1/fine_tuning/jobs/{fine_tuning_job_id}"
JOB_PATH = "/v1/fine_tuning/jobs"


def scrape(srv) -> dict[tuple[str, frozenset], float]:
    r = srv.client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_src):
    server = stored_server(
        tmp_path_factory.mktemp("obs"), tiny_model_src, "--num-cpus", "2", "--log-level", "info"
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def done_job(srv) -> dict:
    """A job that ran to completion (12 real training steps)."""
    r = srv.client.post("/v1/fine_tuning/jobs", json=job_config(srv.storage, output_dir="a/one"))
    assert r.status_code == 200, r.text
    job = srv.wait_status(r.json()["job_id"], {"completed", "failed"})
    assert job["status"]["status"] == "completed", job
    return job


def submit(srv, **overrides) -> str:
    r = srv.client.post("/v1/fine_tuning/jobs", json=job_config(srv.storage, **overrides))
    assert r.status_code == 200, r.text
    return r.json()["job_id"]


def test_metrics_move_with_a_real_job_and_a_real_chat(srv, done_job):
    before = scrape(srv)
    assert value(before, "sllm_fine_tuning_jobs", status="completed") >= 1
    assert (
        value(before, "sllm_fine_tuning_trained_tokens_total")
        >= (done_job["status"]["progress"]["trained_tokens"])
        > 0
    )
    assert value(before, "sllm_fine_tuning_queue_wait_seconds_count") >= 1
    assert (
        value(before, "sllm_resources", kind="cpu", state="free")
        + value(before, "sllm_resources", kind="cpu", state="held")
        == 2
    )
    ok = dict(method="GET", route=JOB, code="200")
    job_reads = value(before, "sllm_requests_total", **ok)
    assert job_reads >= 1  # wait_status polled it: counted by template, not by job id
    assert not any("job-" in dict(labels).get("route", "") for _, labels in before)
    assert srv.client.get("/v1/fine_tuning/jobs/job-nope").status_code == 404

    r = srv.client.post("/v1/deployments", json={"model": TINY, "keep_alive": 600})
    assert r.status_code == 200, r.text
    assert srv.client.post("/v1/chat/completions", json=CHAT).status_code == 200
    with srv.client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as s:
        assert s.status_code == 200 and "[DONE]" in s.read().decode()

    after = scrape(srv)
    chat = dict(route="/v1/chat/completions")
    assert value(after, "sllm_requests_total", method="POST", code="200", **chat) == 2
    assert value(after, "sllm_requests_total", method="GET", route=JOB, code="404") == 1
    assert value(after, "sllm_requests_total", **ok) == job_reads
    assert value(after, "sllm_time_to_first_token_seconds_count", **chat) == 2
    ttft = value(after, "sllm_time_to_first_token_seconds_sum", **chat)
    total = value(after, "sllm_request_duration_seconds_sum", method="POST", **chat)
    assert 0 < ttft <= total
    assert value(after, "sllm_cold_starts_total", model=TINY) == 1
    assert value(after, "sllm_instances", model=TINY, state="ready") == 1
    assert value(after, "sllm_resources", kind="cpu", state="held") >= 1  # the instance's CPU

    log = srv.log.read_text()
    assert "HTTP Request:" not in log  # loopback calls to the instance are DEBUG only
    r = srv.client.delete(f"/v1/deployments/{TINY}")
    assert r.status_code == 200, r.text


def test_the_server_logs_each_jobs_life_at_info(srv, done_job):
    job_id = done_job["id"]
    log = srv.log.read_text()
    assert re.search(rf"INFO sllm\.jobs\.service job {job_id} submitted: model {TINY}, 1 CPUs", log)
    assert re.search(rf"job {job_id} started: 1 CPUs, GPUs \[\], worker pid \d+, after", log)
    assert re.search(rf"job {job_id} completed after \d+\.\d s at step 12", log), log[-3000:]


def test_logs_route_tails_and_pages_the_worker_log(srv, done_job):
    c, job_id = srv.client, done_job["id"]
    whole = (srv.storage / "_jobs" / job_id / "worker.log").read_bytes()
    assert whole
    for spelling in ("fine-tuning", "fine_tuning"):
        body = c.get(f"/v1/{spelling}/jobs/{job_id}/logs").json()
        assert body["object"] == "fine_tuning.job.logs" and body["job_id"] == job_id
        assert body["size"] == body["next_offset"] == len(whole)
        assert whole.decode().endswith(body["text"]) and body["text"]
    last = c.get(f"/v1/fine_tuning/jobs/{job_id}/logs", params={"tail": 1}).json()
    assert last["text"].count("\n") <= 1 and whole.decode().endswith(last["text"])
    assert last["offset"] == len(whole) - len(last["text"].encode())

    text, offset = "", 0
    while True:
        page = c.get(f"/v1/fine_tuning/jobs/{job_id}/logs", params={"offset": offset, "limit": 700})
        page = page.json()
        assert page["offset"] == offset
        if page["next_offset"] == offset:
            break
        text, offset = text + page["text"], page["next_offset"]
    assert text.encode() == whole

    for params in (
        {"tail": 0},
        {"tail": 10_001},
        {"limit": 0},
        {"limit": 2**20 + 1},
        {"offset": -1},
        {"tail": 5, "offset": 0},
        {"tail": "many"},
    ):
        r = c.get(f"/v1/fine_tuning/jobs/{job_id}/logs", params=params)
        assert r.status_code == 400, (params, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = c.get("/v1/fine_tuning/jobs/job-nope/logs")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def wait_cpus_free(srv, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while value(scrape(srv), "sllm_resources", kind="cpu", state="held"):
        assert time.monotonic() < deadline, "CPUs still held"
        time.sleep(0.2)


def test_pending_jobs_say_why_they_wait(srv, done_job):
    c = srv.client
    wait_cpus_free(srv)
    runner = submit(srv, output_dir="a/long", training_config=LONG)
    srv.wait_status(runner, {"running"})
    first = submit(srv, output_dir="a/big", num_cpus=2)
    second = submit(srv, output_dir="a/big2", num_cpus=2)
    try:
        st = c.get(f"/v1/fine_tuning/jobs/{first}").json()["status"]
        assert st["status"] == "pending"
        assert st["pending_reason"] == "waiting for 2 CPUs: 1 free"
        st = c.get(f"/v1/fine_tuning/jobs/{second}").json()["status"]
        assert st["pending_reason"] == "waiting for 2 CPUs: 1 free; 1 job ahead"
        logs = c.get(f"/v1/fine_tuning/jobs/{second}/logs").json()  # no worker yet: no log
        assert (logs["text"], logs["size"], logs["offset"], logs["next_offset"]) == ("", 0, 0, 0)
        listed = {j["id"]: j["status"] for j in c.get("/v1/fine_tuning/jobs").json()["data"]}
        assert listed[second]["pending_reason"] == st["pending_reason"]
        assert listed[runner]["pending_reason"] is None  # running: no reason
        done = c.get(f"/v1/fine_tuning/jobs/{done_job['id']}").json()["status"]
        assert done["pending_reason"] is None
        samples = scrape(srv)
        assert value(samples, "sllm_fine_tuning_jobs", status="pending") == 2
        assert value(samples, "sllm_fine_tuning_jobs", status="running") == 1
        assert value(samples, "sllm_resources", kind="cpu", state="held") == 1
    finally:
        for job_id in (second, first, runner):
            c.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    st = c.get(f"/v1/fine_tuning/jobs/{first}").json()["status"]
    assert st["status"] == "cancelled" and st["pending_reason"] is None
    assert re.search(rf"job {first} cancelled while pending", srv.log.read_text())
    srv.wait_status(runner, {"cancelled"})


def test_sllm_jobs_commands(srv, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLM_SERVER_URL", srv.url)

    def sllm(*args: str) -> tuple[int, str, str]:
        rc = sllm_main(["jobs", *args])
        out = capsys.readouterr()
        return rc, out.out, out.err

    config = tmp_path / "job.json"
    config.write_text(json.dumps(job_config(srv.storage, output_dir="a/cli")))
    rc, out, _ = sllm("submit", str(config))
    job_id = out.strip()
    assert rc == 0 and job_id.startswith("job-"), out
    rc, out, _ = sllm("follow", job_id, "--interval", "0.2")
    assert rc == 0 and f"{job_id} completed: adapter at " in out, out
    rc, out, _ = sllm("list", "--status", "completed")
    assert rc == 0 and re.search(rf"{job_id}\s+completed\s+12/12\s+\d+\.\d+", out), out
    rc, out, _ = sllm("get", job_id, "--json")
    assert rc == 0 and json.loads(out)["status"]["progress"]["step"] == 12
    rc, out, _ = sllm("get", job_id)
    assert rc == 0 and "adapter_path:" in out and "completed" in out
    rc, out, _ = sllm("events", job_id)
    assert rc == 0 and "Job completed." in out and out.count("\n") >= 3
    rc, out, _ = sllm("logs", job_id, "--tail", "3")
    log = (srv.storage / "_jobs" / job_id / "worker.log").read_bytes().decode()  # keeps \r
    assert rc == 0 and out and log.endswith(out) and out.count("\n") <= 3

    timed_out = job_config(srv.storage, output_dir="a/slow", training_config=LONG, timeout=1)
    config.write_text(json.dumps(timed_out))
    rc, out, _ = sllm("submit", str(config))
    slow = out.strip()
    rc, out, _ = sllm("logs", slow, "--follow", "--interval", "0.2")
    assert rc == 1, out  # it failed (timeout): logs --follow exits by outcome too
    whole = (srv.storage / "_jobs" / slow / "worker.log").read_bytes().decode()  # progress bars' \r
    assert whole.endswith(out)
    rc, out, _ = sllm("follow", slow)
    assert rc == 1 and f"{slow} failed (timeout)" in out, out

    config.write_text(json.dumps(job_config(srv.storage, output_dir="a/c", training_config=LONG)))
    rc, out, _ = sllm("submit", str(config), "--priority", "5")
    gone = out.strip()
    rc, out, _ = sllm("cancel", gone)
    assert rc == 0 and out.strip() == f"{gone}: cancelled"
    rc, out, _ = sllm("follow", gone)
    assert rc == 2 and f"{gone} cancelled" in out
    assert srv.client.get(f"/v1/fine_tuning/jobs/{gone}").json()["status"]["priority"] == 5

    rc, _, err = sllm("follow", "job-nope")
    assert rc == 3 and "error (404)" in err
    rc, _, err = sllm("get", "job-nope")
    assert rc == 1 and "error (404)" in err
    config.write_text(json.dumps({"model": "no/such-model"}))
    rc, _, err = sllm("submit", str(config))
    assert rc == 1 and "error (400)" in err and "not in the store" in err


def test_trained_tokens_never_drop_while_a_real_job_pauses_and_resumes(srv):
    """A resumed job's progress restarts (empty, then from its checkpoint's count): the counter
    must not follow it down, and must count each token once, as its steps are not re-trained
    (a pause checkpoints at a step boundary)."""
    c = srv.client
    wait_cpus_free(srv)
    name = "sllm_fine_tuning_trained_tokens_total"
    seen = [value(scrape(srv), name)]
    job_id = submit(srv, output_dir="a/paused", training_config={"max_steps": 100000})

    def step() -> int:
        status = c.get(f"{JOB_PATH}/{job_id}").json()["status"]
        seen.append(value(scrape(srv), name))
        return (status.get("progress") or {}).get("step", 0)

    wait_for(lambda: step() >= 3, 120, "the job's first steps")
    assert c.post(f"{JOB_PATH}/{job_id}/pause").status_code == 200
    paused_at = srv.wait_status(job_id, {"paused"})["status"]["progress"]["step"]
    seen.append(value(scrape(srv), name))
    assert c.post(f"{JOB_PATH}/{job_id}/resume").status_code == 200
    seen.append(value(scrape(srv), name))  # the row's progress is empty now
    wait_for(lambda: step() >= paused_at + 3, 120, "steps after the resume")
    assert c.post(f"{JOB_PATH}/{job_id}/cancel").status_code == 200
    final = srv.wait_status(job_id, {"cancelled"})["status"]["progress"]
    seen.append(value(scrape(srv), name))
    assert seen == sorted(seen), seen
    events = c.get(f"{JOB_PATH}/{job_id}/events?limit=1000").json()["data"]
    assert any("Resuming from" in e["message"] for e in events), "it resumed from a checkpoint"
    assert seen[-1] - seen[0] == final["trained_tokens"] > 0
