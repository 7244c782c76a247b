"""Status snapshot: what ``charger-agent status`` shows, written by the agent, read by the CLI.

The agent and the CLI are separate processes. The agent's :class:`StatusWriter`
replaces ``status.json`` in the runtime directory (:func:`status_path`: ``[charger]
runtime_dir``, else systemd's ``$RUNTIME_DIRECTORY`` -- ``/run/charger-agent``, a tmpfs,
so the once-a-second rewrite never touches flash -- else the state directory) atomically (temp file + rename, mode 0640, no
fsync: the file is a live view, not a record) every ``interval_s``; the CLI reads it
with :func:`read_status`. A snapshot older than :data:`STALE_AFTER_S` means the agent
is not running (or hung).

Contract of the snapshot (``build_status`` output, also the ``--json`` output):

* Plain JSON: dict keys are strings (connector ids too), non-finite floats become
  ``null``, tuples become lists. ``schema`` is :data:`SCHEMA_VERSION`.
* Times are unix seconds (``taken_at``) or ISO 8601 UTC strings ending in ``Z``
  (``started_at``, ``since``, ``last_isolation_test``, ``last_heartbeat_at``). Every age and
  duration in the snapshot is computed at ``taken_at``.
* :class:`StatusWriter` adds ``written_mono`` (``time.monotonic()``, system-wide on
  Linux), ``boot_id`` and ``pid``, so the reader's age survives wall-clock jumps
  (NTP stepping the clock of a controller without RTC).

Inputs of :func:`build_status` (the runtime fills them; every key not marked
required may be missing or ``None``, and is then shown as ``-``):

``connectors``: one dict per connector::

    {"id": 1,                       # required, int
     "kind": "dc" | "ac",
     "state": "charging",           # ConnectorState value
     "plugged": bool | None,
     "power_kw": float | None,      # live meter power, negative while discharging
     "soc": int | None,             # vehicle SOC %, when the vehicle reports it
     "limit_kw": float | None,      # effective power limit
     "unavailable_reason": str | None,
     "last_error": str | None,
     "session": None | {            # the running session
         "record_id": str,          # charging record id (uuid)
         "mode": "charge" | "discharge",
         "started_at": "2025-01-01T10:00:00Z",
         "energy_kwh": float,       # meter_now - meter_start
         "max_power_kw": float | None,
         "soc_start": int | None}}

``duration_s`` of a session is derived from ``started_at`` and ``taken_at``.

``faults``: one dict per active fault::

    {"fault_id": "F-0411",          # required
     "connector_id": int | None,    # None = device-wide
     "since": ISO str | None,       # when it was raised
     "details": dict}

``title`` and ``severity`` are filled from :data:`agent.charging.faults.FAULTS` (see
:func:`fault_entry`); faults are sorted errors first, then by id and connector.

``component_health``: connector id -> the platform-api §14.1 block exactly as
:meth:`agent.maintenance.health.ComponentHealth.build` returns it (unknown values omitted)::

    {"contactor_cycles": int, "contactor_max_cycles": int,
     "relay_state": "closed" | "open" | "fault",
     "cooling_fan_rpm": int, "cooling_fan_status": "ok" | "warning" | "fault",
     "internal_temps": {"power_module" | "control_board" | "ac_inlet" | "dc_outlet": float},
     "isolation_test_kohms": float, "last_isolation_test": ISO str,
     # V2G-capable connectors only:
     "bidirectional_inverter_cycles": int, "bidirectional_inverter_max_cycles": int,
     "harmonic_distortion_v2g_pct": float, "discharge_contactor_cycles": int}

``isolation_age_s`` is derived from ``last_isolation_test`` and ``taken_at``.

``uplink``::

    {"enabled": bool,               # [platform] enabled
     "online": bool,
     "last_heartbeat_at": ISO str | None,   # UplinkStats.last_heartbeat_ok
     "reconnects_10min": int,       # ReconnectBudget.used()
     "reconnect_limit": int | None, # ReconnectBudget.limit (F-0302 above it)
     "reconnects_total": int | None,
     "last_error": str | None,
     "endpoint_errors": {kind: str},   # endpoints backing off while the link is up
     "last_dead_letter": {"kind", "key", "reason", "at"} | None}

``last_heartbeat_age_s`` is derived from ``last_heartbeat_at`` and ``taken_at``.

``outbox``: ``dataclasses.asdict(Outbox.stats())``::

    {"depth": {kind: int}, "dead_letters": int, "used_bytes": int, "max_bytes": int,
     "storage_alarm": bool, "telemetry_thinned": int}

``service_mode``: :meth:`agent.maintenance.service_mode.ServiceMode.status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import structlog

from hal.tick import sleep_to_grid

from agent.charging.faults import FAULTS, Severity
from agent.utctime import iso_to_unix, to_iso
from hal.tasks import stop_task

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1
STATUS_FILE = "status.json"
#: a snapshot older than this means the agent is not running
STALE_AFTER_S = 5.0
FILE_MODE = 0o640
_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


#: systemd's RuntimeDirectory= of the installed unit; the CLI looks there too
DEFAULT_RUNTIME_DIR = Path("/run/charger-agent")


def status_path(
    state_dir: str | os.PathLike[str],
    *,
    runtime_dir: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Path:
    """Where the agent writes its snapshot: ``runtime_dir`` (``[charger] runtime_dir``),
    else the first entry of ``$RUNTIME_DIRECTORY`` (set by systemd for
    ``RuntimeDirectory=``), else ``{state_dir}/status.json`` (a shell or test run)."""
    if runtime_dir is not None:
        return Path(runtime_dir) / STATUS_FILE
    runtime = (os.environ if env is None else env).get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return Path(runtime) / STATUS_FILE
    return Path(state_dir) / STATUS_FILE


def find_status(
    state_dir: str | os.PathLike[str], *, runtime_dir: str | os.PathLike[str] | None = None
) -> Path:
    """The snapshot a reader should use: the most recently written of the agent's path
    (as :func:`status_path` resolves it here), :data:`DEFAULT_RUNTIME_DIR` and the state
    directory; the first of them when none exists."""
    candidates = list(dict.fromkeys([
        status_path(state_dir, runtime_dir=runtime_dir),
        DEFAULT_RUNTIME_DIR / STATUS_FILE,
        Path(state_dir) / STATUS_FILE,
    ]))
    best: tuple[float, Path] | None = None
    for path in candidates:
        try:
            mtime = path.stat().st_mtime
        except OSError:
            continue
        if best is None or mtime > best[0]:
            best = (mtime, path)
    return best[1] if best is not None else candidates[0]


# ---------------------------------------------------------------------------- time helpers


def boot_id() -> str | None:
    """The kernel's boot id (changes on every boot), or ``None`` off Linux."""
    try:
        return Path(_BOOT_ID_PATH).read_text(encoding="ascii").strip() or None
    except OSError:
        return None


