"""Durable, monotonic totals for /metrics, kept in the job database beside the jobs.

A Prometheus counter (and a histogram's buckets, count and sum) must never go down: a drop reads
as a process reset and breaks `rate()`. Sums over the current job rows do go down: a re-queued or
resumed job's progress restarts (from its checkpoint, or from 0), and a restarted job's latest
wait replaces its earlier one. So these totals are counted once, when the work happens, in the
same write transaction as the row change that shows it (`JobStore.set_progress`,
`JobStore.transition`), and never subtracted. A scrape reads one small table (O(1) rows).

Rows of the `counters` table (name -> value):
- `trained_tokens`: loss tokens trained, re-trained tokens after a resume included.
- `queue_wait_count`, `queue_wait_sum`, `queue_wait_le:<bound>` (per bucket, not cumulative;
  `+Inf` last): how long each start of a job waited in the queue (since its submission, re-queue
  or resume).
"""

from __future__ import annotations

import bisect
import sqlite3
from datetime import datetime
from typing import NamedTuple

COUNTERS_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value REAL NOT NULL
);
"""

# Upper bounds (seconds) of the queue-wait histogram's buckets. Changing them needs a migration of
# the `queue_wait_le:*` rows (earlier observations cannot be re-bucketed).
QUEUE_WAIT_BOUNDS: tuple[float, ...] = (
    1.0,
    5.0,
    15.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    14400.0,
)
TRAINED_TOKENS = "trained_tokens"
WAIT_COUNT = "queue_wait_count"
WAIT_SUM = "queue_wait_sum"


def _bucket_name(i: int) -> str:
    return (
        f"queue_wait_le:{QUEUE_WAIT_BOUNDS[i]!r}"
        if i < len(QUEUE_WAIT_BOUNDS)
        else "queue_wait_le:+Inf"
    )


class QueueWaits(NamedTuple):
    """A histogram's parts: cumulative counts at or below each bound, the count, the sum."""

    cumulative: list[int]
    count: int
    total: float


class Totals(NamedTuple):
    trained_tokens: int
    queue_waits: QueueWaits


def add(conn: sqlite3.Connection, name: str, amount: float) -> None:
    """Add `amount` (>= 0: totals only grow) to one counter, inside the caller's transaction."""
    if amount <= 0:
        return
    conn.execute(
        "INSERT INTO counters (name, value) VALUES (?, ?) "
        "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
        (name, amount),
    )


def observe_wait(conn: sqlite3.Connection, seconds: float) -> None:
    """Count one start that waited `seconds` in the queue (inside the caller's transaction)."""
    seconds = max(0.0, seconds)
    add(conn, WAIT_COUNT, 1)
    add(conn, WAIT_SUM, seconds)
    add(conn, _bucket_name(bisect.bisect_left(QUEUE_WAIT_BOUNDS, seconds)), 1)


def seconds_between(start_iso: str, end_iso: str) -> float:
    return (datetime.fromisoformat(end_iso) - datetime.fromisoformat(start_iso)).total_seconds()


def tokens_trained(old_progress: dict | None, new_progress: dict) -> int:
    """Tokens a progress write adds: the rise of `trained_tokens` since the last write of this
    attempt. The first write of an attempt (no progress yet: a start clears it) counts from
    `start_trained_tokens`, the count its checkpoint already held (0 for a fresh start), so a
    resumed job's re-trained steps count as work done and nothing is counted twice."""
    new = new_progress.get("trained_tokens")
    if not isinstance(new, int | float):
        return 0
    if old_progress and isinstance(old_progress.get("trained_tokens"), int | float):
        base = old_progress["trained_tokens"]
    else:
        base = new_progress.get("start_trained_tokens") or 0
    return max(0, int(new - base))


def initialise(conn: sqlite3.Connection) -> None:
    """Create the table; a database that has none of its rows yet (new, or written by a version
    before counters) starts from the sums over its current jobs, so an upgraded server does not
    report its history as a reset to 0. Safe against another process doing the same."""
    conn.executescript(COUNTERS_SCHEMA)
    filled = "SELECT 1 FROM counters WHERE name = ?"
    if conn.execute(filled, (TRAINED_TOKENS,)).fetchone():
        return  # the usual open (every worker and CLI call opens the store): no write lock
    conn.execute("BEGIN IMMEDIATE")
    try:
        if not conn.execute(filled, (TRAINED_TOKENS,)).fetchone():
            tokens = conn.execute(
                "SELECT COALESCE(SUM(json_extract(progress_json, '$.trained_tokens')), 0) "
                "FROM jobs WHERE progress_json IS NOT NULL"
            ).fetchone()[0]
            rows = [(TRAINED_TOKENS, int(tokens)), (WAIT_COUNT, 0), (WAIT_SUM, 0.0)]
            rows += [(_bucket_name(i), 0) for i in range(len(QUEUE_WAIT_BOUNDS) + 1)]
            conn.executemany("INSERT INTO counters (name, value) VALUES (?, ?)", rows)
            _seed_waits(conn)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _seed_waits(conn: sqlite3.Connection) -> None:
    """Each started job's wait from submission to its latest start (what the rows still tell),
    bucketed in one grouped pass (each wait computed once: MATERIALIZED), a write per bucket."""
    wait = "(julianday(started_time) - julianday(created_time)) * 86400.0"
    cases = " ".join(f"WHEN w <= ? THEN {i}" for i in range(len(QUEUE_WAIT_BOUNDS)))
    rows = conn.execute(
        f"WITH t AS MATERIALIZED (SELECT MAX({wait}, 0) AS w FROM jobs WHERE started_time IS "
        f"NOT NULL) SELECT CASE {cases} ELSE {len(QUEUE_WAIT_BOUNDS)} END AS b, COUNT(*), "
        "SUM(w) FROM t GROUP BY b",
        QUEUE_WAIT_BOUNDS,
    ).fetchall()
    for bucket, count, total in rows:
        add(conn, WAIT_COUNT, count)
        add(conn, WAIT_SUM, total or 0.0)
        add(conn, _bucket_name(bucket), count)


def read(conn: sqlite3.Connection) -> Totals:
    """All totals in one read of the small `counters` table."""
    values = dict(conn.execute("SELECT name, value FROM counters").fetchall())
    per_bucket = [int(values.get(_bucket_name(i), 0)) for i in range(len(QUEUE_WAIT_BOUNDS))]
    cumulative, running = [], 0
    for n in per_bucket:
        running += n
        cumulative.append(running)
    waits = QueueWaits(cumulative, int(values.get(WAIT_COUNT, 0)), float(values.get(WAIT_SUM, 0)))
    return Totals(int(values.get(TRAINED_TOKENS, 0)), waits)
