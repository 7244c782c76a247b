"""The OCPP journal (durable transaction messages) and the authorization rules."""

from __future__ import annotations

from pathlib import Path

from agent.channels.ocpp.authorize import Authorizer
from agent.channels.ocpp.journal import Journal, TxRow
from agent.channels.ocpp.mapping import connector_status, error_code, stop_reason
from agent.channels.ocpp.settings import Settings


def _row(local: str = "r1") -> TxRow:
    return TxRow(local, 1, "TAG", 1000, 1000, None, True, "2026-01-01T00:00:00Z")


async def test_start_meter_stop_in_order_and_exactly_once(tmp_path: Path) -> None:
    j = await Journal.open(tmp_path)
    try:
        assert await j.start_transaction(_row(), {"id_tag": "TAG"})
        assert not await j.start_transaction(_row(), {"id_tag": "TAG"})  # a replay starts nothing
        await j.meter_values("r1", {"n": 1}, 1500)
        assert await j.stop_transaction("r1", {"meter_stop": 1600})
        assert not await j.stop_transaction("r1", {"meter_stop": 1600})
        head = await j.head()
        assert head is not None and head.action == "StartTransaction"
        await j.delivered(head.seq, "r1", 77)
        row = await j.transaction("r1")
        assert row is not None and row.transaction_id == 77 and row.last_wh == 1500 and not row.open
    finally:
        await j.close()
    j = await Journal.open(tmp_path)  # reopened: what was committed is there
    try:
        actions = []
        while (m := await j.head()) is not None:
            actions.append(m.action)
            await j.delivered(m.seq)
        assert actions == ["MeterValues", "StopTransaction"]
    finally:
        await j.close()


async def test_dead_letter_removes_from_queue(tmp_path: Path) -> None:
    j = await Journal.open(tmp_path)
    try:
        await j.start_transaction(_row(), {})
        head = await j.head()
        assert head is not None
        assert await j.failed_attempt(head.seq) == 1
        await j.dead_letter(head.seq, "InternalError after 1 attempts")
        assert await j.head() is None and await j.dead_count() == 1
    finally:
        await j.close()


async def test_offline_rules_local_list_and_cache(tmp_path: Path) -> None:
    j = await Journal.open(tmp_path)
    try:
        s = Settings(1, ["Core"], {}, lambda k, v: None)
        auth = Authorizer(j, s)
        await auth.load()

        async def ask(tag: str) -> dict[str, object] | None:
            return {"status": "Blocked" if tag == "BAD" else "Accepted"}

        async def offline(tag: str) -> dict[str, object] | None:
            return None

        assert (await auth.authorize("A", online=True, ask=ask))["status"] == "Accepted"
        assert (await auth.authorize("A", online=False, ask=offline))["status"] == "Accepted"  # from the cache
        assert (await auth.authorize("BAD", online=True, ask=ask))["status"] == "Blocked"
        assert (await auth.authorize("BAD", online=False, ask=offline))["status"] == "Blocked"
        assert (await auth.authorize("NEW", online=False, ask=offline))["status"] == "Invalid"
        s.change("AllowOfflineTxForUnknownId", "true")
        assert (await auth.authorize("NEW", online=False, ask=offline))["status"] == "Accepted"
        s.change("LocalAuthorizeOffline", "false")
        assert (await auth.authorize("A", online=False, ask=offline))["status"] != "Accepted"
        await auth.clear_cache()
        assert auth.cache == {}

        assert await auth.update_list(3, "Full", [{"id_tag": "L1", "id_tag_info": {"status": "Accepted"}}]) == "Accepted"
        assert await auth.update_list(3, "Differential", []) == "VersionMismatch"
        assert await auth.update_list(4, "Differential", [{"id_tag": "L1"}]) == "Accepted"
        assert auth.get_list_version() == 4 and auth.local_list == {}
        again = Authorizer(j, s)
        await again.load()
        assert again.get_list_version() == 4
    finally:
        await j.close()


def test_status_error_and_reason_mapping() -> None:
    assert connector_status("idle", finishing=False, inoperative=False, power_kw=None, limit_kw=22) == "Available"
    assert connector_status("vehicle_connected", finishing=False, inoperative=False, power_kw=None, limit_kw=22) == "Preparing"
    assert connector_status("vehicle_connected", finishing=True, inoperative=False, power_kw=None, limit_kw=22) == "Finishing"
    assert connector_status("charging", finishing=False, inoperative=False, power_kw=10, limit_kw=0) == "SuspendedEVSE"
    assert connector_status("charging", finishing=False, inoperative=False, power_kw=10, limit_kw=22) == "Charging"
    assert connector_status("fault", finishing=False, inoperative=False, power_kw=None, limit_kw=22) == "Faulted"
    assert connector_status("idle", finishing=False, inoperative=True, power_kw=None, limit_kw=22) == "Unavailable"
    assert error_code([]) == ("NoError", None)
    assert error_code(["F-0101"]) == ("PowerSwitchFailure", "F-0101")
    assert error_code(["F-9999"]) == ("OtherError", "F-9999")
    assert stop_reason("remote_stop") == "Remote" and stop_reason("power_loss") == "PowerLoss" and stop_reason(None) == "Other"
