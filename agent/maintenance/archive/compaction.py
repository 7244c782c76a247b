"""Compaction of ``archive.db``: tiers (1 s -> 1 min -> summary only), bounds on sessions,
summaries and bytes, and closing sessions left open by a dead agent.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Final

import structlog

from agent.maintenance.archive.model import (
    ArchiveConfig,
    CompactReport,
    STALE_OPEN_S,
    _DAY_MS,
    _MINUTE_MS,
    _STORED,
    _VALUES,
)
from agent.maintenance.archive.schema import _computed_summary

log = structlog.get_logger(__name__)



def _used_bytes(conn: sqlite3.Connection) -> int:
    size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
    free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    return size * (pages - free)


def _release_free_pages(conn: sqlite3.Connection) -> None:
    """Return the free pages to the file system (outside a transaction).

    ``execute()`` steps a statement once, which frees a single page; ``executescript()`` runs
    the pragma to completion in its own transaction.
    """
    conn.executescript("PRAGMA incremental_vacuum;")


def _finalize(conn: sqlite3.Connection, sid: int) -> None:
    """Give an open session a summary computed from its samples (``interrupted``)."""
    row = conn.execute("SELECT start_time, end_time, summary FROM sessions WHERE id = ?", (sid,)).fetchone()
    if row is None or row[2] is not None:
        return
    summary = _computed_summary(conn, sid, float(row[0]), row[1])
    summary["interrupted"] = True
    end = row[1] if row[1] is not None else float(row[0]) + summary["duration_s"]
    conn.execute("UPDATE sessions SET end_time = ?, summary = ? WHERE id = ?", (end, json.dumps(summary), sid))


def _drop_samples(conn: sqlite3.Connection, sid: int) -> None:
    _finalize(conn, sid)
    conn.execute("DELETE FROM samples_1s WHERE session_id = ?", (sid,))
    conn.execute("DELETE FROM samples_1min WHERE session_id = ?", (sid,))


def _drop_session(conn: sqlite3.Connection, sid: int) -> None:
    conn.execute("DELETE FROM samples_1s WHERE session_id = ?", (sid,))
    conn.execute("DELETE FROM samples_1min WHERE session_id = ?", (sid,))
    conn.execute("DELETE FROM sessions WHERE id = ?", (sid,))


_HAS_SAMPLES: Final = (
    "(EXISTS (SELECT 1 FROM samples_1s WHERE session_id = s.id) "
    "OR EXISTS (SELECT 1 FROM samples_1min WHERE session_id = s.id))"
)


def _active_ids(conn: sqlite3.Connection, active: Iterable[str]) -> set[int]:
    ids: set[int] = set()
    for record_id in active:
        row = conn.execute("SELECT id FROM sessions WHERE record_id = ?", (record_id,)).fetchone()
        if row is not None:
            ids.add(int(row[0]))
    return ids


def _compact(conn: sqlite3.Connection, now_ms: int, cfg: ArchiveConfig, active: frozenset[str]) -> CompactReport:
    keep = _active_ids(conn, active)

    # stale open sessions (agent died mid-session, nobody closed them)
    stale_before = now_ms - STALE_OPEN_S * 1000
    finalized = 0
    open_rows = conn.execute(
        "SELECT s.id, max(coalesce((SELECT max(t_ms) FROM samples_1s WHERE session_id = s.id), 0), "
        "coalesce((SELECT max(t_ms) FROM samples_1min WHERE session_id = s.id), 0), "
        "CAST(s.start_time * 1000 AS INTEGER)) FROM sessions s WHERE s.end_time IS NULL"
    ).fetchall()
    for sid, last_ms in open_rows:
        if sid not in keep and last_ms < stale_before:
            _finalize(conn, int(sid))
            finalized += 1

    # tier 1: 1 s -> 1-minute means, whole minutes older than the cut only
    cut1 = (now_ms - cfg.full_resolution_days * _DAY_MS) // _MINUTE_MS * _MINUTE_MS
    old1 = "SELECT id FROM sessions WHERE start_time < :cut / 1000.0"
    # energy_wh is a bare column: SQLite takes it from the row where max(t_ms) is found
    means = ", ".join(
        "energy_wh" if col == "energy_wh" else f"CAST(round(avg({col})) AS INTEGER) AS {col}"
        for _, col, _ in _VALUES
    )
    created = conn.execute(
        f"INSERT OR IGNORE INTO samples_1min (session_id, t_ms, {_STORED}) "
        f"SELECT session_id, m, {_STORED} FROM ("
        f"  SELECT session_id, (t_ms / {_MINUTE_MS}) * {_MINUTE_MS} AS m, max(t_ms) AS last_t, {means} "
        f"  FROM samples_1s WHERE session_id IN ({old1}) AND t_ms < :cut GROUP BY session_id, m)",
        {"cut": cut1},
    ).rowcount
    merged = conn.execute(
        f"DELETE FROM samples_1s WHERE session_id IN ({old1}) AND t_ms < :cut", {"cut": cut1}
    ).rowcount

    # tier 2: older than minute_means_days -> summary only
    cut2 = now_ms - cfg.minute_means_days * _DAY_MS
    expiring = conn.execute(
        f"SELECT DISTINCT session_id FROM samples_1min WHERE session_id IN ({old1}) AND t_ms < :cut "
        f"UNION SELECT DISTINCT session_id FROM samples_1s WHERE session_id IN ({old1}) AND t_ms < :cut",
        {"cut": cut2},
    ).fetchall()
    for (sid,) in expiring:
        if int(sid) not in keep:
            _finalize(conn, int(sid))
    expired = 0
    for table in ("samples_1min", "samples_1s"):
        expired += conn.execute(
            f"DELETE FROM {table} WHERE session_id IN ({old1}) AND t_ms < :cut", {"cut": cut2}
        ).rowcount

    # bounds: sessions with samples, sessions at all
    trimmed = 0
    with_samples = [
        int(r[0])
        for r in conn.execute(
            f"SELECT s.id FROM sessions s WHERE {_HAS_SAMPLES} ORDER BY s.start_time DESC, s.id DESC"
        ).fetchall()
    ]
    for sid in with_samples[cfg.max_sessions :]:
        if sid not in keep:
            _drop_samples(conn, sid)
            trimmed += 1
    dropped = 0
    for (sid,) in conn.execute(
        "SELECT id FROM sessions ORDER BY start_time DESC, id DESC LIMIT -1 OFFSET ?", (cfg.max_summaries,)
    ).fetchall():
        if int(sid) not in keep:
            _drop_session(conn, int(sid))
            dropped += 1

    # byte budget: oldest samples first, then oldest summaries
    used = _used_bytes(conn)
    while used > cfg.max_bytes:
        limit = len(keep) + 1  # the oldest session not recording is among these
        victims = conn.execute(
            f"SELECT s.id FROM sessions s WHERE {_HAS_SAMPLES} ORDER BY s.start_time, s.id LIMIT ?", (limit,)
        ).fetchall()
        candidates = [int(r[0]) for r in victims if int(r[0]) not in keep]
        if candidates:
            _drop_samples(conn, candidates[0])
            trimmed += 1
        else:
            rows = conn.execute("SELECT id FROM sessions ORDER BY start_time, id LIMIT ?", (limit,)).fetchall()
            spare = [int(r[0]) for r in rows if int(r[0]) not in keep]
            if not spare:
                log.warning("archive.over_budget", bytes_used=used, max_bytes=cfg.max_bytes)
                break
            _drop_session(conn, spare[0])
            dropped += 1
        used = _used_bytes(conn)

    return CompactReport(
        finalized=finalized,
        minute_rows_created=max(created, 0),
        second_rows_merged=max(merged, 0),
        expired_rows=max(expired, 0),
        sessions_trimmed=trimmed,
        summaries_dropped=dropped,
        bytes_used=_used_bytes(conn),
    )
