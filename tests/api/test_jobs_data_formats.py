"""Chat and prompt/completion data at submit: each bad row is a 400 naming its file and line,
with nothing stored; a good file's job starts with an event saying rows, tokens and steps."""

from __future__ import annotations

import json

import pytest

from tests.api.test_jobs_validation import assert_refused
from tests.conftest import job_config

GOOD = {
    "messages": [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Arr, fine!"},
    ]
}


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_src):
    from tests.conftest import stored_server

    root = tmp_path_factory.mktemp("formats") / "store"
    server = stored_server(root, tiny_model_src, "--num-cpus", "2", "--num-gpus", "0")
    yield server
    server.stop()


def chat_job(srv, name: str, rows: list, **dataset) -> dict:
    path = srv.storage / "data" / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = job_config(srv.storage)
    ds = cfg["backend_config"]["dataset_config"]
    ds.pop("tokenization_field")
    ds.update(data_files=str(path), **dataset)
    return cfg


def _with(messages: list) -> dict:
    return {"messages": messages}


BAD_ROWS = [
    ("not-a-list", {"messages": "How are you?"}, "list of \\{role, content\\}"),
    ("no-role", _with([{"content": "hi"}, GOOD["messages"][2]]), "message 1 has no 'role'"),
    ("unknown-role", _with([{"role": "tool", "content": "x"}, GOOD["messages"][2]]),
     "unknown role"),
    ("no-assistant", _with(GOOD["messages"][:2]), "no assistant message to learn from"),
    ("weight-zero", _with([*GOOD["messages"][:2], {**GOOD["messages"][2], "weight": 0}]),
     "no assistant message to learn from"),
    ("mixed", {"prompt": "How are you?", "completion": "Arr"}, "prompt_completion row where"),
]  # fmt: skip


@pytest.mark.parametrize("name,row,expect", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_a_bad_row_is_400_naming_file_and_line_and_nothing_is_stored(srv, name, row, expect):
    cfg = chat_job(srv, f"{name}.jsonl", [GOOD, GOOD, row, GOOD])
    err = assert_refused(srv, expect, json=cfg)
    assert f"{name}.jsonl, line 3" in err["message"]


def test_explicit_format_checks_every_row(srv):
    cfg = chat_job(srv, "pc.jsonl", [{"prompt": "q", "completion": "a"}, GOOD],
                   format="prompt_completion")  # fmt: skip
    err = assert_refused(srv, "no 'prompt' key", json=cfg)
    assert "pc.jsonl, line 2" in err["message"]


def test_text_rows_without_tokenization_field_are_400(srv):
    cfg = chat_job(srv, "text.jsonl", [{"prompt": "How are you? Arr."}] * 3)
    assert_refused(srv, "tokenization_field` is required", json=cfg)


def test_first_event_reports_rows_tokens_and_steps(srv):
    cfg = chat_job(srv, "good.jsonl", [GOOD] * 10)
    cfg["backend_config"]["training_config"].update(num_train_epochs=1, max_steps=-1)
    r = srv.client.post("/v1/fine-tuning/jobs", json=cfg)
    assert r.status_code == 200, r.text
    job_id = r.json()["job_id"]
    try:
        events = srv.client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
        first = min(events, key=lambda e: e["id"]) if events else None
        assert first is not None and first["message"].startswith("Job created, pending.")
        assert "10 chat rows" in first["message"] and "3 steps" in first["message"]
        assert first["data"]["rows"] == 10 and first["data"]["estimated_tokens"] > 0
    finally:
        srv.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")


def test_chat_format_from_a_csv_file_is_400(srv):
    path = srv.storage / "data" / "chat.csv"
    path.write_text("messages\nhello\n")
    cfg = chat_job(srv, "unused.jsonl", [GOOD], format="chat")
    cfg["backend_config"]["dataset_config"].update(data_files=str(path), extension_type="csv")
    assert_refused(srv, "chat rows need JSON Lines", json=cfg)


def test_seed_text_rows_still_pass_and_report_their_size(srv):
    """The seed's config (text rows, `tokenization_field`) is unchanged, and its first event
    also says rows, tokens and steps."""
    cfg = job_config(srv.storage)  # data/train.jsonl: 24 rows of "prompt" text
    cfg["backend_config"]["training_config"].update(num_train_epochs=1, max_steps=-1)
    r = srv.client.post("/v1/fine-tuning/jobs", json=cfg)
    assert r.status_code == 200, r.text
    job_id = r.json()["job_id"]
    try:
        events = srv.client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
        assert "24 text rows" in events[0]["message"] and "6 steps" in events[0]["message"]
    finally:
        srv.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
