"""Inspection and repair of a damaged state database: ``python -m agent.store {check,recover}``.

Contract
--------
* :func:`check_database` runs a full ``integrity_check`` read-only (safe while the agent runs).
* :func:`recover_database` must run while no agent uses the state directory (it takes the
  lock): the damaged files are *renamed* aside as ``agent.db.corrupt-<UTC ts>`` and kept, a
  scratch copy of them is read so the evidence stays byte-for-byte intact, and every readable
  row of each table is copied into a fresh database with the current schema. Nothing is
  ever deleted.
* :func:`main` is the command line; exit codes 0 ok, 1 damaged database or failed recovery,
  2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from agent.store.db import DB_FILENAME, acquire_state_lock
from agent.store.engine import (
    SIDE_SUFFIXES,
    StoreError,
    connect_read_only,
    move_aside,
    open_database,
)
from agent.store.schema import MIGRATIONS

log = structlog.get_logger(__name__)

#: Tables copied by :func:`recover_database`, in an order that respects their meaning.
SALVAGE_TABLES: Final = (
    "outbox",
    "outbox_keys",
    "outbox_dead",
    "open_session",
    "command_ledger",
    "command_audit",
    "kv",
)


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What :func:`recover_database` did."""

    moved_to: Path | None
    salvaged: dict[str, int]
    errors: dict[str, str]


def _salvage_rows(
    src: sqlite3.Connection, table: str
) -> tuple[list[str], list[tuple[Any, ...]], str | None]:
    """Read as many rows of ``table`` as possible, from both ends around damaged pages."""
    try:
        columns = [str(r[1]) for r in src.execute(f"PRAGMA table_info({table})").fetchall()]
    except sqlite3.Error as exc:
        return [], [], str(exc)
    if not columns:
        return [], [], "table missing"
    rows: dict[Any, tuple[Any, ...]] = {}
    error: str | None = None
    col_list = ", ".join(columns)
    for order in ("ASC", "DESC"):
        try:
            cur = src.execute(f"SELECT rowid, {col_list} FROM {table} ORDER BY rowid {order}")
        except sqlite3.Error:
            try:  # WITHOUT ROWID tables
                cur = src.execute(f"SELECT NULL, {col_list} FROM {table}")
            except sqlite3.Error as exc:
                error = str(exc)
                continue
        try:
            for row in cur:
                key = row[0] if row[0] is not None else row[1:]
                rows.setdefault(key, tuple(row[1:]))
        except sqlite3.Error as exc:
            error = str(exc)
    return columns, list(rows.values()), error


def recover_database(state_dir: str | os.PathLike[str]) -> RecoveryReport:
    """Move a damaged ``agent.db`` aside and rebuild it from every row that can be read.

    Must run while no agent uses the state directory (takes its lock). The damaged files
    (``agent.db`` and its ``-wal``/``-shm``) are *renamed* to ``agent.db.corrupt-<ts>`` and
    kept; a scratch copy is read so the evidence stays byte-for-byte intact. A fresh database
    with the current schema is created and each table's readable rows are copied in (columns
    matched by name, duplicates ignored). Nothing is ever deleted. When there is no database
    file, a fresh one is created and ``moved_to`` is None.
    """
    directory = Path(state_dir)
    lock_fd = acquire_state_lock(directory)
    try:
        path = directory / DB_FILENAME
        moved_to: Path | None = None
        salvaged: dict[str, int] = {}
        errors: dict[str, str] = {}
        if path.exists():
            moved_to = move_aside(path)
        fresh = open_database(path, migrations=MIGRATIONS, synchronous="FULL")
        try:
            if moved_to is not None:
                scratch = directory / f".salvage-{os.getpid()}.db"
                try:
                    shutil.copyfile(moved_to, scratch)
                    for suffix in SIDE_SUFFIXES:
                        side = Path(str(moved_to) + suffix)
                        if side.exists():
                            shutil.copyfile(side, Path(str(scratch) + suffix))
                    src = sqlite3.connect(scratch, isolation_level=None)
                    try:
                        for table in SALVAGE_TABLES:
                            columns, rows, error = _salvage_rows(src, table)
                            if error is not None:
                                errors[table] = error
                            salvaged[table] = _insert_salvaged(fresh, table, columns, rows)
                    finally:
                        src.close()
                finally:
                    for p in (scratch, *(Path(str(scratch) + s) for s in SIDE_SUFFIXES)):
                        p.unlink(missing_ok=True)
        finally:
            fresh.close()
        log.warning(
            "store.recovered",
            path=str(path),
            moved_to=str(moved_to) if moved_to else None,
            salvaged=salvaged,
            errors=errors,
        )
        return RecoveryReport(moved_to=moved_to, salvaged=salvaged, errors=errors)
    finally:
        os.close(lock_fd)


