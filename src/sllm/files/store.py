"""Uploaded files: content on disk under `$STORAGE_PATH/_files/<file-id>/content`, metadata in
the server's SQLite file (table `files`, beside the jobs).

An upload streams into a scratch directory (`_files/.tmp-<random>/content`) while its sha256 and
size are counted; it is then checked line by line (`check_jsonl`), fsynced and renamed into place
in one step, and only then recorded. So a file that is listed is complete, and a crash mid-upload
leaves only scratch (or an unrecorded file), which the next start removes. Nothing holds a
whole file in memory.

A file that a pending, running or paused job trains on cannot be deleted (409): the check and the
delete share one write transaction with job creation (same database), so they cannot interleave.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sllm.config import DEFAULT_MAX_UPLOAD_BYTES
from sllm.errors import ConflictError, InvalidRequestError, NotFoundError, TooLargeError
from sllm.finetune.datascan import RowError, row_format
from sllm.paths import files_dir
from sllm.strictjson import BadJSON, parse_json

PURPOSES = ("fine-tune",)
CONTENT = "content"
MAX_LINE_BYTES = 16 * 2**20  # one training row; longer is not a row any model trains on
MAX_FILENAME_CHARS = 255

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    row_format TEXT,
    rows INTEGER
);
"""
# Job states whose jobs will still read their files.
_ACTIVE = ("pending", "running", "paused")


@dataclass(frozen=True)
class FileRecord:
    id: str
    filename: str
    purpose: str
    bytes: int
    sha256: str
    created_at: int
    row_format: str | None  # text | chat | prompt_completion (see `row_format`)
    rows: int | None


