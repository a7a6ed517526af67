"""Durable job records in SQLite (WAL), shared by the server and the job workers.

The server's supervisor is the only writer of a job's `status` (`transition`, a compare-and-set);
workers write progress, events and their result or error beside it.

Writes share one connection behind a lock. Reads use a connection of their own per thread: in WAL
mode a reader never waits for a writer, so the API's status reads (on the event loop) never queue
behind the supervisor's or a worker's write transaction, nor behind each other.
"""

from __future__ import annotations

import json
import posixpath
import sqlite3
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from sllm.jobs import counters
from sllm.jobs.messages import readable_error
from sllm.jobs.states import TERMINAL, TRANSITIONS, JobStatus, sources_of

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL,
    model TEXT NOT NULL,
    ft_backend TEXT NOT NULL,
    num_cpus INTEGER NOT NULL,
    num_gpus INTEGER NOT NULL,
    timeout REAL NOT NULL,
    config_json TEXT NOT NULL,
    backend_config_json TEXT NOT NULL,
    created_time TEXT NOT NULL,
    updated_time TEXT NOT NULL,
    started_time TEXT,
    finished_time TEXT,
    error_message TEXT,
    error_kind TEXT,
    progress_json TEXT,
    adapter_path TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    crash_requeues INTEGER NOT NULL DEFAULT 0,
    clean_stop INTEGER NOT NULL DEFAULT 0,
    worker_pid INTEGER,
    worker_host TEXT,
    resources_json TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, priority, seq);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    created_time TEXT NOT NULL,
    level TEXT NOT NULL,
    type TEXT NOT NULL,
    message TEXT NOT NULL,
    data_json TEXT
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
"""

# Columns added after the first release, with how an older database gets them. `crash_requeues`
# used to be `attempts - 1` (every start after the first was a re-queue after a crash).
_ADDED_COLUMNS = {
    "crash_requeues": (
        "INTEGER NOT NULL DEFAULT 0",
        "UPDATE jobs SET crash_requeues = MAX(attempts - 1, 0)",
    ),
    "clean_stop": ("INTEGER NOT NULL DEFAULT 0", None),
    # what the OpenAI surface was asked (suffix, metadata, files, method); null for seed jobs
    "openai_json": ("TEXT", None),
    # a pause was asked for a running job: its worker checkpoints and stops, the job is paused
    "pause_requested": ("INTEGER NOT NULL DEFAULT 0", None),
    # when it last entered the queue (a re-queue or resume); null: at `created_time`
    "queued_time": ("TEXT", None),
}


def now_iso() -> str:
    """UTC timestamps in the seed's format (`2025-08-26T04:18:11.155785`)."""
    return datetime.now(timezone.utc).replace(tzinfo=None).isoformat()


@dataclass
class JobRecord:
    seq: int
    id: str
    status: JobStatus
    priority: int
    model: str
    ft_backend: str
    num_cpus: int
    num_gpus: int
    timeout: float
    config: dict[str, Any]
    backend_config: dict[str, Any]
    created_time: str
    updated_time: str
    started_time: str | None
    finished_time: str | None
    error_message: str | None
    error_kind: str | None
    progress: dict[str, Any] | None
    adapter_path: str | None
    attempts: int  # times a worker was started for it
    crash_requeues: int  # times it was re-queued after a crash (server or node), not a clean stop
    clean_stop: bool  # a clean server shutdown stopped it: re-queue without charging a crash
    worker_pid: int | None
    worker_host: str | None
    resources: dict[str, Any] | None
    openai: dict[str, Any] | None = None  # the OpenAI request's own fields (suffix, metadata...)
    pause_requested: bool = False

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JobRecord:
        d = dict(row)
        return cls(
            seq=d["seq"],
            id=d["id"],
            status=JobStatus(d["status"]),
            priority=d["priority"],
            model=d["model"],
            ft_backend=d["ft_backend"],
            num_cpus=d["num_cpus"],
            num_gpus=d["num_gpus"],
            timeout=d["timeout"],
            config=json.loads(d["config_json"]),
            backend_config=json.loads(d["backend_config_json"]),
            created_time=d["created_time"],
            updated_time=d["updated_time"],
            started_time=d["started_time"],
            finished_time=d["finished_time"],
            error_message=d["error_message"],
            error_kind=d["error_kind"],
            progress=json.loads(d["progress_json"]) if d["progress_json"] else None,
            adapter_path=d["adapter_path"],
            attempts=d["attempts"],
            # .get: a tool reading a database no server of this version has opened yet (and so
            # migrated, see `_ADDED_COLUMNS`) finds rows without the newer columns
            crash_requeues=d.get("crash_requeues", max(d["attempts"] - 1, 0)),
            clean_stop=bool(d.get("clean_stop", 0)),
            worker_pid=d["worker_pid"],
            worker_host=d["worker_host"],
            resources=json.loads(d["resources_json"]) if d["resources_json"] else None,
            openai=json.loads(d["openai_json"]) if d.get("openai_json") else None,
            pause_requested=bool(d.get("pause_requested", 0)),
        )


