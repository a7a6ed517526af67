"""Reading worker logs by byte offsets, and the one-line reason a pending job waits."""

from __future__ import annotations

import pytest
from job_helpers import add

from sllm.jobs.logs import read_range, read_tail
from sllm.jobs.resources import wait_reason


def test_tail_returns_the_last_lines_and_their_offsets(tmp_path):
    log = tmp_path / "worker.log"
    log.write_bytes(b"one\ntwo\nthree\n")
    page = read_tail(log, 2)
    assert page.data == b"two\nthree\n"
    assert (page.offset, page.next_offset, page.size) == (4, 14, 14)
    assert read_tail(log, 50).data == b"one\ntwo\nthree\n"
    log.write_bytes(b"one\ntwo")  # an unfinished last line counts as a line
    assert read_tail(log, 1).data == b"two"


def test_pages_join_up_byte_for_byte_and_never_split_a_character(tmp_path):
    log = tmp_path / "worker.log"
    text = "step 1 loss 2.0 ✓\nпривет 🙂 done\n" * 3
    log.write_text(text, encoding="utf-8")
    data, offset = b"", 0
    while True:
        page = read_range(log, offset, 5)
        page.data.decode("utf-8")  # each page decodes alone: no half character at its end
        if page.next_offset == offset:
            break
        assert page.offset == offset and page.next_offset == offset + len(page.data)
        data, offset = data + page.data, page.next_offset
    assert data.decode() == text
    past = read_range(log, 10_000, 10)
    assert past.data == b"" and past.next_offset == past.size == len(text.encode())


def test_a_missing_log_reads_empty(tmp_path):
    for page in (read_tail(tmp_path / "nope.log", 10), read_range(tmp_path / "nope.log", 0, 9)):
        assert (page.offset, page.next_offset, page.size, page.data) == (0, 0, 0, b"")


@pytest.mark.parametrize(
    "args, expected",
    [
        ((2, 0, 1, 0, 2), "waiting for 2 CPUs: 1 free; 2 jobs ahead"),
        ((1, 1, 4, 0, 0), "waiting for 1 GPU: 0 free"),
        ((4, 2, 1, 1, 1), "waiting for 4 CPUs and 2 GPUs: 1 CPU and 1 GPU free; 1 job ahead"),
        ((1, 0, 2, 0, 0), "starting: its 1 CPU and 0 GPUs are free"),
    ],
)
def test_wait_reason_names_what_is_missing(args, expected):
    assert wait_reason(*args) == expected


def test_pending_reason_counts_the_queue_ahead_and_names_a_starving_job(tmp_path):
    from sllm.jobs.db import JobStore
    from sllm.jobs.resources import ResourcePool
    from sllm.jobs.supervisor import Supervisor

    store = JobStore(tmp_path / "sllm.db")
    pool = ResourcePool(4, [])
    sup = Supervisor(store, launcher=None, pool=pool, starvation_s=3600)

    def job(cpus: int, priority: int = 0):
        return store.get(add(store, priority=priority, cpus=cpus, timeout=60))

    try:
        pool.try_acquire("someone", 3, 0)
        big, small, urgent = job(4), job(2), job(2, priority=9)
        assert sup.pending_reason(urgent) == "waiting for 2 CPUs: 1 free"
        assert sup.pending_reason(big) == "waiting for 4 CPUs: 1 free; 1 job ahead"
        assert sup.pending_reason(small) == "waiting for 2 CPUs: 1 free; 2 jobs ahead"
        assert "more than the capacity" in sup.pending_reason(job(5))
        many = [job(2) for _ in range(9)]  # a page of many: one read of the queue, same answers
        records = [big, small, urgent, *many]
        assert sup.pending_reasons(records) == {r.id: sup.pending_reason(r) for r in records}
        sup.starvation_s = 0  # all have starved: the first ahead that does not fit reserves
        assert sup.pending_reason(small) == (
            f"waiting for 2 CPUs: 1 free; 2 jobs ahead; {urgent.id} ahead has waited over 0 s "
            "and reserves the next free resources"
        )
        assert sup.pending_reasons(records) == {r.id: sup.pending_reason(r) for r in records}
    finally:
        store.close()


def test_cached_reasons_follow_the_pool_and_the_queue(tmp_path):
    from sllm.jobs.db import JobStore
    from sllm.jobs.resources import ResourcePool
    from sllm.jobs.supervisor import Supervisor

    store = JobStore(tmp_path / "sllm.db")
    pool = ResourcePool(2, [])
    sup = Supervisor(store, launcher=None, pool=pool)
    kw = dict(model="m", ft_backend="peft_lora", num_gpus=0, timeout=60, config={})
    try:
        first = store.create(num_cpus=2, priority=0, backend_config={}, **kw)
        pool.try_acquire("instance:x", 1, 0)
        assert sup.pending_reasons([first]) == {first.id: "waiting for 2 CPUs: 1 free"}
        pool.try_acquire("instance:y", 1, 0)  # the pool changed: not the cached answer
        assert sup.pending_reasons([first]) == {first.id: "waiting for 2 CPUs: 0 free"}
        urgent = store.create(num_cpus=1, priority=5, backend_config={}, **kw)
        assert sup.pending_reasons([first])[first.id].endswith("; 1 job ahead")
        assert sup.pending_reasons([urgent]) == {urgent.id: "waiting for 1 CPU: 0 free"}
    finally:
        store.close()


def test_tail_of_a_long_log_reads_back_across_chunks(tmp_path, monkeypatch):
    from sllm.jobs import logs

    monkeypatch.setattr(logs, "TAIL_CHUNK_BYTES", 7)  # many small reads backwards
    log = tmp_path / "worker.log"
    lines = [f"line {i} {'x' * (i % 5)}\n" for i in range(40)]
    log.write_text("".join(lines))
    for n in (1, 3, 17, 40, 100):
        page = read_tail(log, n)
        assert page.data.decode() == "".join(lines[-n:])
        assert page.offset + len(page.data) == page.next_offset == page.size
    monkeypatch.setattr(logs, "TAIL_SCAN_BYTES", 30)  # a window that starts mid-line
    page = read_tail(log, 100)
    assert page.data and "".join(lines).endswith(page.data.decode())
    assert page.data.decode() in {"".join(lines[-k:]) for k in range(1, 5)}
