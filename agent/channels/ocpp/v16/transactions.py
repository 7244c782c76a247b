"""Connector sessions as OCPP 1.6 transactions, journaled before they are sent.

A :class:`TxTracker` watches the connectors (it polls them; the connector knows nothing
of OCPP) and turns what it sees into transaction messages appended to the
:class:`~agent.channels.ocpp.journal.Journal`:

* a new session -> StartTransaction (idTag: the tag that authorised it, or the free-vend
  tag), the local transaction keyed by the session's ``record_id``;
* every ``MeterValueSampleInterval`` s of a session -> MeterValues (context
  Sample.Periodic, measurands ``MeterValuesSampledData``); every
  ``ClockAlignedDataInterval`` -> Sample.Clock values (``MeterValuesAlignedData``);
* the session's end -> StopTransaction (reason mapped from the stop reason, or the one the
  channel asked for, e.g. Remote, SoftReset, DeAuthorized), ``meterStop`` never below
  ``meterStart`` or any register already reported, with ``StopTxnSampledData``;
* a session suspended by a clean shutdown keeps its transaction open (a resume continues
  it); an open transaction whose session is gone after a restart (kill -9, power loss, a
  resume that failed) is stopped with reason PowerLoss.

``Energy.Active.Import.Register`` is the billing meter's import register in Wh and never
decreases within a transaction.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import structlog

from agent.channels.ocpp.interface import ChargerPort
from agent.channels.ocpp.journal import Journal, TxRow
from agent.channels.ocpp.mapping import stop_reason
from agent.channels.ocpp.settings import Settings
from agent.charging.connector import Connector, Rejected
from agent.charging.session import Session, SessionRequest
from agent.utctime import to_iso as iso, utc_now

log = structlog.get_logger(__name__)

POLL_S = 0.2


@dataclass
class PendingStart:
    id_tag: str
    expires: float  # monotonic
    remote: bool
    requested_at: float | None = None  # when the connector was asked to start


def sampled_values(connector: Connector, measurands: list[str], context: str, floor_wh: int = 0) -> list[dict[str, Any]]:
    """SampledValue entries (snake_case) for the measurands the meter can give now."""
    reading = connector.hw.meter.reading()
    if reading is None:
        return []
    soc = connector.hw.vehicle.status().soc
    out: list[dict[str, Any]] = []
    for m in measurands:
        value: float | None
        unit: str | None
        if m == "Energy.Active.Import.Register":
            value, unit = max(float(round(reading.energy_import_kwh * 1000)), float(floor_wh)), "Wh"
        elif m == "Energy.Active.Export.Register":
            value, unit = round(reading.energy_export_kwh * 1000), "Wh"
        elif m == "Power.Active.Import":
            value, unit = round(max(reading.power_kw, 0.0) * 1000, 1), "W"
        elif m == "Current.Import":
            value, unit = round(abs(reading.current), 2), "A"
        elif m == "Voltage":
            value, unit = round(reading.voltage, 1), "V"
        elif m == "SoC":
            value, unit = (float(soc), "Percent") if soc is not None else (None, None)
        else:
            continue
        if value is None:
            continue
        text = str(int(value)) if unit == "Wh" else f"{value:g}"
        entry = {"value": text, "context": context, "measurand": m, "unit": unit}
        if m in ("Energy.Active.Import.Register", "Energy.Active.Export.Register", "Power.Active.Import", "Current.Import"):
            entry["location"] = "Outlet"
        if m == "SoC":
            entry["location"] = "EV"
        out.append(entry)
    return out


def register_wh(values: list[dict[str, Any]]) -> int | None:
    for v in values:
        if v.get("measurand") == "Energy.Active.Import.Register":
            return int(v["value"])
    return None


class TxTracker:
    """Run :meth:`run` as a task; ``wake_sender`` is called after every journal append."""

    def __init__(
        self,
        port: ChargerPort,
        journal: Journal,
        settings: Settings,
        wake_sender: Callable[[], None],
        send_volatile: Callable[[str, dict[str, Any]], None],
        free_vend_id_tag: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.port = port
        self.journal = journal
        self.settings = settings
        self.wake_sender = wake_sender
        self.send_volatile = send_volatile
        self.free_vend_id_tag = free_vend_id_tag
        self.clock = clock
        self.pending: dict[int, PendingStart] = {}
        self.stop_override: dict[str, str] = {}  # local_tx -> OCPP Reason
        self.finishing: set[int] = set()
        self._tracked: dict[int, Session] = {}
        self._rows: dict[str, TxRow] = {}  # open local transactions
        self._last_wh: dict[str, int] = {}
        self._next_sample: dict[int, float] = {}
        self._next_aligned: float | None = None
        self.on_start_failed: Callable[[int, str, str], None] | None = None  # (connector, id_tag, why)

    async def load(self) -> None:
        for row in await self.journal.transactions():
            self._rows[row.local_tx] = row
            self._last_wh[row.local_tx] = row.last_wh

    def id_tag(self, connector_id: int) -> str | None:
        """idTag of the transaction running on ``connector_id``."""
        session = self._tracked.get(connector_id)
        row = self._rows.get(session.record_id) if session is not None else None
        return row.id_tag if row is not None else None

    def local_tx_of(self, transaction_id: int) -> tuple[int, str] | None:
        """(connector, local_tx) of an open transaction with this CSMS transactionId."""
        for row in self._rows.values():
            if row.transaction_id == transaction_id:
                return row.connector, row.local_tx
        return None

    def transaction_answered(self, local_tx: str, transaction_id: int) -> None:
        """The CSMS gave ``transaction_id``: later messages and the Tellus record refer to it."""
        row = self._rows.get(local_tx)
        if row is not None:
            self._rows[local_tx] = TxRow(**{**row.__dict__, "transaction_id": transaction_id})
        for session in self._tracked.values():
            if session.record_id == local_tx:
                session.request.transaction_id = str(transaction_id)

    def stop(self, connector_id: int, ocpp_reason: str, reason: str = "remote_stop") -> bool:
        """Stop the transaction on ``connector_id`` (False: none running)."""
        connector = self.port.connectors.get(connector_id)
        session = self._tracked.get(connector_id)
        if connector is None or session is None:
            return False
        self.stop_override[session.record_id] = ocpp_reason
        try:
            connector.request_stop(reason)
        except Rejected:
            return False
        return True

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        while True:
            for cid, connector in list(self.port.connectors.items()):
                try:
                    await self._poll(cid, connector)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("ocpp_tx_poll_failed", connector=cid)
            await self._close_orphans()
            await self._aligned()
            await asyncio.sleep(POLL_S)

    async def _poll(self, cid: int, connector: Connector) -> None:
        session = connector.session
        tracked = self._tracked.get(cid)
        if tracked is not None and session is not tracked:
            del self._tracked[cid]
            await self._ended(cid, connector, tracked)
        if session is not None and self._tracked.get(cid) is not session:
            await self._started(cid, connector, session)
        if session is not None:
            await self._sample(cid, connector, session)
        if not connector.hw.vehicle.status().plugged:
            self.finishing.discard(cid)
        pending = self.pending.get(cid)
        if pending is not None and session is None:
            if pending.requested_at is not None:
                # asked to start: the session appears after preparation; back to connected
                # without one means the preparation failed (the authorisation is used up)
                if not connector.in_session() and self.clock() - pending.requested_at > 3.0:
                    del self.pending[cid]
                    if self.on_start_failed is not None:
                        self.on_start_failed(cid, pending.id_tag, "the session did not start")
            elif self.clock() > pending.expires:
                del self.pending[cid]
                log.info("ocpp_start_timed_out", connector=cid, id_tag=pending.id_tag)
            elif connector.state.value == "vehicle_connected" and not connector.in_session():
                try:
                    connector.request_start(SessionRequest(start_reason="remote_start" if pending.remote else "local_auth"))
                    pending.requested_at = self.clock()
                except Rejected as exc:
                    del self.pending[cid]
                    if self.on_start_failed is not None:
                        self.on_start_failed(cid, pending.id_tag, str(exc))

    async def _started(self, cid: int, connector: Connector, session: Session) -> None:
        self._tracked[cid] = session
        self.finishing.discard(cid)
        local = session.record_id
        if local in self._rows:  # a resumed session continues its transaction
            row = self._rows[local]
            if row.transaction_id is not None:
                session.request.transaction_id = str(row.transaction_id)
            return
        pending = self.pending.pop(cid, None)
        id_tag = pending.id_tag if pending is not None else self.free_vend_id_tag
        meter_start = int(round(session.meter_start * 1000))
        row = TxRow(local, cid, id_tag, meter_start, meter_start, None, True, iso(session.start_time))
        payload = {"connector_id": cid, "id_tag": id_tag, "meter_start": meter_start, "timestamp": iso(session.start_time)}
        if await self.journal.start_transaction(row, payload):
            self._rows[local] = row
            self._last_wh[local] = meter_start
            self._next_sample[cid] = self.clock() + self._interval()
            log.info("ocpp_transaction_started", connector=cid, local_tx=local, id_tag=id_tag, meter_start=meter_start)
            self.wake_sender()

    def _interval(self) -> float:
        return float(self.settings.get_int("MeterValueSampleInterval"))

    async def _sample(self, cid: int, connector: Connector, session: Session) -> None:
        interval = self._interval()
        local = session.record_id
        if interval <= 0 or local not in self._rows:
            return
        due = self._next_sample.get(cid)
        now = self.clock()
        if due is None or due > now + interval:  # first sample, or the interval was shortened
            self._next_sample[cid] = due = now + interval
        if now < due:
            return
        self._next_sample[cid] = due + interval if due + interval > now else now + interval
        values = sampled_values(connector, self.settings.get_list("MeterValuesSampledData"), "Sample.Periodic", self._last_wh.get(local, 0))
        if values:
            await self._journal_values(cid, local, values)

    async def _journal_values(self, cid: int, local: str, values: list[dict[str, Any]]) -> None:
        wh = register_wh(values)
        payload = {"connector_id": cid, "transaction_id": 0, "meter_value": [{"timestamp": iso(utc_now()), "sampled_value": values}]}
        await self.journal.meter_values(local, payload, wh)
        if wh is not None:
            self._last_wh[local] = max(self._last_wh.get(local, 0), wh)
        self.wake_sender()

    async def _ended(self, cid: int, connector: Connector, session: Session) -> None:
        local = session.record_id
        row = self._rows.get(local)
        if row is None:
            return
        if session.stop_reason is None:  # suspended by a clean shutdown: a restart may resume it
            log.info("ocpp_transaction_suspended", connector=cid, local_tx=local)
            return
        reason = self.stop_override.pop(local, None) or stop_reason(session.stop_reason)
        meter_kwh = session.meter_now if session.request.mode != "discharge" else None
        reading = connector.hw.meter.reading()
        await self._stop_row(row, reason, meter_kwh, reading.energy_import_kwh if reading is not None else None, connector=connector)
        if connector.hw.vehicle.status().plugged:
            self.finishing.add(cid)

    async def _stop_row(
        self, row: TxRow, reason: str, *registers_kwh: float | None, connector: Connector | None = None
    ) -> None:
        floor = max(row.meter_start, self._last_wh.get(row.local_tx, row.last_wh))
        candidates = [int(round(r * 1000)) for r in registers_kwh if r is not None]
        meter_stop = max([floor, *candidates])
        payload: dict[str, Any] = {
            "meter_stop": meter_stop,
            "timestamp": iso(utc_now()),
            "transaction_id": 0,
            "reason": reason,
            "id_tag": row.id_tag,
        }
        end_values = (
            sampled_values(connector, self.settings.get_list("StopTxnSampledData"), "Transaction.End", meter_stop)
            if connector is not None
            else []
        )
        for v in end_values:  # the end register equals meterStop (never below it)
            if v["measurand"] == "Energy.Active.Import.Register":
                v["value"] = str(meter_stop)
        if end_values:
            payload["transaction_data"] = [{"timestamp": payload["timestamp"], "sampled_value": end_values}]
        if await self.journal.stop_transaction(row.local_tx, payload):
            log.info("ocpp_transaction_stopped", connector=row.connector, local_tx=row.local_tx, reason=reason, meter_stop=meter_stop)
            self.wake_sender()
        self._rows.pop(row.local_tx, None)
        self._last_wh.pop(row.local_tx, None)

    async def _close_orphans(self) -> None:
        """Open transactions whose session is gone (restart after a crash, failed resume)."""
        tracked = {s.record_id for s in self._tracked.values()}
        for row in list(self._rows.values()):
            if row.local_tx in tracked:
                continue
            connector = self.port.connectors.get(row.connector)
            if connector is not None:
                if connector.session is not None and connector.session.record_id == row.local_tx:
                    continue  # picked up by the next poll
                cp = connector.resume_checkpoint()
                if cp is not None and cp.get("record_id") == row.local_tx:
                    continue  # waiting for the vehicle: the resumed session continues it
                if connector.in_session() and connector.state.value == "preparing":
                    continue  # may be the resume being prepared
            reading = connector.hw.meter.reading() if connector is not None else None
            await self._stop_row(row, "PowerLoss", reading.energy_import_kwh if reading is not None else None)

    async def _aligned(self) -> None:
        interval = self.settings.get_int("ClockAlignedDataInterval")
        if interval <= 0:
            self._next_aligned = None
            return
        now = time.time()
        if self._next_aligned is None:
            self._next_aligned = math.ceil(now / interval) * interval
        if now < self._next_aligned:
            return
        self._next_aligned = math.ceil((now + 0.001) / interval) * interval
        measurands = self.settings.get_list("MeterValuesAlignedData")
        for cid, connector in self.port.connectors.items():
            session = self._tracked.get(cid)
            local = session.record_id if session is not None else None
            values = sampled_values(connector, measurands, "Sample.Clock", self._last_wh.get(local, 0) if local else 0)
            if not values:
                continue
            if local is not None and local in self._rows:
                await self._journal_values(cid, local, values)
            else:
                self.send_volatile("MeterValues", {"connector_id": cid, "meter_value": [{"timestamp": iso(utc_now()), "sampled_value": values}]})

