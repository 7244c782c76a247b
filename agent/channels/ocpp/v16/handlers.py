"""The CSMS-initiated operations of OCPP 1.6, on the ``ocpp`` package's ChargePoint.

Every incoming CALL is validated against the official 1.6 schema by the ``ocpp``
package before its handler runs, and every answer before it is sent. A frame that is
not valid OCPP-J but carries a recoverable unique id gets a CALLERROR (FormatViolation /
ProtocolError ...) instead of silence; a handler that fails answers InternalError; an
unknown action NotImplemented / NotSupported. Nothing here can end the channel.

Work that must follow the answer (a StatusNotification asked for by TriggerMessage, a
restart after Reset) runs in ``@after`` hooks.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import structlog
from ocpp.exceptions import OCPPError
from ocpp.messages import CallError, unpack
from ocpp.routing import after, on
from ocpp.v16 import ChargePoint as OcppChargePoint, call_result
from ocpp.v16.enums import Action

log = structlog.get_logger(__name__)

#: the ``ocpp`` package logs every CALLERROR it answers with a full traceback; a bad frame
#: from the CSMS is not our error: :meth:`ChargePoint16._send` logs one line instead
_LIB_LOG = logging.getLogger("agent.channels.ocpp.lib")
_LIB_LOG.setLevel(logging.CRITICAL)

TRIGGERABLE = {
    "BootNotification",
    "DiagnosticsStatusNotification",
    "FirmwareStatusNotification",
    "Heartbeat",
    "MeterValues",
    "StatusNotification",
}


class ChargePoint16(OcppChargePoint):
    """One WebSocket connection's OCPP 1.6 endpoint; the channel (``OcppV16Channel``) owns all state."""

    def __init__(self, cp_id: str, connection: Any, channel: Any, response_timeout: float) -> None:
        super().__init__(cp_id, connection, response_timeout=response_timeout, logger=_LIB_LOG)
        self.ch = channel

    async def _send(self, message: str) -> None:
        if message.startswith("[4,"):
            try:
                frame = json.loads(message)
                log.warning("ocpp_callerror_sent", unique_id=frame[1], error=frame[2], description=str(frame[3])[:200])
            except (ValueError, IndexError):
                pass
        await super()._send(message)

    async def route_message(self, raw_msg: str) -> None:
        try:
            unpack(raw_msg)
        except OCPPError as error:
            unique_id = _unique_id(raw_msg)
            log.warning("ocpp_malformed_frame", error=error.code, unique_id=unique_id)
            if unique_id is not None:
                await self._send(
                    CallError(unique_id=unique_id, error_code=error.code, error_description=str(error.description), error_details={}).to_json()
                )
            return
        await super().route_message(raw_msg)

    # ------------------------------------------------------------------ Core

    @on(Action.remote_start_transaction)
    async def on_remote_start(self, id_tag: str, connector_id: int | None = None, charging_profile: dict[str, Any] | None = None, **_: Any) -> Any:
        status = await self.ch.remote_start(id_tag, connector_id, charging_profile)
        return call_result.RemoteStartTransaction(status=status)

    @on(Action.remote_stop_transaction)
    async def on_remote_stop(self, transaction_id: int, **_: Any) -> Any:
        return call_result.RemoteStopTransaction(status=self.ch.remote_stop(transaction_id))

    @on(Action.get_configuration)
    def on_get_configuration(self, key: list[str] | None = None, **_: Any) -> Any:
        known, unknown = self.ch.settings.get(key)
        return call_result.GetConfiguration(configuration_key=known or None, unknown_key=unknown or None)

    @on(Action.change_configuration)
    def on_change_configuration(self, key: str, value: str, **_: Any) -> Any:
        return call_result.ChangeConfiguration(status=self.ch.settings.change(key, value))

    @on(Action.trigger_message)
    def on_trigger_message(self, requested_message: str, connector_id: int | None = None, **_: Any) -> Any:
        if requested_message not in TRIGGERABLE:
            return call_result.TriggerMessage(status="NotImplemented")
        if connector_id is not None and connector_id != 0 and connector_id not in self.ch.port.connectors:
            return call_result.TriggerMessage(status="Rejected")
        return call_result.TriggerMessage(status="Accepted")

    @after(Action.trigger_message)
    def after_trigger_message(self, requested_message: str, connector_id: int | None = None, **_: Any) -> None:
        if requested_message in TRIGGERABLE:
            self.ch.trigger(requested_message, connector_id)

    @on(Action.data_transfer)
    def on_data_transfer(self, vendor_id: str, message_id: str | None = None, data: str | None = None, **_: Any) -> Any:
        handler = self.ch.vendors.get(vendor_id)
        if handler is None:
            return call_result.DataTransfer(status="UnknownVendorId")
        status, reply = handler(message_id, data)
        return call_result.DataTransfer(status=status, data=reply)

    @on(Action.reset)
    def on_reset(self, type: str, **_: Any) -> Any:  # noqa: A002 - the OCPP field name
        return call_result.Reset(status="Accepted")

    @after(Action.reset)
    async def after_reset(self, type: str, **_: Any) -> None:  # noqa: A002
        await self.ch.reset(hard=type == "Hard")

    @on(Action.change_availability)
    async def on_change_availability(self, connector_id: int, type: str, **_: Any) -> Any:  # noqa: A002
        return call_result.ChangeAvailability(status=await self.ch.change_availability(connector_id, type == "Operative"))

    @on(Action.unlock_connector)
    def on_unlock_connector(self, connector_id: int, **_: Any) -> Any:
        return call_result.UnlockConnector(status=self.ch.unlock(connector_id))

    @on(Action.clear_cache)
    async def on_clear_cache(self, **_: Any) -> Any:
        await self.ch.auth.clear_cache()
        return call_result.ClearCache(status="Accepted")

    # ------------------------------------------------------------------ Local Auth List

    @on(Action.send_local_list)
    async def on_send_local_list(self, list_version: int, update_type: str, local_authorization_list: list[dict[str, Any]] | None = None, **_: Any) -> Any:
        status = await self.ch.auth.update_list(list_version, update_type, local_authorization_list or [])
        return call_result.SendLocalList(status=status)

    @on(Action.get_local_list_version)
    def on_get_local_list_version(self, **_: Any) -> Any:
        return call_result.GetLocalListVersion(list_version=self.ch.auth.get_list_version())

    # ------------------------------------------------------------------ Smart Charging

    @on(Action.set_charging_profile)
    def on_set_charging_profile(self, connector_id: int, cs_charging_profiles: dict[str, Any], **_: Any) -> Any:
        return call_result.SetChargingProfile(status=self.ch.profiles.set(connector_id, cs_charging_profiles))

    @on(Action.clear_charging_profile)
    def on_clear_charging_profile(self, id: int | None = None, connector_id: int | None = None, charging_profile_purpose: str | None = None, stack_level: int | None = None, **_: Any) -> Any:  # noqa: A002
        found = self.ch.profiles.clear(id, connector_id, charging_profile_purpose, stack_level)
        return call_result.ClearChargingProfile(status="Accepted" if found else "Unknown")

    @on(Action.get_composite_schedule)
    def on_get_composite_schedule(self, connector_id: int, duration: int, charging_rate_unit: str | None = None, **_: Any) -> Any:
        result = self.ch.profiles.composite(connector_id, duration, charging_rate_unit)
        if result is None:
            return call_result.GetCompositeSchedule(status="Rejected")
        start, schedule = result
        return call_result.GetCompositeSchedule(status="Accepted", connector_id=connector_id, schedule_start=start, charging_schedule=schedule)

    # ------------------------------------------------------------------ Firmware Management

    @on(Action.update_firmware)
    def on_update_firmware(self, location: str, retrieve_date: str, retries: int | None = None, retry_interval: int | None = None, **_: Any) -> Any:
        self.ch.start_background(self.ch.update_firmware(location, retrieve_date, retries or 1, retry_interval or 60))
        return call_result.UpdateFirmware()

    @on(Action.get_diagnostics)
    def on_get_diagnostics(self, location: str, start_time: str | None = None, stop_time: str | None = None, **_: Any) -> Any:
        name = self.ch.diagnostics_file_name()
        if name is None:
            return call_result.GetDiagnostics()
        self.ch.start_background(self.ch.get_diagnostics(location, start_time, stop_time))
        return call_result.GetDiagnostics(file_name=name)


def _unique_id(raw: str) -> str | None:
    """The unique id of a frame that is not valid OCPP-J, when one can still be read."""
    try:
        frame = json.loads(raw)
    except (ValueError, TypeError):
        return None
    if isinstance(frame, list) and len(frame) >= 2 and isinstance(frame[1], str) and frame[0] == 2:
        return frame[1][:36]
    return None
