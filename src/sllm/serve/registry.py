"""Deployments survive a server restart: their configs live in the server's SQLite file.

Table `deployments(model PRIMARY KEY, config JSON, created_time, updated_time)`, beside the
job tables in the same database (WAL; a separate connection, used under one lock).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from sllm.serve.protocol import DeploymentConfig

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (
    model TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    created_time REAL NOT NULL,
    updated_time REAL NOT NULL
)
"""


class DeploymentRegistry:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
        with self._lock, self._conn:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(_SCHEMA)

    def save(self, config: DeploymentConfig, created_time: float) -> None:
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT INTO deployments (model, config, created_time, updated_time) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(model) DO UPDATE SET "
                "config = excluded.config, updated_time = excluded.updated_time",
                (config.model, config.model_dump_json(), created_time, time.time()),
            )

    def delete(self, model: str) -> None:
        with self._lock, self._conn:
            self._conn.execute("DELETE FROM deployments WHERE model = ?", (model,))

    def load(self) -> list[tuple[DeploymentConfig, float]]:
        with self._lock:
            rows = self._conn.execute(_SELECT).fetchall()
        return _parse(rows)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


_SELECT = "SELECT config, created_time FROM deployments ORDER BY created_time"


def _parse(rows) -> list[tuple[DeploymentConfig, float]]:
    out = []
    for raw, created in rows:
        try:
            out.append((DeploymentConfig.model_validate(json.loads(raw)), created))
        except ValueError:
            continue  # written by an incompatible version: skip it, keep serving
    return out


def read_deployments(path: Path) -> list[DeploymentConfig]:
    """The deployments recorded in the database at `path`, read without a server and without
    creating anything (what `sllm-store delete` checks); [] when there are none."""
    from sllm.jobs.db import connect_read_only

    conn = connect_read_only(path)
    if conn is None:
        return []
    try:
        rows = conn.execute(_SELECT).fetchall()
    except sqlite3.OperationalError:  # no such table: nothing was ever deployed
        return []
    finally:
        conn.close()
    return [config for config, _ in _parse(rows)]
