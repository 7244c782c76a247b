"""The one SQLite engine: error mapping, durability and damaged-file policy as parameters."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Literal

import pytest

from agent.store import StoreCorruptError, StoreFullError, StoreIOError
from agent.store.engine import Migration, StoreVersionError, map_sqlite_error, open_database


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (13, StoreFullError),  # SQLITE_FULL
        (10 | (4 << 8), StoreIOError),  # SQLITE_IOERR_FSYNC-style extended code
        (11, StoreCorruptError),  # SQLITE_CORRUPT
        (26, StoreCorruptError),  # SQLITE_NOTADB
    ],
)
def test_sqlite_errors_are_mapped(code: int, expected: type[Exception]) -> None:
    exc = sqlite3.OperationalError("boom")
    exc.sqlite_errorcode = code
    mapped = map_sqlite_error(exc, Path("/state/agent.db"))
    assert isinstance(mapped, expected) and mapped.__cause__ is exc
    other = sqlite3.IntegrityError("constraint")
    other.sqlite_errorcode = 19
    assert map_sqlite_error(other) is other
    assert isinstance(map_sqlite_error(ValueError("x")), ValueError)


STEPS = (Migration("one table", "CREATE TABLE t (x INTEGER);"),)


@pytest.mark.parametrize(("durability", "expected"), [("FULL", 2), ("NORMAL", 1)])
def test_durability_is_a_parameter(tmp_path: Path, durability: Literal["FULL", "NORMAL"], expected: int) -> None:
    conn = open_database(tmp_path / "x.db", migrations=STEPS, synchronous=durability)
    try:
        pragmas = [conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("journal_mode", "synchronous", "auto_vacuum", "user_version")]
    finally:
        conn.close()
    assert pragmas == ["wal", expected, 2, 1]


def test_damaged_file_is_refused_untouched_or_replaced_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    junk = b"not a database at all " * 100
    path.write_bytes(junk)
    with pytest.raises(StoreCorruptError):
        open_database(path, migrations=STEPS, synchronous="FULL", on_damage="refuse")
    assert path.read_bytes() == junk and list(tmp_path.iterdir()) == [path]
    conn = open_database(path, migrations=STEPS, synchronous="NORMAL", on_damage="replace")
    try:
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    finally:
        conn.close()
    (kept,) = tmp_path.glob("x.db.corrupt-*")
    assert kept.read_bytes() == junk


def test_newer_schema_is_refused_whatever_the_damage_policy(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA user_version = 7")
    before = path.read_bytes()
    with pytest.raises(StoreVersionError, match="schema version 7"):
        open_database(path, migrations=STEPS, synchronous="NORMAL", on_damage="replace")
    assert path.read_bytes() == before and not list(tmp_path.glob("*.corrupt-*"))

