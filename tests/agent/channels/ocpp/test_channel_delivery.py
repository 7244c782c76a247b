"""The OCPP 1.6 channel against the local CSMS on loopback, without a charger behind it.

Boot Pending/Rejected retries, reconnect backoff, Basic auth, dead letters after
TransactionMessageAttempts, and a CALL in flight when the socket drops.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.channels.ocpp.config import OcppSection
from agent.channels.ocpp.interface import ChargerPort
from agent.channels.ocpp.journal import Journal, TxRow
from agent.channels.ocpp.v16.channel import DEAD_LETTER_FAULT, OcppV16Channel
from agent.charging.faults import FaultBoard
from agent.csms import Csms

CP = "CP-TEST-1"


async def _restart(hard: bool) -> None:
    return None


@pytest.fixture
async def csms() -> AsyncIterator[Csms]:
    server = Csms(password="pw", heartbeat_interval=1)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def _channel(
    tmp_path: Path, csms: Csms, *, password: str = "pw", settings: dict[str, str] | None = None, connectors: dict[int, Any] | None = None
) -> tuple[OcppV16Channel, Journal, FaultBoard]:
    journal = await Journal.open(tmp_path)
    if settings:
        await journal.kv_set("settings", settings)
    faults = FaultBoard()
    port = ChargerPort(CP, "M1", "V1", "0.1.0", tmp_path, connectors or {}, faults, False, _restart)
    cfg = OcppSection(url=csms.url, password=password, reconnect_min_s=0.2, reconnect_max_s=1.0, call_timeout_s=2.0, boot_retry_s=1.0)
    channel = OcppV16Channel(cfg, port, journal)
    await channel.start()
    return channel, journal, faults


async def _until(what: str, check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def _stop(channel: OcppV16Channel, journal: Journal) -> None:
    await channel.stop()
    await journal.close()


async def test_boot_pending_is_retried_and_nothing_else_is_sent_before_accepted(tmp_path: Path, csms: Csms) -> None:
    csms.boot_status = "Pending"
    channel, journal, _ = await _channel(tmp_path, csms)
    try:
        await _until("two boots", lambda: len(csms.calls_of("BootNotification")) >= 2)
        assert {c.action for c in csms.calls} == {"BootNotification"}
        csms.boot_status = "Accepted"
        await _until("online", lambda: channel.online)
        await _until("connector 0 status", lambda: csms.calls_of("StatusNotification"))
        await _until("a heartbeat at the CSMS interval", lambda: csms.calls_of("Heartbeat"), timeout=5)
        assert csms.violations == []
        assert channel.settings.get_int("HeartbeatInterval") == 1
    finally:
        await _stop(channel, journal)


async def test_wrong_password_is_refused_and_retried_with_backoff(tmp_path: Path, csms: Csms) -> None:
    channel, journal, _ = await _channel(tmp_path, csms, password="wrong")
    try:
        await asyncio.sleep(3.0)
        attempts = len(csms.upgrade_attempts)
        assert 2 <= attempts <= 8, attempts  # 0.2 s doubling to a 1 s cap, with jitter
        assert not channel.online and "401" in (channel.metrics.last_error or "")
        assert csms.calls == []
    finally:
        await _stop(channel, journal)


async def test_refused_message_is_dead_lettered_and_the_queue_moves_on(tmp_path: Path, csms: Csms) -> None:
    settings = {"TransactionMessageAttempts": "2", "TransactionMessageRetryInterval": "1"}
    channel, journal, faults = await _channel(tmp_path, csms, settings=settings)
    try:
        await _until("online", lambda: channel.online)
        csms.refuse_transactions = True
        await journal.start_transaction(TxRow("r1", 1, "T1", 0, 0, None, True, "2026-01-01T00:00:00Z"), {"connector_id": 1, "id_tag": "T1", "meter_start": 0, "timestamp": "2026-01-01T00:00:00Z"})
        await journal.stop_transaction("r1", {"meter_stop": 5, "timestamp": "2026-01-01T00:01:00Z", "transaction_id": 0, "reason": "Local"})
        channel._wake_sender.set()
        await _until("the StartTransaction dead-lettered", lambda: channel.metrics.dead_letters >= 1, timeout=10)
        assert len(csms.calls_of("StartTransaction")) == 2  # TransactionMessageAttempts
        assert faults.is_active(DEAD_LETTER_FAULT, None)
        # its StopTransaction cannot name a transactionId: dead-lettered too, never sent
        await _until("the StopTransaction dead-lettered", lambda: channel.metrics.dead_letters >= 2)
        assert csms.calls_of("StopTransaction") == []
        csms.refuse_transactions = False
        await journal.start_transaction(TxRow("r2", 1, "T2", 0, 0, None, True, "2026-01-01T00:02:00Z"), {"connector_id": 1, "id_tag": "T2", "meter_start": 0, "timestamp": "2026-01-01T00:02:00Z"})
        channel._wake_sender.set()
        await _until("the next message delivered", lambda: [c for c in csms.calls_of("StartTransaction") if c.payload["idTag"] == "T2"])
        await _until("the queue empty", lambda: channel.metrics.queue_depth == 0)
        row = await journal.transaction("r2")
        assert row is not None and row.transaction_id is not None
        assert await journal.dead_count() == 2
    finally:
        await _stop(channel, journal)


async def test_call_in_flight_when_the_socket_drops_is_sent_again(tmp_path: Path, csms: Csms) -> None:
    channel, journal, _ = await _channel(tmp_path, csms)
    try:
        await _until("online", lambda: channel.online)
        hold = asyncio.Event()
        csms.hold_transactions = hold
        await journal.start_transaction(TxRow("r1", 1, "T1", 0, 0, None, True, "2026-01-01T00:00:00Z"), {"connector_id": 1, "id_tag": "T1", "meter_start": 0, "timestamp": "2026-01-01T00:00:00Z"})
        channel._wake_sender.set()
        await _until("the StartTransaction received", lambda: csms.calls_of("StartTransaction"))
        await csms.drop()  # the answer never comes on this socket
        csms.hold_transactions = None
        hold.set()
        await _until("sent again and answered", lambda: len(csms.calls_of("StartTransaction")) >= 2, timeout=10)
        await _until("the queue empty", lambda: channel.metrics.queue_depth == 0)
        row = await journal.transaction("r1")
        assert row is not None and row.transaction_id is not None
        assert csms.violations == []
    finally:
        await _stop(channel, journal)


async def test_remote_start_with_authorize_remote_tx_requests(tmp_path: Path, csms: Csms) -> None:
    from ocpp.v16 import call

    from tests.agent.channels.ocpp.test_transactions import FakeConnector

    connector = FakeConnector()
    channel, journal, _ = await _channel(tmp_path, csms, settings={"AuthorizeRemoteTxRequests": "true"}, connectors={1: connector})
    try:
        await _until("online", lambda: channel.online)
        await _until("Preparing reported", lambda: [c for c in csms.calls_of("StatusNotification") if c.payload["connectorId"] == 1])
        answer = await asyncio.wait_for(csms.call(CP, call.RemoteStartTransaction(id_tag="REM-1", connector_id=1)), 5)
        assert answer.status == "Accepted"
        await _until("Authorize after the answer", lambda: csms.calls_of("Authorize"), timeout=5)
        await _until("the connector asked to start", lambda: connector.starts, timeout=5)
        assert connector.starts[0].start_reason == "remote_start"
        csms.rejected_tags.add("BAD-1")
        connector.starts.clear()
        channel.tracker.pending.clear()  # type: ignore[union-attr]
        assert (await csms.call(CP, call.RemoteStartTransaction(id_tag="BAD-1", connector_id=1))).status == "Accepted"
        await _until("the second Authorize", lambda: len(csms.calls_of("Authorize")) == 2, timeout=5)
        await asyncio.sleep(0.5)
        assert connector.starts == []  # refused by the CSMS: no session
        assert csms.violations == []
    finally:
        await _stop(channel, journal)


async def test_start_answered_invalid_stops_the_session_deauthorized(tmp_path: Path, csms: Csms) -> None:
    from tests.agent.channels.ocpp.test_transactions import FakeConnector

    connector = FakeConnector()
    csms.rejected_tags.add("FreeVend")
    channel, journal, _ = await _channel(tmp_path, csms, connectors={1: connector})
    try:
        await _until("online", lambda: channel.online)
        connector.begin("rec-invalid")  # a free-vend session the CSMS does not accept
        await _until("the StartTransaction answered", lambda: csms.calls_of("StartTransaction"))
        await _until("the session stopped", lambda: connector.stops, timeout=5)
        connector.end("user_request")
        await _until("StopTransaction", lambda: csms.calls_of("StopTransaction"), timeout=5)
        stop = csms.calls_of("StopTransaction")[0].payload
        assert stop["reason"] == "DeAuthorized" and stop["transactionId"] == 1001
        assert csms.violations == []
    finally:
        await _stop(channel, journal)


async def test_stop_during_a_connection_teardown_returns(tmp_path: Path, csms: Csms) -> None:
    """A stop that lands while the channel tears a dropped connection down still ends it.

    The teardown cancels and awaits the connection's own tasks; the stop's cancellation
    arriving during that await must not be taken for theirs (the channel would reconnect
    and ``stop()`` would wait for ever). The drop-to-stop gap is swept to aim stops at the
    teardown; whether one lands inside it depends on timing, so the rule itself is tested
    deterministically in ``tests/hal/test_tasks.py`` (the caller's cancellation propagates
    from :func:`hal.tasks.stop_tasks`, which the channel uses for every such wait).
    """
    channel, journal, _ = await _channel(tmp_path, csms)
    try:
        for gap_ms in range(0, 8):
            await _until("online", lambda: channel.online)
            drop = asyncio.create_task(csms.drop())
            await asyncio.sleep(gap_ms / 2000)
            await asyncio.wait_for(channel.stop(), timeout=10)
            await drop
            await channel.start()
    finally:
        await _stop(channel, journal)
