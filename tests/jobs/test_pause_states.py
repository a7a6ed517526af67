"""The paused state in the job store: allowed moves, the pause request flag, and that paused jobs
still count as users of their model, output dir and files."""

from __future__ import annotations

import pytest

from sllm.errors import ConflictError
from sllm.files.store import FileStore, file_ids
from sllm.jobs.db import FileGone, JobStore, OutputDirInUse, read_active_jobs
from sllm.jobs.states import JobStatus


def make(store: JobStore, output_dir: str = "a/out", **kw):
    return store.create(
        model="m",
        ft_backend="peft_lora",
        num_cpus=1,
        num_gpus=0,
        timeout=60,
        priority=0,
        config={},
        backend_config={"output_dir": output_dir, **kw.pop("backend", {})},
        exclusive_output=True,
        **kw,
    )


def test_pause_moves_and_flag(tmp_path):
    store = JobStore(tmp_path / "sllm.db")
    job = make(store)
    assert not store.request_pause(job.id)  # pending jobs pause directly, not by request
    assert store.transition(job.id, JobStatus.PAUSED, message="p")
    assert [r.id for r in read_active_jobs(tmp_path / "sllm.db")] == [job.id]
    with pytest.raises(OutputDirInUse):
        make(store)  # a paused job still owns its output dir
    assert not store.transition(job.id, JobStatus.RUNNING, message="x")  # resume first
    assert store.transition(job.id, JobStatus.PENDING, message="resumed")
    assert store.transition(job.id, JobStatus.RUNNING, message="r")
    assert store.request_pause(job.id) and not store.request_pause(job.id)
    assert store.pause_requests([job.id]) == {job.id}
    assert store.transition(job.id, JobStatus.PAUSED, message="p")
    assert store.get(job.id).pause_requested is False
    assert store.transition(job.id, JobStatus.CANCELLED, message="c")
    assert read_active_jobs(tmp_path / "sllm.db") == []
    store.close()


def test_a_job_on_a_deleted_file_is_not_created(tmp_path):
    store = JobStore(tmp_path / "sllm.db")
    files = FileStore(tmp_path, tmp_path / "sllm.db")
    upload = files.begin()
    upload.write(b'{"text": "a"}\n')
    rec = upload.finish("t.jsonl", "fine-tune")
    ds = {"dataset_config": {"dataset_source": "file", "file_id": rec.id}}
    assert file_ids(ds) == [rec.id]
    make(store, "b/out", backend=ds, files=[rec.id])
    with pytest.raises(ConflictError, match="data of job"):
        files.delete(rec.id)  # 409: the pending job reads it
    with pytest.raises(FileGone):
        make(store, "c/out", files=["file-0123456789abcdef01234567"])
    files.close()
    store.close()
