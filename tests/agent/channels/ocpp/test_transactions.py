"""TxTracker: connector sessions become journaled OCPP transactions (real journal, fake connectors)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from agent.channels.ocpp.interface import ChargerPort
from agent.channels.ocpp.journal import Journal
from agent.channels.ocpp.settings import Settings
from agent.channels.ocpp.v16.transactions import TxTracker
from agent.charging.faults import FaultBoard
from agent.charging.session import Session, SessionRequest


class FakeConnector:
    def __init__(self) -> None:
        self.session: Session | None = None
        self.state = SimpleNamespace(value="vehicle_connected")
        self.register_kwh = 100.0
        self.plugged = True
        self.checkpoint: dict[str, Any] | None = None
        self.stops: list[str] = []
        self.starts: list[SessionRequest] = []
        self.hw = SimpleNamespace(
            meter=SimpleNamespace(reading=self._reading),
            vehicle=SimpleNamespace(status=lambda: SimpleNamespace(plugged=self.plugged, soc=40)),
        )

    def _reading(self) -> Any:
        return SimpleNamespace(voltage=400.0, current=50.0, power_kw=20.0, energy_import_kwh=self.register_kwh, energy_export_kwh=0.0)

    def in_session(self) -> bool:
        return self.session is not None

    def effective_limit_kw(self) -> float:
        return 22.0

    def set_limit(self, source: str, kw: float | None) -> None:
        pass

    def resume_checkpoint(self) -> dict[str, Any] | None:
        return self.checkpoint

    def request_start(self, request: SessionRequest) -> None:
        self.starts.append(request)

    def request_stop(self, reason: str, command_id: str | None = None) -> None:
        self.stops.append(reason)

    def begin(self, record_id: str = "rec-1") -> Session:
        self.session = Session(1, SessionRequest(), datetime.now(timezone.utc), 0.0, self.register_kwh, 40, record_id=record_id)
        self.state.value = "charging"
        return self.session

    def end(self, reason: str | None) -> None:
        assert self.session is not None
        self.session.meter_now = self.register_kwh
        self.session.stop_reason = reason
        self.session = None
        self.state.value = "vehicle_connected"


async def _restart(hard: bool) -> None:
    return None


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def _tracker(journal: Journal, connector: FakeConnector, clock: Clock) -> TxTracker:
    settings = Settings(1, ["Core"], {"MeterValueSampleInterval": "5"}, lambda k, v: None)
    port = ChargerPort("CP", "M", "V", "1", Path("."), {1: connector}, FaultBoard(), False, _restart)  # type: ignore[dict-item]
    tracker = TxTracker(port, journal, settings, lambda: None, lambda a, p: None, "FreeVend", clock=clock)
    await tracker.load()
    return tracker


async def _queue(journal: Journal) -> list[tuple[str, dict[str, Any]]]:
    out = []
    while (m := await journal.head()) is not None:
        out.append((m.action, m.payload))
        await journal.delivered(m.seq, m.local_tx, 500 if m.action == "StartTransaction" else None)
    return out


async def test_session_to_start_meter_values_stop(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path)
    conn, clock = FakeConnector(), Clock()
    try:
        tracker = await _tracker(journal, conn, clock)
        tracker.pending[1] = type("P", (), {"id_tag": "TAG", "expires": 2000.0, "remote": True, "requested_at": 999.0})()  # type: ignore[assignment]
        conn.begin()
        await tracker._poll(1, conn)  # type: ignore[arg-type]
        for _ in range(3):
            clock.t += 5.0
            conn.register_kwh += 0.5
            await tracker._poll(1, conn)  # type: ignore[arg-type]
        assert tracker.id_tag(1) == "TAG"
        assert tracker.stop(1, "Remote") and conn.stops == ["remote_stop"]
        conn.register_kwh += 0.1
        conn.end("remote_stop")
        await tracker._poll(1, conn)  # type: ignore[arg-type]
        assert 1 in tracker.finishing
        messages = await _queue(journal)
        assert [a for a, _ in messages] == ["StartTransaction", "MeterValues", "MeterValues", "MeterValues", "StopTransaction"]
        start, stop = messages[0][1], messages[-1][1]
        assert start["id_tag"] == "TAG" and start["meter_start"] == 100000
        registers = [int(sv["value"]) for _, p in messages[1:-1] for sv in p["meter_value"][0]["sampled_value"] if sv["measurand"] == "Energy.Active.Import.Register"]
        assert registers == [100500, 101000, 101500]
        assert stop["reason"] == "Remote" and stop["meter_stop"] == 101600
        assert stop["transaction_data"][0]["sampled_value"][0]["value"] == "101600"
    finally:
        await journal.close()


async def test_suspended_session_resumes_its_transaction_and_a_lost_one_closes_with_power_loss(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path)
    conn, clock = FakeConnector(), Clock()
    try:
        tracker = await _tracker(journal, conn, clock)
        session = conn.begin("rec-suspend")
        await tracker._poll(1, conn)  # type: ignore[arg-type]
        conn.end(None)  # a clean shutdown suspended it: no stop reason
        await tracker._poll(1, conn)  # type: ignore[arg-type]
        assert [r.local_tx for r in await journal.transactions()] == ["rec-suspend"]

        # restart: the resume is pending, then the same session continues
        tracker = await _tracker(journal, conn, clock)
        conn.checkpoint = {"record_id": "rec-suspend"}
        await tracker._close_orphans()
        assert [r.local_tx for r in await journal.transactions()] == ["rec-suspend"]
        conn.session = session
        session.stop_reason = None
        await tracker._poll(1, conn)  # type: ignore[arg-type]
        conn.checkpoint = None
        conn.end("remote_stop")
        await tracker._poll(1, conn)  # type: ignore[arg-type]
        actions = [a for a, _ in await _queue(journal)]
        assert actions.count("StartTransaction") == 1 and actions.count("StopTransaction") == 1

        # a transaction whose session is gone after a restart (kill -9): PowerLoss, exactly once
        conn.begin("rec-lost")
        await tracker._poll(1, conn)  # type: ignore[arg-type]
        conn.session = None
        conn.register_kwh += 1.0
        tracker = await _tracker(journal, conn, clock)
        await tracker._close_orphans()
        await tracker._close_orphans()
        messages = await _queue(journal)
        stops = [p for a, p in messages if a == "StopTransaction"]
        assert len(stops) == 1 and stops[0]["reason"] == "PowerLoss" and stops[0]["meter_stop"] >= 101000
    finally:
        await journal.close()


async def test_free_vend_session_gets_the_free_vend_tag_and_pending_start_requests_once(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path)
    conn, clock = FakeConnector(), Clock()
    try:
        tracker = await _tracker(journal, conn, clock)
        from agent.channels.ocpp.v16.transactions import PendingStart

        tracker.pending[1] = PendingStart("CARD", clock.t + 60, remote=False)
        await tracker._poll(1, conn)  # type: ignore[arg-type]
        await tracker._poll(1, conn)  # type: ignore[arg-type]
        assert len(conn.starts) == 1 and conn.starts[0].start_reason == "local_auth"
        clock.t += 5.0  # preparation failed: the connector is back without a session
        await tracker._poll(1, conn)  # type: ignore[arg-type]
        assert 1 not in tracker.pending
        conn.begin("rec-free")
        await tracker._poll(1, conn)  # type: ignore[arg-type]
        messages = await _queue(journal)
        assert messages[0][1]["id_tag"] == "FreeVend"
    finally:
        await journal.close()


async def test_clock_aligned_values_go_to_the_journal_in_a_transaction_else_volatile(tmp_path: Path) -> None:
    import asyncio

    journal = await Journal.open(tmp_path)
    conn, clock = FakeConnector(), Clock()
    try:
        tracker = await _tracker(journal, conn, clock)
        tracker.settings.change("ClockAlignedDataInterval", "1")
        sent: list[tuple[str, dict[str, Any]]] = []
        tracker.send_volatile = lambda action, payload: sent.append((action, payload))
        for _ in range(15):  # idle connector: aligned values are sent, not journaled
            await tracker._aligned()
            await asyncio.sleep(0.1)
        assert sent and sent[0][0] == "MeterValues"
        assert sent[0][1]["meter_value"][0]["sampled_value"][0]["context"] == "Sample.Clock"
        assert "transaction_id" not in sent[0][1]
        conn.begin("rec-aligned")
        await tracker._poll(1, conn)  # type: ignore[arg-type]
        before = len(sent)
        for _ in range(15):
            await tracker._aligned()
            await asyncio.sleep(0.1)
        assert len(sent) == before  # in a transaction: journaled with it instead
        actions = [a for a, _ in await _queue(journal)]
        assert actions[0] == "StartTransaction" and "MeterValues" in actions[1:]
    finally:
        await journal.close()
