"""Small helpers shared by the state-database tests."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)