def clean_filename(name: str | None) -> str:
    """The name as shown back: its last path component, no control characters, bounded."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF)
    return base[:MAX_FILENAME_CHARS] or "upload.jsonl"


def check_purpose(purpose: str | None) -> str:
    if purpose not in PURPOSES:
        raise InvalidRequestError(
            f"`purpose` must be one of {', '.join(PURPOSES)} (the only files this server keeps "
            f"are training data), got {purpose!r}.",
            param="purpose",
        )
    return purpose


def check_jsonl(path: Path, filename: str) -> tuple[str, int]:
    """Every line of a fine-tune file is a JSON object in one known row format (blank lines are
    skipped); returns (format, rows). A bad line is a 400 naming its number, never its text."""
    kind: str | None = None
    rows = 0
    with open(path, "rb") as fh:
        number = 0
        while True:
            raw = fh.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise _bad_line(filename, number, f"longer than {MAX_LINE_BYTES} bytes")
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
            if not raw.strip():
                continue
            try:
                this = row_format(parse_json(raw))
            except BadJSON as exc:
                raise _bad_line(
                    filename, number, f"not valid JSON ({exc.message.rstrip('.')})"
                ) from None
            except RowError as exc:
                raise _bad_line(filename, number, str(exc)) from None
            if kind is not None and this != kind:
                raise _bad_line(
                    filename, number, f"a {this} row in a file of {kind} rows; use one format"
                )
            kind = this
            rows += 1
    if rows == 0:
        raise InvalidRequestError(
            f"`file`: {filename} holds no rows; a fine-tune file is JSON Lines, one example a "
            "line.",
            param="file",
        )
    return kind or "text", rows


def _bad_line(filename: str, number: int, what: str) -> InvalidRequestError:
    return InvalidRequestError(f"`file`: {filename}, line {number}: {what}.", param="file")


class Upload:
    """One upload in progress: bytes go straight to a scratch file, counted and hashed."""

    def __init__(self, store: FileStore) -> None:
        self.store = store
        self.scratch = store.root / f".tmp-{uuid.uuid4().hex}"
        self.scratch.mkdir(parents=True)
        self._fh = open(self.scratch / CONTENT, "wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.store.max_bytes:
            self.abort()
            raise too_large(self.store.max_bytes)
        self._hash.update(data)
        self._fh.write(data)

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def finish(self, filename: str | None, purpose: str | None) -> FileRecord:
        """Check, fsync, move into place, record; on any failure nothing is kept."""
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            check_purpose(purpose)
            name = clean_filename(filename)
            kind, rows = check_jsonl(self.scratch / CONTENT, name)
            return self.store._commit(self, name, purpose, self._hash.hexdigest(), kind, rows)
        except BaseException:
            self.abort()
            raise


def too_large(limit: int) -> TooLargeError:
    return TooLargeError(
        f"The file is larger than the server's upload limit of {limit} bytes "
        "(`sllm start --max-upload-bytes`).",
        param="file",
    )


class FileStore:
    """The uploaded files of one store; safe to share between threads."""

    def __init__(self, storage: Path, db: Path, *, max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES):
        self.root = files_dir(Path(storage))
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            str(db), isolation_level=None, check_same_thread=False, timeout=30
        )
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            self._conn.execute("PRAGMA busy_timeout=30000")
            self._conn.executescript(_SCHEMA)
        self._clean_orphans()

    def _clean_orphans(self) -> None:
        """Uploads cut short by a crash: scratch, and a file moved into place whose record was
        never written (the server died between the rename and the insert)."""
        known = {r["id"] for r in self._rows("SELECT id FROM files")}
        for entry in self.root.iterdir():
            if entry.name.startswith(".tmp-") or (
                entry.name.startswith("file-") and entry.name not in known
            ):
                shutil.rmtree(entry, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def begin(self) -> Upload:
        return Upload(self)

    def _commit(
        self, upload: Upload, filename: str, purpose: str, sha: str, kind: str, rows: int
    ) -> FileRecord:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        target = self.root / file_id
        os.rename(upload.scratch, target)
        _fsync_dir(self.root)
        rec = FileRecord(file_id, filename, purpose, upload.size, sha, int(time.time()), kind, rows)
        try:
            with self._lock:
                self._conn.execute(
                    "INSERT INTO files (id, filename, purpose, bytes, sha256, created_at, "
                    "row_format, rows) VALUES (?,?,?,?,?,?,?,?)",
                    (rec.id, filename, purpose, rec.bytes, sha, rec.created_at, kind, rows),
                )
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        return rec

    # --- reads ----------------------------------------------------------------------------
    def _rows(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def get(self, file_id: str) -> FileRecord:
        rows = self._rows("SELECT * FROM files WHERE id = ?", (file_id,))
        if not rows:
            raise NotFoundError(f"No file with id {file_id!r}.", param="file_id")
        return _record(rows[0])

    def content_path(self, file_id: str) -> Path:
        self.get(file_id)
        return self.root / file_id / CONTENT

    def list(
        self, *, limit: int = 10000, after: str | None = None, purpose: str | None = None
    ) -> tuple[list[FileRecord], bool]:
        """Newest first; `after` is the last id of the previous page."""
        if not 1 <= limit <= 10000:
            raise InvalidRequestError("`limit` must be between 1 and 10000.", param="limit")
        where, params = [], []
        if after is not None:
            self.get(after)
            where.append("seq < (SELECT seq FROM files WHERE id = ?)")
            params.append(after)
        if purpose is not None:
            where.append("purpose = ?")
            params.append(purpose)
        sql = "SELECT * FROM files" + (" WHERE " + " AND ".join(where) if where else "")
        rows = self._rows(sql + " ORDER BY seq DESC LIMIT ?", (*params, limit + 1))
        return [_record(r) for r in rows[:limit]], len(rows) > limit

    # --- delete ---------------------------------------------------------------------------
    def delete(self, file_id: str) -> None:
        """Remove the record and the content, unless a job that will still run trains on it."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                if not self._conn.execute(
                    "SELECT 1 FROM files WHERE id = ?", (file_id,)
                ).fetchall():
                    raise NotFoundError(f"No file with id {file_id!r}.", param="file_id")
                user = self._active_user(file_id)
                if user is not None:
                    raise ConflictError(
                        f"File {file_id} is the data of job {user[0]} ({user[1]}); cancel the job "
                        "or wait for it to end before deleting the file.",
                        param="file_id",
                    )
                self._conn.execute("DELETE FROM files WHERE id = ?", (file_id,))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        shutil.rmtree(self.root / file_id, ignore_errors=True)

    def _active_user(self, file_id: str) -> tuple[str, str] | None:
        marks = ",".join("?" * len(_ACTIVE))
        try:
            rows = self._conn.execute(
                f"SELECT id, status, backend_config_json FROM jobs WHERE status IN ({marks}) "
                "ORDER BY seq",
                _ACTIVE,
            ).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return None
            raise
        for row in rows:
            if file_id in file_ids(json.loads(row["backend_config_json"])):
                return row["id"], row["status"]
        return None


def file_ids(backend_config: dict[str, Any]) -> list[str]:
    """The uploaded files a job's backend_config reads (training and validation data)."""
    out = []
    for key in ("dataset_config", "validation_dataset_config"):
        ds = backend_config.get(key)
        if isinstance(ds, dict) and ds.get("dataset_source") == "file" and ds.get("file_id"):
            out.append(str(ds["file_id"]))
    return out


def _record(row: sqlite3.Row) -> FileRecord:
    return FileRecord(
        row["id"],
        row["filename"],
        row["purpose"],
        row["bytes"],
        row["sha256"],
        row["created_at"],
        row["row_format"],
        row["rows"],
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
