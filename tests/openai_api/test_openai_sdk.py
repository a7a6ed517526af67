"""The OpenAI Python SDK, unchanged, drives fine-tuning on a real server: upload, create, poll,
events, checkpoints, chat with the fine-tuned model and a checkpoint (no deploy), delete it,
cancel, pause and resume; the same jobs read back through the seed's `/v1`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from openai import AuthenticationError, BadRequestError, ConflictError, NotFoundError, OpenAI

from sllm.openai.names import parse_fine_tuned_model
from tests.openai_api.conftest import KEY, text_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(api_server) -> OpenAI:
    return OpenAI(base_url=f"{api_server.url}/openai/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def training_file(client) -> str:
    return client.files.create(file=("train.jsonl", text_rows(24)), purpose="fine-tune").id


def wait(client, job_id: str, statuses: set[str], timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.2)
    raise AssertionError(f"{job_id} never reached {statuses}: {job}")


def test_create_poll_events_checkpoints(client, api_server, training_file):
    job = client.fine_tuning.jobs.create(
        model="tiny/llama",
        training_file=training_file,
        suffix="pirate",
        seed=7,
        metadata={"team": "deck"},
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}},
        },
    )
    assert job.object == "fine_tuning.job" and job.status in ("queued", "running")
    assert job.training_file == training_file and job.fine_tuned_model is None
    hp = job.method.supervised.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (2, 4, 1.0)
    assert job.seed == 7 and job.suffix == "pirate" and job.metadata == {"team": "deck"}

    done = wait(client, job.id, {"succeeded", "failed"})
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:tiny/llama:pirate:{job.id}"
    assert parse_fine_tuned_model(done.fine_tuned_model) == (job.id, None)
    assert done.trained_tokens and done.trained_tokens > 0
    assert done.finished_at >= done.created_at

    events = client.fine_tuning.jobs.list_events(job.id, limit=200).data
    ids = [int(e.id.removeprefix("ftevent-")) for e in events]
    assert ids == sorted(ids, reverse=True)  # newest first, as OpenAI lists them
    metrics = [e for e in events if e.type == "metrics"]
    assert len(metrics) == 12 and metrics[0].data["step"] == 12  # 24 rows / 4 x 2 epochs
    assert isinstance(metrics[0].data["train_loss"], float)
    assert {e.type for e in events} == {"message", "metrics"}
    page = client.fine_tuning.jobs.list_events(job.id, limit=3, after=events[2].id)
    assert [e.id for e in page.data] == [e.id for e in events[3:6]]

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [12, 6]  # one per epoch; 12 is the final
    for c in checkpoints:
        assert (
            c.fine_tuned_model_checkpoint
            == f"ft:tiny/llama:pirate:{job.id}:ckpt-step-{c.step_number}"
        )
        assert parse_fine_tuned_model(c.fine_tuned_model_checkpoint) == (job.id, c.step_number)
        assert isinstance(c.metrics.train_loss, float) and c.metrics.step == c.step_number
    seed_view = api_server.client.get(f"/v1/fine_tuning/jobs/{job.id}").json()
    assert seed_view["status"]["status"] == "completed"
    adapter = Path(seed_view["status"]["adapter_path"])
    assert (adapter / "adapter_model.safetensors").is_file()
    for step in (6, 12):
        ckpt = adapter / "checkpoints" / f"step-{step}"
        assert (ckpt / "adapter_model.safetensors").is_file()
        assert json.loads((ckpt / "metrics.json").read_text())["step_number"] == step
    assert not (api_server.storage / "_jobs" / job.id / "epochs").exists()  # moved, not kept
    listed = client.fine_tuning.jobs.list(limit=50)
    assert job.id in [j.id for j in listed.data]
    tagged = client.fine_tuning.jobs.list(metadata={"team": "deck"})
    assert [j.id for j in tagged.data] == [job.id]
    assert client.fine_tuning.jobs.list(metadata={"team": "other"}).data == []

    # The fine-tuned model and a checkpoint answer at once, with no deploy (scale from zero).
    ask = [{"role": "user", "content": "Question 3: how are you?"}]
    for name in (done.fine_tuned_model, checkpoints[-1].fine_tuned_model_checkpoint):
        reply = client.chat.completions.create(model=name, messages=ask, max_tokens=4)
        assert reply.model == name and reply.choices[0].message.content is not None
    models = {m.id: m for m in client.models.list().data}
    assert models[done.fine_tuned_model].parent == "tiny/llama"
    deleted = client.models.delete(done.fine_tuned_model)
    assert deleted.deleted and deleted.id == done.fine_tuned_model
    with pytest.raises(NotFoundError) as gone:
        client.chat.completions.create(model=done.fine_tuned_model, messages=ask, max_tokens=4)
    assert gone.value.code == "model_not_found"
    with pytest.raises(NotFoundError) as again:
        client.models.delete(done.fine_tuned_model)
    assert again.value.code == "model_not_found"
    assert not adapter.exists()


def test_cancel_pause_resume(client, api_server, training_file):
    long = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50}}}
    job = client.fine_tuning.jobs.create(
        model="tiny/llama", training_file=training_file, method=long
    )
    wait(client, job.id, {"running"})
    step = _wait_step(api_server, job.id, 2)
    paused = client.fine_tuning.jobs.pause(job.id)
    assert paused.status in ("running", "paused")
    paused = wait(client, job.id, {"paused"})
    trainer = api_server.storage / "_jobs" / job.id / "trainer"
    assert any(p.name.startswith("checkpoint-") for p in trainer.iterdir())  # kept for resume
    assert (
        api_server.client.get(f"/v1/fine_tuning/jobs/{job.id}").json()["status"]["status"]
        == "paused"
    )
    resumed = client.fine_tuning.jobs.resume(job.id)
    assert resumed.status in ("queued", "running")
    wait(client, job.id, {"running"})
    _wait_step(api_server, job.id, step + 1)
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=500).data]
    assert any(m.startswith("Resuming from checkpoint-") for m in messages), messages

    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert client.fine_tuning.jobs.retrieve(job.id).fine_tuned_model is None
    with pytest.raises(ConflictError) as clash:
        client.fine_tuning.jobs.pause(job.id)
    assert clash.value.code == "conflict" and clash.value.status_code == 409


def test_models_route_is_mirrored(client):
    assert client.models.list().object == "list"


def test_sdk_exceptions_carry_openai_codes(client, api_server, training_file):
    """What code written for OpenAI checks (`exc.code`) means the same here."""
    with pytest.raises(NotFoundError) as job:
        client.fine_tuning.jobs.retrieve("job-0123456789abcdef")
    assert job.value.code == "fine_tune_not_found" and job.value.type == "invalid_request_error"
    with pytest.raises(NotFoundError) as file:
        client.files.retrieve("file-0123456789abcdef")
    assert file.value.code == "file_not_found"
    ask = [{"role": "user", "content": "hi"}]
    with pytest.raises(NotFoundError) as model:
        client.chat.completions.create(model="no/such-model", messages=ask)
    assert model.value.code == "model_not_found" and model.value.param == "model"
    with pytest.raises(BadRequestError) as bad:
        client.fine_tuning.jobs.create(model="tiny/llama", training_file=training_file, seed=-1)
    assert bad.value.code == "invalid_value" and bad.value.param == "seed"
    with pytest.raises(BadRequestError) as unknown:
        client.fine_tuning.jobs.create(
            model="tiny/llama", training_file=training_file, extra_body={"colour": "red"}
        )
    assert unknown.value.code == "unknown_parameter" and unknown.value.param == "colour"
    with pytest.raises(BadRequestError) as service:
        client.fine_tuning.jobs.create(model="tiny/llama", training_file="file-0123456789abcdef")
    assert service.value.code is None and service.value.param == "training_file"
    wrong = OpenAI(base_url=f"{api_server.url}/openai/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(AuthenticationError) as key:
        wrong.models.list()
    assert key.value.code == "invalid_api_key" and key.value.status_code == 401


def _wait_step(server, job_id: str, at_least: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = server.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"]
        step = (progress.get("progress") or {}).get("step") or 0
        if step >= at_least:
            return step
        time.sleep(0.1)
    raise AssertionError(f"{job_id}: no step {at_least}")


def test_chat_rows_train(client):
    """A file of chat rows (OpenAI's usual format) trains as chat data (#10's `format`)."""
    from sllm.finetune.config import DatasetConfig

    if "format" not in DatasetConfig.model_fields:
        pytest.skip("needs dataset_config.format (#10)")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Hi {i}"},
                {"role": "assistant", "content": "Arr"},
            ]
        }
        for i in range(8)
    ]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    fid = client.files.create(file=("chat.jsonl", data), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model="tiny/llama", training_file=fid, hyperparameters={"n_epochs": 1}
    )
    assert wait(client, job.id, {"succeeded", "failed"}).status == "succeeded"
