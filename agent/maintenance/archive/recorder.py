"""Recording connectors into the archive: one sample per connector per second while a session
runs, and the summary of a session or of its charging record.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog

from agent.maintenance.archive.model import CompactReport, _unix
from agent.maintenance.archive.writer import SessionArchive
from hal.tick import wait_event_to_grid

if TYPE_CHECKING:
    from agent.charging.connector import Connector
    from agent.charging.session import Session

log = structlog.get_logger(__name__)



def summary_from_session(session: Session, end_time: datetime | float) -> dict[str, Any]:
    """The archive summary of a finished :class:`~agent.charging.session.Session` (CDR arithmetic)."""
    start = _unix(session.start_time)
    duration = max(_unix(end_time) - start, 0.0)
    energy = round(session.energy_kwh, 3)
    avg = energy / (max(duration, 1.0) / 3600.0)
    if session.max_power_kw > 0:
        avg = min(avg, session.max_power_kw)
    return {
        "energy_kwh": energy,
        "max_power_kw": round(max(session.max_power_kw, avg), 3),
        "avg_power_kw": round(avg, 3),
        "soc_start": session.soc_start,
        "soc_end": session.soc_now,
        "stop_reason": session.stop_reason,
        "duration_s": round(duration, 1),
        "mode": session.request.mode,
    }


def summary_from_record(record: Mapping[str, Any], stop_reason: str | None = None) -> dict[str, Any]:
    """The archive summary of a charging record (ChargingRecordUpload body).

    For sessions closed outside a running connector, e.g. from a checkpoint after a restart.
    ``stop_reason`` overrides the record's (absent when CDR extensions are off).
    """
    vehicle = record.get("vehicle_info") or {}
    start = datetime.fromisoformat(str(record["start_time"]))
    end = datetime.fromisoformat(str(record["end_time"]))
    return {
        "energy_kwh": record.get("energy"),
        "max_power_kw": record.get("max_power"),
        "avg_power_kw": record.get("avg_power"),
        "soc_start": vehicle.get("soc_start"),
        "soc_end": vehicle.get("soc_end"),
        "stop_reason": stop_reason if stop_reason is not None else record.get("stop_reason"),
        "duration_s": max((end - start).total_seconds(), 0.0),
    }


class SessionRecorder:
    """Feeds a :class:`SessionArchive` from the connectors: one sample a second per session.

    Each :meth:`poll` looks at every connector's ``session``: a new one is begun in the
    archive, a running one gets a sample (meter power/voltage/current, session energy from the
    import -- or, discharging, export -- register, the vehicle's SOC, the outlet sensor's
    temperature or else the meter's), and one that disappeared with a ``stop_reason`` is ended
    with :func:`summary_from_session`. One that disappeared without a stop reason was
    suspended for a shutdown: it stays open for the resume. A connector whose devices raise
    is skipped for that poll (logged); the recorder never fails the agent.
    """

    def __init__(
        self,
        archive: SessionArchive,
        connectors: Sequence[Connector],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.archive = archive
        self.connectors = list(connectors)
        self._clock = clock
        self._seen: dict[int, Session] = {}
        self._compaction: asyncio.Task[CompactReport | None] | None = None

    async def poll(self) -> None:
        """One step: notice begun/ended sessions, sample every running one."""
        now = self._clock()
        for connector in self.connectors:
            current = connector.session
            previous = self._seen.get(connector.id)
            if previous is not None and previous is not current:
                del self._seen[connector.id]
                if previous.stop_reason is not None:
                    await self.archive.end_session(
                        previous.record_id, summary_from_session(previous, now), end_time=now
                    )
            if current is None:
                continue
            if previous is not current:
                self._seen[connector.id] = current
                await self.archive.begin_session(
                    current.record_id, connector.id, current.start_time, current.request.mode
                )
            try:
                self._sample(connector, current, now)
            except Exception as exc:  # noqa: BLE001 - a driver bug must not stop the recording
                log.warning("archive.sample_failed", connector=connector.id, error=repr(exc))

    def _sample(self, connector: Connector, session: Session, now: float) -> None:
        reading = connector.hw.meter.reading()
        soc = connector.hw.vehicle.status().soc
        temperature: float | None = None
        thermal, sensor = connector.hw.thermal, connector.config.outlet_sensor
        if thermal is not None and sensor:
            found = thermal.temperatures().get(sensor)
            temperature = found.celsius if found is not None else None
        energy: float | None = None
        power = voltage = current = None
        if reading is not None:
            power, voltage, current = reading.power_kw, reading.voltage, reading.current
            if temperature is None:
                temperature = reading.temperature
            register = reading.energy_export_kwh if session.request.mode == "discharge" else reading.energy_import_kwh
            energy = max(register - session.meter_start, 0.0)
        self.archive.add_sample(
            session.record_id, connector.id, now, power, voltage, current,
            None if soc is None else float(soc), temperature, energy,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every second and compact every ``compact_interval_s`` (first at once) until ``stop``.

        Set ``stop`` only after the connectors have stopped: a last poll then closes the
        sessions the shutdown ended. Compaction runs beside the polling, never two at once.
        """
        loop = asyncio.get_running_loop()
        next_compact = loop.time()
        while not stop.is_set():
            if loop.time() >= next_compact and (self._compaction is None or self._compaction.done()):
                self._compaction = asyncio.create_task(self.archive.compact(), name="archive-compact")
                next_compact = loop.time() + self.archive.config.compact_interval_s
            await self.poll()
            # on the shared tick grid: a slow poll skips a slot, never bursts, and the
            # wake-up is shared with every other 1 s job
            await wait_event_to_grid(stop, 1.0)
        await self.poll()
        if self._compaction is not None:
            await self._compaction
