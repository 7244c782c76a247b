"""Session archive samples as CSV: one format for ``charger-agent sessions show --csv`` and log bundles.

Header :data:`CSV_COLUMNS`: Unix time (ms precision), the same time as ISO 8601 UTC, the
resolution (``1s`` / ``1min``), then power (kW), voltage (V), current (A), SOC (%),
temperature (°C) and session energy (kWh); an unknown value is an empty cell.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime
from typing import Final, Sequence, TextIO

from agent.maintenance.archive import SAMPLE_COLUMNS, SampleRow, SessionArchive
from agent.utctime import to_iso

CSV_COLUMNS: Final = ("t_unix", "time_utc", *SAMPLE_COLUMNS[1:])
#: Sessions listed when looking for those that overlap a bundle's window.
SCAN_SESSIONS: Final = 200


def write_csv(samples: Sequence[SampleRow], out: TextIO) -> None:
    """Every sample as CSV with header :data:`CSV_COLUMNS`; unknown values are empty."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in samples:
        values = (r.power_kw, r.voltage, r.current, r.soc, r.temperature, r.energy_kwh)
        writer.writerow([f"{r.t:.3f}", to_iso(r.t), r.resolution, *("" if v is None else f"{v:.10g}" for v in values)])


async def session_csv_files(
    archive: SessionArchive, since: datetime, until: datetime, *, limit: int = 20
) -> list[tuple[str, bytes]]:
    """``(record_id.csv, bytes)`` for each archived session overlapping ``[since, until]``, newest first.

    A session still running counts as lasting until ``until``. At most ``limit`` files;
    archive read errors are the archive's own (logged there, empty results).
    """
    files: list[tuple[str, bytes]] = []
    for info in await archive.list_sessions(limit=SCAN_SESSIONS):
        start = float(info.start_time)
        end = float(info.end_time) if info.end_time is not None else until.timestamp()
        if end < since.timestamp() or start > until.timestamp():
            continue
        out = io.StringIO()
        write_csv(await archive.samples(info.record_id), out)
        files.append((f"{info.record_id}.csv", out.getvalue().encode()))
        if len(files) >= limit:
            break
    return files
