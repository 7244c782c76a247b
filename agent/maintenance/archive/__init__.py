"""Per-session telemetry archive: every charging session's 1 s samples, kept locally by record id.

platform-api §14.4 proposes an operator endpoint serving the per-second telemetry of a
completed session, with tiered retention (1 s for 30 days, 1-minute means for 90 days, a
summary after that) and no charger-side upload path yet. Project choice: the agent keeps that
archive itself, keyed by the charging record's ``record_id``, bounded by ``[archive]`` in the
config, so it can be inspected locally (``charger-agent sessions``) and uploaded once an
endpoint exists. The live 5 s telemetry is unaffected.

Storage layout
--------------
``{state_dir}/archive.db``: a SQLite file of its own (never ``agent.db``: losing it must never
touch the outbox), schema version in ``PRAGMA user_version``::

    sessions     (id INTEGER PRIMARY KEY, record_id TEXT UNIQUE, connector_id, mode,
                  start_time REAL, end_time REAL, summary JSON)    -- times in Unix seconds
    samples_1s   (session_id, t_ms, power_w, voltage_dv, current_ca, soc_dp, temp_dc, energy_wh)
    samples_1min (same columns; t_ms = start of the UTC minute, values = means, energy = last)

Both sample tables are ``WITHOUT ROWID`` tables keyed by ``(session_id, t_ms)``. Values are
scaled integers -- ms, W, 0.1 V, 0.01 A, 0.1 %, 0.1 °C, Wh -- 20 to 30 bytes a row, so the
default 200 MiB holds about 2,000 session-hours at 1 s. ``energy`` is the energy moved in
*this session* so far (import when charging, export when discharging), not the meter register.

Contract
--------
* **Durability.** WAL with ``synchronous=NORMAL``: this is diagnostic data, so a commit
  survives a process crash but a power cut may roll back the last few commits. The file is
  never left inconsistent. Samples are buffered in memory and committed every
  ``flush_interval_s``; a crash loses at most that much. Charging records never depend on it.
* **Never in the charging path.** :meth:`SessionArchive.add_sample` only appends to a memory
  buffer. No write method raises because of storage: a failing write is logged
  (``archive.write_failed``) and reported by its return value (``False`` / ``None``); a batch
  of samples that cannot be written is dropped and counted in ``dropped_samples``. The buffer
  holds at most :data:`MAX_BUFFERED` samples; beyond that the oldest are dropped.
* **Threading.** One worker thread owns the only read-write connection; every SQLite call
  runs there, one job at a time in submission order, each job in one transaction. The event
  loop never touches the disk. Call the archive from the event-loop thread only.
* **Read your writes.** Every read (and :meth:`~SessionArchive.end_session`,
  :meth:`~SessionArchive.compact`) first commits the buffered samples, so it sees every
  sample added before it.
* **Tiers** (:meth:`SessionArchive.compact`, with an injectable ``now``): 1 s samples older
  than ``full_resolution_days`` (whole minutes only) are replaced by one row per minute (mean
  power, voltage, current, SOC, temperature; last energy); samples of either kind older than
  ``minute_means_days`` are deleted; the session's summary stays.
* **Bounds.** At most ``max_sessions`` sessions keep samples (the oldest lose theirs first,
  their summaries stay) and at most ``max_summaries`` sessions are listed at all. When the
  data (pages in use) exceeds ``max_bytes``, the oldest sessions lose their samples, then
  their summaries, until it fits. Sessions currently recording (begun and not ended here) are
  never trimmed. Freed pages are returned to the file system (``auto_vacuum=INCREMENTAL``).
* **Open sessions.** A session that is neither ended nor recording and saw no sample for
  :data:`STALE_OPEN_S` (the agent died mid-session and nobody closed it) is closed by
  compaction with a summary computed from its samples and ``"interrupted": true``. Samples are
  never dropped from a session without a summary: one is computed first the same way.
  :meth:`~SessionArchive.begin_session` on an existing record reopens it (a resumed session
  continues under its record) and clears its summary until it ends again.
* **Damaged file.** A file that is not a database is renamed ``archive.db.corrupt-<UTC ts>``
  and a fresh archive is created (the data is diagnostic; the evidence is kept). A file
  written by a newer agent (higher ``user_version``) is not touched: the archive stays
  disabled (``available`` is False) and the agent runs on without it.
* **Readers.** :class:`ArchiveReader` opens the file read-only (``mode=ro``); thanks to WAL it
  can read while the agent writes and never blocks it.

Layout: :mod:`.model` (config, errors, rows), :mod:`.schema` (the file, its schema and
queries), :mod:`.writer` (:class:`SessionArchive`), :mod:`.compaction` (tiers and bounds),
:mod:`.reader` (:class:`ArchiveReader`), :mod:`.recorder` (:class:`SessionRecorder` and the
summaries). The file is opened by the one SQLite engine, :mod:`agent.store.engine`.
"""

from __future__ import annotations

from agent.maintenance.archive.model import (
    ARCHIVE_FILENAME,
    MAX_BUFFERED,
    SAMPLE_COLUMNS,
    STALE_OPEN_S,
    ArchiveConfig,
    ArchiveError,
    ArchiveNotFoundError,
    CompactReport,
    Resolution,
    SampleRow,
    SessionInfo,
)
from agent.maintenance.archive.reader import ArchiveReader
from agent.maintenance.archive.recorder import SessionRecorder, summary_from_record, summary_from_session
from agent.maintenance.archive.schema import SCHEMA_VERSION
from agent.maintenance.archive.writer import SessionArchive

__all__ = [
    "ARCHIVE_FILENAME",
    "MAX_BUFFERED",
    "SAMPLE_COLUMNS",
    "SCHEMA_VERSION",
    "STALE_OPEN_S",
    "ArchiveConfig",
    "ArchiveError",
    "ArchiveNotFoundError",
    "ArchiveReader",
    "CompactReport",
    "Resolution",
    "SampleRow",
    "SessionArchive",
    "SessionInfo",
    "SessionRecorder",
    "summary_from_record",
    "summary_from_session",
]