def _insert_salvaged(
    dst: sqlite3.Connection, table: str, columns: list[str], rows: list[tuple[Any, ...]]
) -> int:
    if not rows:
        return 0
    known = {str(r[1]) for r in dst.execute(f"PRAGMA table_info({table})").fetchall()}
    keep = [i for i, c in enumerate(columns) if c in known]
    names = ", ".join(columns[i] for i in keep)
    marks = ", ".join("?" for _ in keep)
    count = 0
    dst.execute("BEGIN IMMEDIATE")
    try:
        for row in rows:
            try:
                cur = dst.execute(
                    f"INSERT OR IGNORE INTO {table} ({names}) VALUES ({marks})",
                    [row[i] for i in keep],
                )
                count += max(cur.rowcount, 0)
            except sqlite3.IntegrityError:
                continue  # a damaged value that violates a CHECK; the evidence file keeps it
        dst.execute("COMMIT")
    except BaseException:
        if dst.in_transaction:
            dst.execute("ROLLBACK")
        raise
    return count


def check_database(state_dir: str | os.PathLike[str]) -> list[str]:
    """Run a full ``integrity_check`` on a state database; return SQLite's findings.

    ``["ok"]`` means healthy. Opens the file read-only and does not need the agent stopped.
    """
    path = Path(state_dir) / DB_FILENAME
    if not path.is_file():
        return [f"no state database at {path}"]
    try:
        conn = connect_read_only(path)
    except sqlite3.Error as exc:
        return [str(exc)]
    try:
        return [str(r[0]) for r in conn.execute("PRAGMA integrity_check(50)").fetchall()]
    except sqlite3.Error as exc:
        return [str(exc)]
    finally:
        conn.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agent.store {check,recover} --state-dir DIR``.

    Exit codes: 0 ok, 1 damaged database or failed recovery, 2 bad usage.
    """
    parser = argparse.ArgumentParser(
        prog="python -m agent.store", description="Inspect or repair the agent's state database."
    )
    sub = parser.add_subparsers(dest="verb", required=True)
    recover_help = (
        "move a damaged agent.db aside and rebuild it from its readable rows (stop the agent first)"
    )
    for verb, text in (
        ("check", "run a full integrity check (read-only; safe while the agent runs)"),
        ("recover", recover_help),
    ):
        p = sub.add_parser(verb, help=text, description=text)
        p.add_argument("--state-dir", required=True, help="the agent's state directory")
    args = parser.parse_args(argv)
    if args.verb == "check":
        findings = check_database(args.state_dir)
        print("\n".join(findings))
        return 0 if findings == ["ok"] else 1
    try:
        report = recover_database(args.state_dir)
    except StoreError as exc:
        print(f"recover failed: {exc}", file=sys.stderr)
        return 1
    if report.moved_to is not None:
        print(f"damaged database kept as {report.moved_to}")
    for table, count in report.salvaged.items():
        note = f"  (stopped early: {report.errors[table]})" if table in report.errors else ""
        print(f"{table:16s} {count:8d} rows salvaged{note}")
    return 0