# ---------------------------------------------------------------------------- atomic write


def write_json_atomic(path: str | os.PathLike[str], document: Any, *, mode: int = FILE_MODE) -> None:
    """Replace ``path`` with ``document`` as JSON: temp file + rename, file mode ``mode``.

    A reader in another process sees the old or the new file, never a partial one.
    The temp file gets ``mode`` before the rename. When run as root, the file takes
    the owner and group of its directory, so the agent user can read a file written
    by ``sudo charger-agent ...``. No fsync (callers write live views). Raises
    :class:`OSError` (the old file is kept) and ``TypeError``/``ValueError`` for a
    document that is not JSON (non-finite floats included).
    """
    write_text_atomic(path, json.dumps(document, separators=(",", ":"), allow_nan=False) + "\n", mode=mode)


def write_text_atomic(path: str | os.PathLike[str], text: str, *, mode: int = FILE_MODE) -> None:
    """:func:`write_json_atomic` for a document already serialised (``text``)."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), mode)
            if os.geteuid() == 0:
                st = os.stat(target.parent)
                os.fchown(fh.fileno(), st.st_uid, st.st_gid)
            fh.write(text)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------- building


def _clean(value: Any) -> Any:
    """JSON-safe copy: str keys, lists for tuples/sets, ``None`` for NaN/inf, enum values."""
    if isinstance(value, Enum):
        return _clean(value.value)
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_clean(v) for v in value), key=str)
    return str(value)


def fault_entry(
    fault_id: str, connector_id: int | None, *, since: str | None = None, details: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """One ``faults`` entry with ``title`` and ``severity`` from the fault dictionary.

    An id not in :data:`agent.charging.faults.FAULTS` keeps the id as title and severity ``error``
    (shown, never hidden).
    """
    definition = FAULTS.get(fault_id)
    return {
        "fault_id": fault_id,
        "title": definition.title if definition else fault_id,
        "severity": str(definition.severity) if definition else str(Severity.ERROR),
        "connector_id": connector_id,
        "since": since,
        "details": dict(details or {}),
    }


def _age(at_iso: Any, taken_at: float) -> float | None:
    ts = iso_to_unix(at_iso)
    return None if ts is None else max(0.0, taken_at - ts)


def build_status(
    *,
    agent_version: str,
    connectors: list[dict[str, Any]],
    faults: list[dict[str, Any]],
    component_health: Mapping[int, Mapping[str, Any]],
    uplink: Mapping[str, Any],
    outbox: Mapping[str, Any],
    service_mode: Mapping[str, Any],
    taken_at: float,
    started_at: float | None = None,
    serial_number: str | None = None,
) -> dict[str, Any]:
    """The snapshot (shape in the module docstring) from plain data; pure, never raises for
    missing optional keys.

    Adds the derived fields: ``taken_at_iso``, ``uptime_s`` (from ``started_at``, unix
    seconds), each session's ``duration_s``, each fault's ``title``/``severity``/``age_s``,
    each health block's ``isolation_age_s`` and the uplink's ``last_heartbeat_age_s``. Connectors are sorted by id; the inputs are not
    modified.
    """
    out_connectors = []
    for raw in sorted(connectors, key=lambda c: int(c["id"])):
        conn = _clean(raw)
        session = conn.get("session")
        if isinstance(session, dict):
            session["duration_s"] = _age(session.get("started_at"), taken_at)
        out_connectors.append(conn)

    out_faults = []
    for raw in faults:
        entry = fault_entry(
            str(raw["fault_id"]), raw.get("connector_id"), since=raw.get("since"), details=raw.get("details")
        )
        entry["age_s"] = _age(entry["since"], taken_at)
        out_faults.append(_clean(entry))
    out_faults.sort(
        key=lambda f: (f["severity"] != Severity.ERROR.value, f["fault_id"], f["connector_id"] or 0)
    )

    out_health: dict[str, Any] = {}
    for cid, raw_parts in sorted(component_health.items(), key=lambda kv: int(kv[0])):
        parts = _clean(raw_parts)
        if isinstance(parts, dict) and "last_isolation_test" in parts:
            parts["isolation_age_s"] = _age(parts.get("last_isolation_test"), taken_at)
        out_health[str(cid)] = parts

    out_uplink = _clean(uplink)
    out_uplink["last_heartbeat_age_s"] = _age(out_uplink.get("last_heartbeat_at"), taken_at)

    return {
        "schema": SCHEMA_VERSION,
        "agent_version": agent_version,
        "serial_number": serial_number,
        "taken_at": taken_at,
        "taken_at_iso": to_iso(taken_at),
        "started_at": started_at,
        "uptime_s": None if started_at is None else max(0.0, taken_at - started_at),
        "service_mode": _clean(service_mode),
        "connectors": out_connectors,
        "faults": out_faults,
        "component_health": out_health,
        "uplink": out_uplink,
        "outbox": _clean(outbox),
    }


# ---------------------------------------------------------------------------- writing


class StatusWriter:
    """Writes ``collect()`` to ``path`` every ``interval_s`` while running.

    * ``write_once()`` calls ``collect()`` (in the caller's thread: it reads live agent
      state), stamps ``written_mono``/``boot_id``/``pid`` and writes atomically (see
      :func:`write_json_atomic`). When ``collect`` raises or returns something that is
      not JSON, it writes a minimal snapshot instead (``schema``, ``taken_at``,
      ``taken_at_iso``, ``snapshot_error``) so the CLI shows a live agent with a broken
      status rather than "not running", and returns False. A failed write returns
      False and keeps the old file. Never raises; each distinct error is logged once,
      the recovery once.
    * ``start()`` creates the file's directory if missing (a failure shows in the writes),
      writes once at once, then runs the loop as a task; ``stop()`` cancels
      it and leaves the last file in place (it ages into "not running"). Both are
      idempotent.
    """

    def __init__(self, path: str | os.PathLike[str], interval_s: float, collect: Callable[[], dict[str, Any]]) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.path = Path(path)
        self.interval_s = interval_s
        self.collect = collect
        self.writes = 0
        self._task: asyncio.Task[None] | None = None
        self._boot_id = boot_id()
        self._last_error: str | None = None

    def _stamp(self, snapshot: dict[str, Any]) -> dict[str, Any]:
        snapshot["written_mono"] = time.monotonic()
        snapshot["boot_id"] = self._boot_id
        snapshot["pid"] = os.getpid()
        return snapshot

    def _failed(self, error: str) -> bool:
        if error != self._last_error:
            log.error("status_snapshot_failed", path=str(self.path), error=error)
        self._last_error = error
        return False

    def write_once(self) -> bool:
        try:
            snapshot = self._stamp(dict(self.collect()))
            text = json.dumps(snapshot, separators=(",", ":"), allow_nan=False) + "\n"  # serialised once
        except Exception as exc:  # noqa: BLE001 - a status page must never stop the agent
            error = f"{type(exc).__name__}: {exc}"
            now = time.time()
            minimal = {"schema": SCHEMA_VERSION, "taken_at": now, "taken_at_iso": to_iso(now), "snapshot_error": error}
            try:
                write_json_atomic(self.path, self._stamp(minimal))
            except OSError as write_exc:
                return self._failed(f"{error}; write: {write_exc}")
            return self._failed(error)
        try:
            write_text_atomic(self.path, text)
        except OSError as exc:
            return self._failed(f"{type(exc).__name__}: {exc}")
        if self._last_error is not None:
            log.info("status_snapshot_recovered", path=str(self.path))
            self._last_error = None
        self.writes += 1
        return True

    async def run(self) -> None:
        while True:
            self.write_once()
            await sleep_to_grid(self.interval_s)

    async def start(self) -> None:
        if self._task is None:
            with contextlib.suppress(OSError):
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._task = asyncio.create_task(self.run(), name="status-writer")
            await asyncio.sleep(0)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)


# ---------------------------------------------------------------------------- reading


def snapshot_age(snapshot: Mapping[str, Any], *, now: float | None = None, now_mono: float | None = None) -> float | None:
    """Seconds since ``snapshot`` was taken, or ``None`` if it carries no usable time.

    Uses the monotonic stamp when the snapshot was written during this boot (immune
    to wall-clock steps), else the wall clock (``taken_at``). Never negative.
    """
    mono = snapshot.get("written_mono")
    if isinstance(mono, (int, float)) and snapshot.get("boot_id") and snapshot.get("boot_id") == boot_id():
        current = time.monotonic() if now_mono is None else now_mono
        return max(0.0, current - float(mono))
    taken = snapshot.get("taken_at")
    if isinstance(taken, (int, float)) and not isinstance(taken, bool):
        current = time.time() if now is None else now
        return max(0.0, current - float(taken))
    return None


def read_status(
    state_dir: str | os.PathLike[str], *, now: float | None = None, path: Path | None = None
) -> tuple[dict[str, Any] | None, float | None]:
    """``(snapshot, age_s)`` from ``path`` (default ``{state_dir}/status.json``).

    * no file: ``(None, None)``;
    * a file that is not a JSON object: ``(None, age of the file's mtime)``;
    * otherwise the snapshot and :func:`snapshot_age` (``None`` when it has no time).

    Raises :class:`PermissionError` (and other :class:`OSError` but "not found") so the
    CLI can say why it cannot read the file.
    """
    if path is None:
        path = Path(state_dir) / STATUS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    try:
        snapshot = json.loads(text)
    except ValueError:
        snapshot = None
    if not isinstance(snapshot, dict):
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None, None
        return None, max(0.0, (time.time() if now is None else now) - mtime)
    return snapshot, snapshot_age(snapshot, now=now)


def is_stale(age_s: float | None) -> bool:
    """True when there is no age or it exceeds :data:`STALE_AFTER_S`."""
    return age_s is None or age_s > STALE_AFTER_S


# rendering lives in agent.service.status_table; re-exported for callers of this module
from agent.service.status_table import fmt_age, fmt_duration, render_table  # noqa: E402,F401
