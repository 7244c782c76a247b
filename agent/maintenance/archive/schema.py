"""``archive.db``: its schema history, how it is opened (the one SQLite engine, ``synchronous=NORMAL``,
a damaged file replaced) and the queries any connection (writer or read-only) runs.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from agent.maintenance.archive.model import SampleRow, SessionInfo, _STORED, _VALUES, _dec
from agent.store.engine import Migration, open_database

_SCHEMA_V1: Final = f"""
CREATE TABLE sessions (
    id           INTEGER PRIMARY KEY,
    record_id    TEXT    NOT NULL UNIQUE,
    connector_id INTEGER NOT NULL,
    mode         TEXT,
    start_time   REAL    NOT NULL,
    end_time     REAL,
    summary      TEXT    CHECK (summary IS NULL OR json_valid(summary))
);
CREATE INDEX sessions_start ON sessions (start_time);
CREATE TABLE samples_1s (
    session_id INTEGER NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    t_ms       INTEGER NOT NULL,
    {", ".join(f"{col} INTEGER" for _, col, _ in _VALUES)},
    PRIMARY KEY (session_id, t_ms)
) WITHOUT ROWID;
CREATE TABLE samples_1min (
    session_id INTEGER NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    t_ms       INTEGER NOT NULL,
    {", ".join(f"{col} INTEGER" for _, col, _ in _VALUES)},
    PRIMARY KEY (session_id, t_ms)
) WITHOUT ROWID;
"""


#: The schema history; ``user_version`` is the number applied. Append, never edit.
_MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration("sessions, 1 s and 1 min samples", _SCHEMA_V1),
)


SCHEMA_VERSION: Final = len(_MIGRATIONS)


def _open_or_replace(path: Path) -> sqlite3.Connection:
    """Open ``path`` read-write (WAL, ``synchronous=NORMAL``); a damaged file is moved aside
    once and a fresh one created; a newer schema raises :class:`StoreVersionError`."""
    return open_database(
        path, migrations=_MIGRATIONS, synchronous="NORMAL", on_damage="replace", log_name="archive"
    )


_SESSION_COLUMNS: Final = """
    s.record_id, s.connector_id, s.mode, s.start_time, s.end_time, s.summary,
    (SELECT count(*) FROM samples_1s WHERE session_id = s.id),
    (SELECT count(*) FROM samples_1min WHERE session_id = s.id)
"""


def _session_info(row: Sequence[Any]) -> SessionInfo:
    summary = json.loads(row[5]) if row[5] else {}
    return SessionInfo(
        record_id=str(row[0]),
        connector_id=int(row[1]),
        mode=row[2],
        start_time=float(row[3]),
        end_time=None if row[4] is None else float(row[4]),
        summary=summary if isinstance(summary, dict) else {},
        samples_1s=int(row[6]),
        samples_1min=int(row[7]),
    )


def _q_list(conn: sqlite3.Connection, limit: int) -> list[SessionInfo]:
    rows = conn.execute(
        f"SELECT {_SESSION_COLUMNS} FROM sessions s ORDER BY s.start_time DESC, s.id DESC LIMIT ?",
        (max(int(limit), 0),),
    ).fetchall()
    return [_session_info(r) for r in rows]


def _q_get(conn: sqlite3.Connection, record_id: str) -> SessionInfo | None:
    row = conn.execute(f"SELECT {_SESSION_COLUMNS} FROM sessions s WHERE s.record_id = ?", (record_id,)).fetchone()
    return None if row is None else _session_info(row)


def _q_find(conn: sqlite3.Connection, prefix: str) -> list[str]:
    pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    rows = conn.execute(
        "SELECT record_id FROM sessions WHERE record_id LIKE ? ESCAPE '\\' ORDER BY start_time DESC LIMIT 20",
        (pattern,),
    ).fetchall()
    return [str(r[0]) for r in rows]


def _q_samples(conn: sqlite3.Connection, record_id: str) -> list[SampleRow]:
    row = conn.execute("SELECT id FROM sessions WHERE record_id = ?", (record_id,)).fetchone()
    if row is None:
        return []
    sid = int(row[0])
    cur = conn.execute(
        f"SELECT t_ms, '1min', {_STORED} FROM samples_1min WHERE session_id = ? "
        f"UNION ALL SELECT t_ms, '1s', {_STORED} FROM samples_1s WHERE session_id = ? ORDER BY 1",
        (sid, sid),
    )
    return [
        SampleRow(
            r[0] / 1000.0,
            r[1],
            *(_dec(r[2 + i], scale) for i, (_, _, scale) in enumerate(_VALUES)),
        )
        for r in cur
    ]


def _computed_summary(conn: sqlite3.Connection, sid: int, start_time: float, end_time: float | None) -> dict[str, Any]:
    """Summary fields derived from the stored samples (both tiers) of session ``sid``."""
    union = (
        f"SELECT t_ms, {_STORED} FROM samples_1s WHERE session_id = :sid "
        f"UNION ALL SELECT t_ms, {_STORED} FROM samples_1min WHERE session_id = :sid"
    )
    agg = conn.execute(
        f"SELECT count(*), max(t_ms), max(abs(power_w)), avg(power_w) FROM ({union})", {"sid": sid}
    ).fetchone()
    count, last_ms, max_w, avg_w = agg

    def edge(column: str, order: str) -> Any:
        row = conn.execute(
            f"SELECT {column} FROM ({union}) WHERE {column} IS NOT NULL ORDER BY t_ms {order} LIMIT 1",
            {"sid": sid},
        ).fetchone()
        return None if row is None else row[0]

    end = end_time if end_time is not None else (last_ms / 1000.0 if last_ms is not None else start_time)
    duration = max(end - start_time, 0.0)
    energy_wh = edge("energy_wh", "DESC")
    soc_start, soc_end = edge("soc_dp", "ASC"), edge("soc_dp", "DESC")
    energy = None if energy_wh is None else round(energy_wh / 1000.0, 3)
    avg_kw: float | None
    if energy is not None:
        avg_kw = round(energy / (max(duration, 1.0) / 3600.0), 3)
        if max_w is not None:
            avg_kw = min(avg_kw, max_w / 1000.0)
    else:
        avg_kw = None if avg_w is None else round(avg_w / 1000.0, 3)
    return {
        "energy_kwh": energy,
        "max_power_kw": None if max_w is None else round(max_w / 1000.0, 3),
        "avg_power_kw": avg_kw,
        "soc_start": None if soc_start is None else soc_start / 10.0,
        "soc_end": None if soc_end is None else soc_end / 10.0,
        "stop_reason": None,
        "duration_s": round(duration, 1),
        "samples_recorded": int(count),
    }