def connect_read_only(path: Path) -> sqlite3.Connection | None:
    """A read-only connection to an existing database, for tools beside the server (they must
    neither create the file nor change its schema); None when there is no database."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    except sqlite3.OperationalError:
        return None
    conn.row_factory = sqlite3.Row
    return conn


def read_active_jobs(path: Path) -> list[JobRecord]:
    """Pending, running and paused jobs in the database at `path`, oldest first, read without a
    server (what `sllm-store delete` checks); [] when there is no database or no job table yet."""
    conn = connect_read_only(path)
    if conn is None:
        return []
    try:
        rows = conn.execute(
            "SELECT * FROM jobs WHERE status IN (?, ?, ?) ORDER BY seq",
            (JobStatus.PENDING.value, JobStatus.RUNNING.value, JobStatus.PAUSED.value),
        ).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):  # no job was ever submitted
            return []
        raise  # anything else (a locked or damaged file) must not read as "nobody uses it"
    finally:
        conn.close()
    return [JobRecord.from_row(r) for r in rows]


class FileGone(Exception):
    """`create` found that an uploaded file the job reads was deleted meanwhile."""

    def __init__(self, file_id: str) -> None:
        super().__init__(file_id)
        self.file_id = file_id


class OutputDirInUse(Exception):
    """`create` found a pending or running job that writes the same adapter directory."""

    def __init__(self, job_id: str, status: JobStatus, output_dir: str) -> None:
        super().__init__(f"{output_dir} is the output of {job_id} ({status.value})")
        self.job_id = job_id
        self.status = status
        self.output_dir = output_dir


def output_key(output_dir: str) -> str:
    """The form two `output_dir`s are compared in (`a//b/`, `./a/b` and `a/b` are one dir)."""
    return posixpath.normpath(output_dir).strip("/")


def _overlaps(a: str, b: str) -> bool:
    """Same directory, or one inside the other (writing the outer one replaces the inner)."""
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


class QueuedJob(NamedTuple):
    """A pending job as the scheduler sees it."""

    id: str
    num_cpus: int
    num_gpus: int
    created_time: str


class JobStore:
    """A small DAO over one SQLite file; safe to share between threads of one process."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._conn = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=30
        )
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA busy_timeout=30000")
            self._conn.executescript(_SCHEMA)
            self._add_missing_columns()
            counters.initialise(self._conn)

    def _add_missing_columns(self) -> None:
        have = {r["name"] for r in self._conn.execute("PRAGMA table_info(jobs)")}
        for name, (decl, fill) in _ADDED_COLUMNS.items():
            if name in have:
                continue
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")
                if fill:
                    self._conn.execute(fill)
                self._conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:  # another process added it meanwhile
                self._conn.execute("ROLLBACK")
                if "duplicate column" not in str(exc):
                    raise

    @property
    def write_count(self) -> int:
        """Rows this process has written so far (a cheap "did anything change" for caches)."""
        return self._conn.total_changes

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            for conn in self._readers:
                conn.close()
            self._readers.clear()

    def _exec(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._conn.execute(sql, params)

    def _read(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        """All rows of a read, on this thread's own connection (autocommit: the latest commit)."""
        return self._reader().execute(sql, params).fetchall()

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False, timeout=30
            )
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout=30000")
            with self._lock:
                self._readers.append(conn)
            self._local.conn = conn
        return conn

    # --- creation and reads -------------------------------------------------------------
    def create(
        self,
        *,
        model: str,
        ft_backend: str,
        num_cpus: int,
        num_gpus: int,
        timeout: float,
        priority: int,
        config: dict[str, Any],
        backend_config: dict[str, Any],
        exclusive_output: bool = False,
        created: tuple[str, dict[str, Any]] | None = None,
        files: list[str] = (),
        openai: dict[str, Any] | None = None,
    ) -> JobRecord:
        """Insert a pending job. With `exclusive_output`, raise `OutputDirInUse` when a pending or
        running job writes the same `backend_config["output_dir"]` (or one inside the other),
        checked in the insert's own write transaction so two racing submissions cannot both
        pass. `created`: (a sentence, data) the job's first event adds (what validation saw)."""
        job_id = f"job-{uuid.uuid4().hex[:16]}"
        ts = now_iso()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                if exclusive_output and backend_config.get("output_dir"):
                    self._check_output_free(str(backend_config["output_dir"]))
                for file_id in files:  # a file deleted since it was validated (same transaction
                    # as the Files API's delete, which refuses files that active jobs read)
                    if not self._file_exists(file_id):
                        raise FileGone(file_id)
                self._conn.execute(
                    "INSERT INTO jobs (id, status, priority, model, ft_backend, num_cpus, "
                    "num_gpus, timeout, config_json, backend_config_json, created_time, "
                    "updated_time, openai_json) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        job_id,
                        JobStatus.PENDING.value,
                        priority,
                        model,
                        ft_backend,
                        num_cpus,
                        num_gpus,
                        timeout,
                        json.dumps(config),
                        json.dumps(backend_config),
                        ts,
                        ts,
                        json.dumps(openai) if openai is not None else None,
                    ),
                )
                note, data = created or ("", None)
                message = f"Job created, pending. {note}".strip()
                self._insert_event(job_id, "info", "status", message, data, ts)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        record = self.get(job_id)
        assert record is not None
        return record

    def _file_exists(self, file_id: str) -> bool:
        try:
            return bool(
                self._conn.execute("SELECT 1 FROM files WHERE id = ?", (file_id,)).fetchall()
            )
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # no file was ever uploaded to this store
                return False
            raise

    def _check_output_free(self, output_dir: str) -> None:
        """Inside a write transaction: no active job may write `output_dir` or around it."""
        mine = output_key(output_dir)
        rows = self._conn.execute(
            "SELECT id, status, backend_config_json FROM jobs WHERE status IN (?, ?, ?) "
            "ORDER BY seq",
            (JobStatus.PENDING.value, JobStatus.RUNNING.value, JobStatus.PAUSED.value),
        ).fetchall()
        for row in rows:
            theirs = json.loads(row["backend_config_json"]).get("output_dir")
            if theirs and _overlaps(mine, output_key(str(theirs))):
                raise OutputDirInUse(row["id"], JobStatus(row["status"]), str(theirs))

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return JobRecord.from_row(rows[0]) if rows else None

    def list(
        self,
        *,
        limit: int = 20,
        after: str | None = None,
        status: JobStatus | None = None,
        metadata: dict[str, str] | None = None,
    ) -> tuple[list[JobRecord], bool]:
        """Newest first; `after` is the id of the last job of the previous page; `metadata`:
        only jobs whose OpenAI metadata holds every one of these pairs."""
        where, params = [], []
        for key, value in (metadata or {}).items():
            where.append("json_extract(openai_json, '$.metadata.' || json_quote(?)) = ?")
            params += [key, value]
        if after is not None:
            where.append("seq < (SELECT seq FROM jobs WHERE id = ?)")
            params.append(after)
        if status is not None:
            where.append("status = ?")
            params.append(status.value)
        sql = "SELECT * FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        rows = self._read(sql, (*params, limit + 1))
        return [JobRecord.from_row(r) for r in rows[:limit]], len(rows) > limit

    def pending_in_order(self) -> list[QueuedJob]:
        """Pending jobs, highest priority first, then oldest first: only what scheduling reads
        (the supervisor scans the queue on every pass; full records parse three JSON columns)."""
        rows = self._read(
            "SELECT id, num_cpus, num_gpus, created_time FROM jobs WHERE status = ? "
            "ORDER BY priority DESC, seq ASC",
            (JobStatus.PENDING.value,),
        )
        return [QueuedJob(r[0], r[1], r[2], r[3]) for r in rows]

    def queue_ahead(self, priority: int, seq: int) -> tuple[int, list[QueuedJob]]:
        """How many pending jobs the scheduler considers before the one at (`priority`, `seq`),
        and the first (oldest) of them at each priority level: the only ones that can be
        starving when it is not. Index lookups of `jobs_status` (a count over the index, then a
        few seeks), so a job polled while 10,000 wait costs about a millisecond."""
        pending = JobStatus.PENDING.value
        count = self._read(
            "SELECT (SELECT COUNT(*) FROM jobs WHERE status = ? AND priority > ?) + "
            "(SELECT COUNT(*) FROM jobs WHERE status = ? AND priority = ? AND seq < ?)",
            (pending, priority, pending, priority, seq),
        )[0][0]
        heads: list[QueuedJob] = []
        level: int | None = None
        while count and len(heads) < 16:
            above = "" if level is None else " AND priority < ?"
            top = self._read(
                f"SELECT MAX(priority) FROM jobs WHERE status = ? AND priority >= ?{above}",
                (pending, priority, *(() if level is None else (level,))),
            )[0][0]
            if top is None:
                break
            row = self._read(
                "SELECT id, num_cpus, num_gpus, created_time, seq FROM jobs "
                "WHERE status = ? AND priority = ? ORDER BY seq LIMIT 1",
                (pending, top),
            )
            if not row or (top == priority and row[0][4] >= seq):
                break
            heads.append(QueuedJob(*tuple(row[0])[:4]))
            level = top
        return count, heads

    def with_status(self, status: JobStatus) -> list[JobRecord]:
        rows = self._read("SELECT * FROM jobs WHERE status = ? ORDER BY seq", (status.value,))
        return [JobRecord.from_row(r) for r in rows]

    def statuses(self, job_ids: list[str]) -> dict[str, JobStatus]:
        if not job_ids:
            return {}
        marks = ",".join("?" * len(job_ids))
        rows = self._read(f"SELECT id, status FROM jobs WHERE id IN ({marks})", tuple(job_ids))
        return {r["id"]: JobStatus(r["status"]) for r in rows}

    def status_of(self, job_id: str) -> JobStatus | None:
        rows = self._read("SELECT status FROM jobs WHERE id = ?", (job_id,))
        return JobStatus(rows[0][0]) if rows else None

    def exists(self, job_id: str) -> bool:
        return bool(self._read("SELECT 1 FROM jobs WHERE id = ?", (job_id,)))

    # --- aggregates for /metrics (read at scrape time, nothing is counted twice) ----------
    def count_by_status(self) -> dict[str, int]:
        rows = self._read("SELECT status, COUNT(*) FROM jobs GROUP BY status")
        return {r[0]: r[1] for r in rows}

    def metric_totals(self) -> counters.Totals:
        """Trained tokens and the queue-wait histogram: monotonic totals counted as the work
        happened (`sllm.jobs.counters`), read from one small table whatever the job count."""
        return counters.read(self._reader())

    def running_speeds(self) -> dict[str, float]:
        """Tokens per second of each running job that reported one."""
        rows = self._read(
            "SELECT id, json_extract(progress_json, '$.tokens_per_second') FROM jobs "
            "WHERE status = ? AND progress_json IS NOT NULL",
            (JobStatus.RUNNING.value,),
        )
        return {r[0]: float(r[1]) for r in rows if r[1] is not None}

    # --- the only writer of status ------------------------------------------------------
    def transition(
        self,
        job_id: str,
        to: JobStatus,
        *,
        message: str,
        error_kind: str | None = None,
        error_message: str | None = None,
        **fields: Any,
    ) -> bool:
        """Compare-and-set `status` to `to` if the table allows it from the current state.

        Returns False (and changes nothing) when another writer got there first.
        """
        allowed = sources_of(to)
        assert all(to in TRANSITIONS[s] for s in allowed)
        ts = now_iso()
        sets = {"status": to.value, "updated_time": ts, **fields}
        if to is JobStatus.RUNNING:
            sets.update(started_time=ts, finished_time=None, adapter_path=None)
            sets.update(error_message=None, error_kind=None, progress_json=None, clean_stop=0)
            sets.update(pause_requested=0)
        if to is JobStatus.PAUSED:
            sets["pause_requested"] = 0
        if to is JobStatus.PENDING:
            sets["queued_time"] = ts
        if to in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED):
            sets["finished_time"] = ts
        if error_kind is not None:
            sets["error_kind"] = error_kind
            sets["error_message"] = readable_error(error_message or message, self.path.parent)
            if to is JobStatus.FAILED:
                message = sets["error_message"]  # the event says what the API says
        assignments = ", ".join(f"{k} = ?" for k in sets)
        marks = ",".join("?" * len(allowed))
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                queued = self._conn.execute(
                    "SELECT COALESCE(queued_time, created_time) FROM jobs WHERE id = ?", (job_id,)
                ).fetchone()
                cur = self._conn.execute(
                    f"UPDATE jobs SET {assignments} WHERE id = ? AND status IN ({marks})",
                    (*sets.values(), job_id, *(s.value for s in allowed)),
                )
                changed = cur.rowcount == 1
                if changed and to is JobStatus.RUNNING:
                    counters.observe_wait(self._conn, counters.seconds_between(queued[0], ts))
                if changed:
                    level = "error" if to is JobStatus.FAILED else "info"
                    data = {"status": to.value}
                    if error_kind:
                        data["error_kind"] = error_kind
                    self._insert_event(job_id, level, "status", message, data, ts)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return changed

    # --- what workers write -------------------------------------------------------------
    def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        """Store a job's latest progress and, in the same transaction, add the tokens it trained
        since the last write to the monotonic `trained_tokens` total (`counters.tokens_trained`)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._conn.execute(
                    "SELECT progress_json FROM jobs WHERE id = ?", (job_id,)
                ).fetchone()
                if row is not None:
                    old = json.loads(row[0]) if row[0] else None
                    self._conn.execute(
                        "UPDATE jobs SET progress_json = ?, updated_time = ? WHERE id = ?",
                        (json.dumps(progress), now_iso(), job_id),
                    )
                    trained = counters.tokens_trained(old, progress)
                    counters.add(self._conn, counters.TRAINED_TOKENS, trained)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def set_result(self, job_id: str, adapter_path: str) -> None:
        self._exec(
            "UPDATE jobs SET adapter_path = ?, updated_time = ? WHERE id = ?",
            (adapter_path, now_iso(), job_id),
        )

    def set_error(self, job_id: str, message: str, kind: str) -> None:
        """Record why a worker is about to fail; the supervisor then moves the status.

        Stored as the API will show it (`sllm.jobs.messages.readable_error`): one line, no
        traceback, no paths outside the store."""
        self._exec(
            "UPDATE jobs SET error_message = ?, error_kind = ?, updated_time = ? WHERE id = ?",
            (readable_error(message, self.path.parent), kind, now_iso(), job_id),
        )

    def mark_clean_stop(self, job_id: str, message: str) -> bool:
        """Record that a clean server shutdown is stopping this running job, before its worker is
        asked to stop: even if the server then dies before it re-queues the job, the next start
        knows the stop was asked for and does not count it as a crash."""
        ts = now_iso()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                cur = self._conn.execute(
                    "UPDATE jobs SET clean_stop = 1, updated_time = ? WHERE id = ? AND status = ?",
                    (ts, job_id, JobStatus.RUNNING.value),
                )
                marked = cur.rowcount == 1
                if marked:
                    self._insert_event(job_id, "info", "status", message, None, ts)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return marked

    def request_pause(self, job_id: str) -> bool:
        """Ask the supervisor to pause a running job (its worker checkpoints at the next step
        boundary and stops; the supervisor then moves it to `paused`). False if not running."""
        ts = now_iso()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                cur = self._conn.execute(
                    "UPDATE jobs SET pause_requested = 1, updated_time = ? WHERE id = ? AND "
                    "status = ? AND pause_requested = 0",
                    (ts, job_id, JobStatus.RUNNING.value),
                )
                asked = cur.rowcount == 1
                if asked:
                    message = "Pause requested: the job stops at its next step boundary."
                    self._insert_event(job_id, "info", "status", message, None, ts)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return asked

    def pause_requests(self, job_ids: list[str]) -> set[str]:
        """Which of these jobs have a pause asked for."""
        if not job_ids:
            return set()
        marks = ",".join("?" * len(job_ids))
        rows = self._read(
            f"SELECT id FROM jobs WHERE pause_requested = 1 AND id IN ({marks})", tuple(job_ids)
        )
        return {r[0] for r in rows}

    def finished_times(self, job_ids: list[str]) -> dict[str, str | None]:
        """`finished_time` of each known job (None while it has not ended)."""
        out: dict[str, str | None] = {}
        for start in range(0, len(job_ids), 500):  # SQLite's bound on host parameters
            chunk = job_ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._read(
                f"SELECT id, status, finished_time FROM jobs WHERE id IN ({marks})", tuple(chunk)
            )
            for r in rows:
                ended = JobStatus(r["status"]) in TERMINAL
                out[r["id"]] = r["finished_time"] if ended else None
        return out

    def set_worker(self, job_id: str, pid: int | None, host: str | None) -> None:
        self._exec(
            "UPDATE jobs SET worker_pid = ?, worker_host = ? WHERE id = ?", (pid, host, job_id)
        )

    def add_event(
        self,
        job_id: str,
        type_: str,
        message: str,
        data: dict[str, Any] | None = None,
        level: str = "info",
    ) -> None:
        with self._lock:
            self._insert_event(job_id, level, type_, message, data, now_iso())

    def _insert_event(
        self, job_id: str, level: str, type_: str, message: str, data: Any, ts: str
    ) -> None:
        self._conn.execute(
            "INSERT INTO events (job_id, created_time, level, type, message, data_json) "
            "VALUES (?,?,?,?,?,?)",
            (job_id, ts, level, type_, message, json.dumps(data) if data is not None else None),
        )

    def events(
        self, job_id: str, *, limit: int = 100, after: int | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        """Oldest first (a job's log reads top-down); `after` is the last event id seen."""
        rows = self._read(
            "SELECT * FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (job_id, after or 0, limit + 1),
        )
        return [_event_row(r) for r in rows[:limit]], len(rows) > limit

    def events_newest_first(
        self, job_id: str, *, limit: int = 20, before: int | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        """Newest first (OpenAI's order); `before` is the last (oldest) event id seen."""
        rows = self._read(
            "SELECT * FROM events WHERE job_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
            (job_id, before if before is not None else 2**63 - 1, limit + 1),
        )
        return [_event_row(r) for r in rows[:limit]], len(rows) > limit


def _event_row(r: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": r["seq"],
        "created_time": r["created_time"],
        "level": r["level"],
        "type": r["type"],
        "message": r["message"],
        "data": json.loads(r["data_json"]) if r["data_json"] else None,
    }
