"""The Files API against a real server: upload (streamed, checked, atomic), list, read, delete,
every refusal with nothing stored, and a seed-shaped job that trains on an uploaded file."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import pytest

from tests.conftest import job_config
from tests.openai_api.conftest import text_rows, upload


def stored_ids(server) -> set[str]:
    """File ids in the database and directories under _files (scratch included)."""
    conn = sqlite3.connect(server.storage / "sllm.db")
    try:
        rows = {r[0] for r in conn.execute("SELECT id FROM files")}
    finally:
        conn.close()
    dirs = {p.name for p in (server.storage / "_files").iterdir()}
    return rows | dirs


def test_upload_list_read_delete_on_both_prefixes(api_server):
    content = text_rows(5)
    r = upload(api_server, content, name="../../evil.jsonl")
    assert r.status_code == 200, r.text
    obj = r.json()
    assert obj["object"] == "file" and obj["id"].startswith("file-")
    assert obj["bytes"] == len(content) and obj["purpose"] == "fine-tune"
    assert obj["status"] == "processed" and obj["filename"] == "evil.jsonl"
    assert isinstance(obj["created_at"], int)
    fid = obj["id"]
    on_disk = api_server.storage / "_files" / fid / "content"
    assert on_disk.read_bytes() == content
    conn = sqlite3.connect(api_server.storage / "sllm.db")
    sha, fmt, rows = conn.execute(
        "SELECT sha256, row_format, rows FROM files WHERE id = ?", (fid,)
    ).fetchone()
    conn.close()
    assert sha == hashlib.sha256(content).hexdigest() and (fmt, rows) == ("text", 5)

    for prefix in ("/v1", "/openai/v1"):
        assert api_server.client.get(f"{prefix}/files/{fid}").json() == obj
        listed = api_server.client.get(f"{prefix}/files").json()
        assert listed["object"] == "list" and fid in [f["id"] for f in listed["data"]]
        got = api_server.client.get(f"{prefix}/files/{fid}/content")
        assert got.status_code == 200 and got.content == content

    r = api_server.client.delete(f"/openai/v1/files/{fid}")
    assert r.status_code == 200 and r.json() == {"id": fid, "object": "file", "deleted": True}
    assert fid not in stored_ids(api_server)
    assert api_server.client.get(f"/v1/files/{fid}").status_code == 404


@pytest.mark.parametrize(
    ("content", "line", "what"),
    [
        (b'{"text": "a"}\n{"text": "b"\n', 2, "not valid JSON"),
        (b'{"text": "a"}\n\n{"foo": 1}\n', 3, "no `messages`"),
        (b"[1, 2]\n", 1, "not a JSON object"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}\n', 1, "no assistant"),
        (b'{"text": "a"}\n{"prompt": "p", "completion": "c"}\n', 2, "one format"),
        (b'{"text": "a"}\n{"text": NaN}\n', 2, "not valid JSON"),
    ],
)
def test_a_bad_line_is_a_400_naming_it_and_nothing_is_stored(api_server, content, line, what):
    before = stored_ids(api_server)
    r = upload(api_server, content, name="bad.jsonl")
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert f"bad.jsonl, line {line}:" in err["message"] and what in err["message"]
    assert err["param"] == "file"
    assert stored_ids(api_server) == before


def test_refusals_store_nothing(api_server):
    before = stored_ids(api_server)
    r = upload(api_server, text_rows(2), purpose="assistants")
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    r = api_server.client.post("/v1/files", data={"purpose": "fine-tune"}, files={"x": ("a", b"")})
    assert r.status_code == 400 and "no `file` part" in r.json()["error"]["message"]
    r = upload(api_server, b"\n\n")
    assert r.status_code == 400 and "holds no rows" in r.json()["error"]["message"]
    r = api_server.client.post("/v1/files", content=b"{}", headers={"Content-Type": "text/plain"})
    assert r.status_code == 400
    # over the 64 KiB limit: refused by its Content-Length, and when streamed without one
    big = text_rows(2000)
    assert len(big) > 65536 + 64 * 1024
    r = upload(api_server, big)
    assert r.status_code == 413 and "--max-upload-bytes" in r.json()["error"]["message"]
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()

    def chunks():
        yield head
        for _ in range(10):
            yield text_rows(200)[:10_000]
        yield f"\r\n--{boundary}--\r\n".encode()

    r = api_server.client.post(
        "/v1/files",
        content=chunks(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 413, r.text
    assert stored_ids(api_server) == before
    for method, path in [
        ("GET", "/v1/files/file-0000000000000000000000aa"),
        ("GET", "/openai/v1/files/file-nope/content"),
        ("DELETE", "/v1/files/file-nope"),
    ]:
        r = api_server.client.request(method, path)
        want = "invalid_request_error" if path.startswith("/openai/") else "not_found_error"
        assert r.status_code == 404 and r.json()["error"]["type"] == want


def file_job(storage, file_id: str, **training) -> dict:
    cfg = job_config(storage, output_dir=f"tiny/adapters/{file_id}")
    cfg["backend_config"]["dataset_config"] = {
        "dataset_source": "file",
        "file_id": file_id,
        "tokenization_field": "text",
    }
    cfg["backend_config"]["training_config"].update(training)
    return cfg


def test_seed_request_trains_on_an_uploaded_file_which_cannot_be_deleted_meanwhile(api_server):
    fid = upload(api_server, text_rows(8)).json()["id"]
    jobs = api_server.client
    r = jobs.post("/v1/fine-tuning/jobs", json=file_job(api_server.storage, fid, max_steps=2))
    assert r.status_code == 200, r.text
    job_id = r.json()["job_id"]
    r = jobs.delete(f"/v1/files/{fid}")
    if r.status_code == 409:  # the usual case: the job is pending or running
        assert job_id in r.json()["error"]["message"]
    body = api_server.wait_status(job_id, {"completed", "failed"})
    assert body["status"]["status"] == "completed", body
    meta = json.loads(
        (
            api_server.storage / "transformers" / f"tiny/adapters/{fid}" / "training_metadata.json"
        ).read_text()
    )
    assert meta["dataset"]["file_id"] == fid and meta["dataset"]["num_rows"] == 8
    assert jobs.delete(f"/v1/files/{fid}").status_code == 200  # ended: the file is free


def test_delete_of_a_file_a_paused_job_uses_is_409(api_server):
    fid = upload(api_server, text_rows(4)).json()["id"]
    cfg = file_job(api_server.storage, fid, max_steps=100000, num_train_epochs=10000)
    job_id = api_server.client.post("/v1/fine-tuning/jobs", json=cfg).json()["job_id"]
    assert api_server.client.post(f"/v1/fine_tuning/jobs/{job_id}/pause").status_code == 200
    api_server.wait_status(job_id, {"paused"})
    r = api_server.client.delete(f"/v1/files/{fid}")
    assert r.status_code == 409 and job_id in r.json()["error"]["message"]
    assert (api_server.storage / "_files" / fid / "content").is_file()
    api_server.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert api_server.client.delete(f"/v1/files/{fid}").status_code == 200


def test_seed_file_source_refusals(api_server):
    def submit(ds: dict):
        cfg = job_config(api_server.storage, output_dir="tiny/adapters/never")
        cfg["backend_config"]["dataset_config"] = ds
        return api_server.client.post("/v1/fine-tuning/jobs", json=cfg)

    fid = upload(api_server, text_rows(3)).json()["id"]
    stored = str(api_server.storage / "_files" / fid / "content")
    unknown = "file-0123456789abcdef"
    cases = [
        ({"dataset_source": "file", "file_id": unknown, "tokenization_field": "text"},
         "no uploaded file"),
        ({"dataset_source": "file", "file_id": "../sllm.db", "tokenization_field": "text"},
         "must be the id of an uploaded file"),
        ({"dataset_source": "file", "file_id": fid, "tokenization_field": "prompt"},
         "no column 'prompt'"),
        ({"dataset_source": "local", "data_files": stored, "extension_type": "json",
          "tokenization_field": "text"},
         "store's own files"),
    ]  # fmt: skip
    listed = api_server.client.get("/v1/fine_tuning/jobs?limit=1000").json()["data"]
    for ds, what in cases:
        r = submit(ds)
        assert r.status_code == 400 and what in r.json()["error"]["message"], r.text
    assert api_server.client.get("/v1/fine_tuning/jobs?limit=1000").json()["data"] == listed


def test_byte_order_mark_and_crlf_lines_are_accepted(api_server):
    r = upload(api_server, b'\xef\xbb\xbf{"text": "a"}\r\n{"prompt": "p", "completion": "c"}\r\n')
    assert r.status_code == 400 and "line 2" in r.json()["error"]["message"]  # mixed formats
    r = upload(api_server, b'\xef\xbb\xbf{"text": "a"}\r\n{"text": "b"}\r\n')
    assert r.status_code == 200, r.text


def test_a_restart_removes_what_a_crash_left_of_uploads(tmp_path):
    from sllm.files.store import FileStore

    db = tmp_path / "sllm.db"
    store = FileStore(tmp_path, db)
    upload_ = store.begin()
    upload_.write(text_rows(2))  # a crash here leaves scratch
    kept = store.begin()
    kept.write(text_rows(2))
    rec = kept.finish("t.jsonl", "fine-tune")
    orphan = tmp_path / "_files" / "file-0123456789abcdef01234567"
    orphan.mkdir()  # moved into place, but the record was never written
    store.close()
    FileStore(tmp_path, db).close()
    assert sorted(p.name for p in (tmp_path / "_files").iterdir()) == [rec.id]
