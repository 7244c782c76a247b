"""The CSMS-initiated operations of the OCPP 1.6 channel (what the CALL handlers invoke).

A mixin of :class:`agent.channels.ocpp.v16.channel.OcppV16Channel`: RemoteStart/Stop,
TriggerMessage, Reset, ChangeAvailability, UnlockConnector, UpdateFirmware and
GetDiagnostics. The channel owns the state these methods use (declared below for the type
checker); nothing here awaits a CALL to the CSMS inside a handler (an Authorize would wait
for a CALLRESULT only the busy reader could deliver): such work runs in the background.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Coroutine

import structlog

from agent.channels.ocpp.authorize import Authorizer
from agent.channels.ocpp.config import OcppSection
from agent.channels.ocpp.interface import ChargerPort
from agent.channels.ocpp.journal import Journal
from agent.channels.ocpp.settings import Settings
from agent.channels.ocpp.v16.transactions import PendingStart, TxTracker
from agent.utctime import to_iso as iso, utc_now

log = structlog.get_logger(__name__)

AVAILABILITY_KEY = "inoperative"


class Operations:
    cfg: OcppSection
    port: ChargerPort
    journal: Journal
    cp_id: str
    settings: Settings
    auth: Authorizer
    tracker: TxTracker | None
    inoperative: set[int]
    firmware_status: str
    diagnostics_status: str
    _pending_profile: tuple[int, dict[str, Any]] | None
    _status_changed: asyncio.Event
    _background: set[asyncio.Task[Any]]

    if TYPE_CHECKING:

        @property
        def online(self) -> bool: ...
        async def _ask_csms(self, id_tag: str) -> dict[str, Any] | None: ...
        def send_volatile(self, action: str, payload: dict[str, Any]) -> None: ...
        async def _send_statuses(self, *, force: bool = False, only: int | None = None) -> None: ...

    # ------------------------------------------------------------------ operations (handlers call these)

    async def remote_start(self, id_tag: str, connector_id: int | None, profile: dict[str, Any] | None) -> str:
        assert self.tracker is not None
        connectors = self.port.connectors
        if connector_id is None:
            free = [cid for cid, c in connectors.items() if not c.in_session() and c.state.value in ("vehicle_connected", "idle")]
            plugged = [cid for cid in free if connectors[cid].state.value == "vehicle_connected"]
            choice = plugged or free
            if not choice:
                return "Rejected"
            connector_id = choice[0]
        connector = connectors.get(connector_id)
        if connector is None:
            return "Rejected"
        if connector.in_session() or connector.state.value in ("fault", "unavailable") or connector_id in self.inoperative:
            return "Rejected"
        if profile is not None and profile.get("charging_profile_purpose") != "TxProfile":
            return "Rejected"
        if profile is not None:
            self._pending_profile = (connector_id, profile)
        if self.settings.get_bool("AuthorizeRemoteTxRequests"):
            # answered first, authorised after: an Authorize awaited inside this handler would
            # wait for a CALLRESULT that only this connection's (busy) reader can deliver
            self.start_background(self._authorize_then_arm(connector_id, id_tag))
            return "Accepted"
        self._arm(connector_id, id_tag, remote=True)
        return "Accepted"

    def _arm(self, connector_id: int, id_tag: str, *, remote: bool) -> None:
        assert self.tracker is not None
        timeout = self.settings.get_int("ConnectionTimeOut")
        self.tracker.pending[connector_id] = PendingStart(id_tag, asyncio.get_running_loop().time() + timeout, remote=remote)

    async def _authorize_then_arm(self, connector_id: int, id_tag: str) -> None:
        info = await self.auth.authorize(id_tag, online=self.online, ask=self._ask_csms)
        if info.get("status") == "Accepted":
            self._arm(connector_id, id_tag, remote=True)
        else:
            log.info("ocpp_remote_start_not_authorized", connector=connector_id, id_tag=id_tag, status=info.get("status"))

    def remote_stop(self, transaction_id: int) -> str:
        assert self.tracker is not None
        found = self.tracker.local_tx_of(transaction_id)
        if found is None:
            return "Rejected"
        return "Accepted" if self.tracker.stop(found[0], "Remote") else "Rejected"

    def _tx_start(self, connector_id: int) -> datetime | None:
        connector = self.port.connectors.get(connector_id)
        session = connector.session if connector is not None else None
        return session.start_time if session is not None else None

    def trigger(self, message: str, connector_id: int | None) -> None:
        if message == "StatusNotification":
            self.start_background(self._send_statuses(force=True, only=connector_id))
        elif message == "Heartbeat":
            self.send_volatile("Heartbeat", {})
        elif message == "BootNotification":
            self.send_volatile(
                "BootNotification",
                {"charge_point_vendor": self.port.vendor[:20], "charge_point_model": self.port.model[:20]},
            )
        elif message == "MeterValues":
            from agent.channels.ocpp.v16.transactions import sampled_values

            for cid, c in self.port.connectors.items():
                if connector_id in (None, 0, cid):
                    values = sampled_values(c, self.settings.get_list("MeterValuesSampledData"), "Trigger")
                    if values:
                        self.send_volatile("MeterValues", {"connector_id": cid, "meter_value": [{"timestamp": iso(utc_now()), "sampled_value": values}]})
        elif message == "FirmwareStatusNotification":
            self.send_volatile("FirmwareStatusNotification", {"status": self.firmware_status})
        elif message == "DiagnosticsStatusNotification":
            self.send_volatile("DiagnosticsStatusNotification", {"status": self.diagnostics_status})

    async def reset(self, *, hard: bool) -> None:
        """Reset: stop transactions with SoftReset/HardReset, let them be journaled, restart."""
        assert self.tracker is not None
        for cid in list(self.port.connectors):
            self.tracker.stop(cid, "HardReset" if hard else "SoftReset")
        for _ in range(300):
            if not any(c.in_session() for c in self.port.connectors.values()) and not self.tracker._tracked:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # the tracker journals the StopTransactions
        await self.port.request_restart(hard)

    async def change_availability(self, connector_id: int, operative: bool) -> str:
        targets = list(self.port.connectors) if connector_id == 0 else [connector_id]
        if connector_id != 0 and connector_id not in self.port.connectors:
            return "Rejected"
        scheduled = False
        if operative:
            self.inoperative -= {connector_id, *targets} if connector_id == 0 else {connector_id}
        else:
            self.inoperative |= {connector_id}
            if connector_id == 0:
                self.inoperative |= set(targets)
        await self.journal.kv_set(AVAILABILITY_KEY, sorted(self.inoperative))
        for cid in targets:
            connector = self.port.connectors[cid]
            if operative:
                if connector.unavailable_reason == "ocpp_inoperative":
                    await connector.set_unavailable(None)
            elif connector.in_session():
                scheduled = True  # the tracker's poll takes it out after the transaction
                self.start_background(self._take_out_after_session(cid))
            else:
                await connector.set_unavailable("ocpp_inoperative")
        self._status_changed.set()
        return "Scheduled" if scheduled else "Accepted"

    async def _take_out_after_session(self, cid: int) -> None:
        connector = self.port.connectors[cid]
        while connector.in_session():
            await asyncio.sleep(0.5)
        if cid in self.inoperative:
            from agent.charging.connector import Rejected

            try:
                await connector.set_unavailable("ocpp_inoperative")
            except Rejected:
                pass

    def unlock(self, connector_id: int) -> str:
        if connector_id not in self.port.connectors:
            return "NotSupported"
        assert self.tracker is not None
        self.tracker.stop(connector_id, "UnlockCommand")
        return "NotSupported"  # no cable lock actuator in the HAL: the transaction is stopped

    # ------------------------------------------------------------------ firmware and diagnostics

    def start_background(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def update_firmware(self, location: str, retrieve_date: str, retries: int, retry_interval: int) -> None:
        install = self.port.install_firmware
        when = datetime.fromisoformat(retrieve_date.replace("Z", "+00:00"))
        await asyncio.sleep(max((when - datetime.now(timezone.utc)).total_seconds(), 0.0))

        def progress(status: str) -> None:
            self.firmware_status = status
            self.send_volatile("FirmwareStatusNotification", {"status": status})

        if install is None:
            progress("DownloadFailed")
            return
        for attempt in range(max(retries, 1)):
            try:
                await install(location, progress)
                return
            except Exception as exc:
                log.warning("ocpp_firmware_failed", attempt=attempt + 1, error=str(exc))
                if attempt + 1 < retries:
                    await asyncio.sleep(retry_interval)

    def diagnostics_file_name(self) -> str | None:
        if self.port.upload_diagnostics is None:
            return None
        return f"diagnostics-{self.cp_id}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.tar.gz"

    async def get_diagnostics(self, location: str, start: str | None, stop: str | None) -> None:
        upload = self.port.upload_diagnostics
        if upload is None:
            return

        def status(value: str) -> None:
            self.diagnostics_status = value
            self.send_volatile("DiagnosticsStatusNotification", {"status": value})

        status("Uploading")
        try:
            await upload(location, start, stop)
        except Exception as exc:
            log.warning("ocpp_diagnostics_failed", error=str(exc))
            status("UploadFailed")
            return
        status("Uploaded")
