"""The state database's schema history (``agent.db``), applied by :mod:`agent.store.engine`.

Append new steps to :data:`MIGRATIONS`; never edit or reorder a released one.
"""

from __future__ import annotations

from typing import Final

from agent.store.engine import Migration

_SCHEMA_V1: Final = """
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    kind            TEXT    NOT NULL CHECK (kind IN ('command_status', 'charging_record',
                                                     'event', 'firmware_status', 'telemetry')),
    priority        INTEGER NOT NULL,
    idem_key        TEXT,
    payload         TEXT    NOT NULL CHECK (json_valid(payload)),
    created_at      REAL    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    last_attempt_at REAL
);
CREATE INDEX outbox_send_order ON outbox (priority, id);

CREATE TABLE outbox_keys (
    kind       TEXT    NOT NULL,
    idem_key   TEXT    NOT NULL,
    item_id    INTEGER NOT NULL,
    state      TEXT    NOT NULL CHECK (state IN ('queued', 'delivered', 'dead')),
    updated_at REAL    NOT NULL,
    PRIMARY KEY (kind, idem_key)
) WITHOUT ROWID;
CREATE INDEX outbox_keys_item ON outbox_keys (item_id);
CREATE INDEX outbox_keys_state ON outbox_keys (state, updated_at);

CREATE TABLE outbox_dead (
    id         INTEGER PRIMARY KEY,
    kind       TEXT    NOT NULL,
    idem_key   TEXT,
    payload    TEXT    NOT NULL,
    created_at REAL    NOT NULL,
    attempts   INTEGER NOT NULL,
    last_error TEXT,
    reason     TEXT    NOT NULL,
    dead_at    REAL    NOT NULL
);

CREATE TABLE command_ledger (
    command_id   TEXT    PRIMARY KEY,
    command      TEXT    NOT NULL,
    connector_id INTEGER,
    params       TEXT    NOT NULL CHECK (json_valid(params)),
    received_at  REAL    NOT NULL,
    status       TEXT    CHECK (status IS NULL
                                OR status IN ('accepted', 'rejected', 'completed', 'failed')),
    message      TEXT,
    details      TEXT    CHECK (details IS NULL OR json_valid(details)),
    status_at    REAL,
    completed    INTEGER NOT NULL DEFAULT 0 CHECK (completed IN (0, 1)),
    last_activity_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX command_ledger_purge ON command_ledger (completed, last_activity_at);

CREATE TABLE command_audit (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    at           REAL    NOT NULL,
    source       TEXT    NOT NULL,
    command_id   TEXT,
    command      TEXT,
    params       TEXT    CHECK (params IS NULL OR json_valid(params)),
    outcome      TEXT    NOT NULL,
    message      TEXT
);
CREATE INDEX command_audit_at ON command_audit (at);
CREATE TRIGGER command_audit_no_update BEFORE UPDATE ON command_audit
BEGIN SELECT RAISE(ABORT, 'command_audit is append-only'); END;
CREATE TRIGGER command_audit_no_delete BEFORE DELETE ON command_audit
BEGIN SELECT RAISE(ABORT, 'command_audit is append-only'); END;

CREATE TABLE kv (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL CHECK (json_valid(value)),
    updated_at REAL NOT NULL,
    expires_at REAL
) WITHOUT ROWID;

CREATE TABLE open_session (
    connector_id INTEGER PRIMARY KEY CHECK (connector_id >= 1),
    record_id    TEXT    NOT NULL UNIQUE,
    opened_at    REAL    NOT NULL,
    start        TEXT    NOT NULL CHECK (json_valid(start)),
    running      TEXT    CHECK (running IS NULL OR json_valid(running)),
    updated_at   REAL    NOT NULL
);
"""

#: The schema history. Append new steps; never edit or reorder a released one.
MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(
        "outbox, delivered keys, dead letters, command ledger and audit, kv, open sessions",
        _SCHEMA_V1,
    ),
)
