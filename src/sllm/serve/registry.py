"""Deployments survive a server restart: their configs live in the server's SQLite file.

Table `deployments(model PRIMARY KEY, config JSON, created_time, updated_time)`, beside the
job tables in the same database (WAL; a separate connection, used under one lock).

A config is validated again before it is written (its numbers are finite, so its JSON holds no
`null` for one: an older version stored `keep_alive: Infinity` as `null`, and the deployment
vanished at the next restart). Unset optional fields are left out rather than written as `null`;
a stored `null` (from that older version) falls back to the field's default, with a warning.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path

from sllm.serve.protocol import DeploymentConfig

log = logging.getLogger(__name__)

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
        """Store `config`; raises `ValueError` (nothing written) if it does not validate."""
        checked = DeploymentConfig.model_validate(config.model_dump())
        raw = checked.model_dump_json(exclude_none=True)
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT INTO deployments (model, config, created_time, updated_time) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(model) DO UPDATE SET "
                "config = excluded.config, updated_time = excluded.updated_time",
                (checked.model, raw, created_time, time.time()),
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
            stored = json.loads(raw)
            fields = {k: v for k, v in stored.items() if v is not None}
            config = DeploymentConfig.model_validate(fields)
        except (ValueError, AttributeError) as exc:  # an incompatible version's row
            log.warning("skipping a stored deployment that does not validate: %s", exc)
            continue
        nulls = sorted(set(stored) - set(fields))
        if nulls:
            log.warning(
                "deployment %s: %s stored as null; using the defaults",
                config.model,
                ", ".join(nulls),
            )
        out.append((config, created))
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
