"""Our connector states, F-codes and stop reasons in OCPP terms (1.6 names; 2.0.1 maps from these).

* :func:`connector_status` -- ChargePointStatus of one connector from its state, whether a
  session ended with the vehicle still plugged in, the operator's availability and the
  current power;
* :data:`ERROR_CODES` -- ChargePointErrorCode for each F-code (the most severe active
  fault wins; anything unmapped is ``OtherError`` with the F-code as vendorErrorCode);
* :func:`stop_reason` -- OCPP Reason for one of our stop reasons.
"""

from __future__ import annotations

ERROR_CODES: dict[str, str] = {
    "F-0101": "PowerSwitchFailure",
    "F-0102": "GroundFailure",
    "F-0103": "GroundFailure",
    "F-0104": "GroundFailure",
    "F-0203": "HighTemperature",
    "F-0204": "HighTemperature",
    "F-0411": "InternalError",
    "F-0412": "InternalError",
    "F-0413": "InternalError",
    "F-0421": "PowerSwitchFailure",
    "F-0422": "PowerSwitchFailure",
    "F-0451": "PowerMeterFailure",
    "F-0452": "PowerMeterFailure",
    "F-0601": "HighTemperature",
    "F-0701": "InternalError",
    "F-0702": "EVCommunicationError",
    "F-0801": "EVCommunicationError",
    "F-0802": "OverVoltage",
}

STOP_REASONS: dict[str, str] = {
    "remote_stop": "Remote",
    "user_request": "Local",
    "ev_disconnected": "EVDisconnected",
    "power_loss": "PowerLoss",
    "shutdown": "Reboot",
    "fault": "Other",
    "time_limit": "Other",
    "soc_target_reached": "Other",
    "energy_limit": "Other",
    "schedule": "Other",
}


def error_code(fault_ids: list[str]) -> tuple[str, str | None]:
    """(ChargePointErrorCode, vendorErrorCode) for the active faults (``NoError``, None if none)."""
    if not fault_ids:
        return "NoError", None
    fault = sorted(fault_ids)[0]
    return ERROR_CODES.get(fault, "OtherError"), fault


def stop_reason(reason: str | None) -> str:
    return STOP_REASONS.get(reason or "", "Other")


def connector_status(
    state: str,
    *,
    finishing: bool,
    inoperative: bool,
    power_kw: float | None,
    limit_kw: float,
) -> str:
    """ChargePointStatus of one connector (``state`` is our ConnectorState value)."""
    if state == "fault":
        return "Faulted"
    if state == "unavailable" or (inoperative and state in ("idle", "vehicle_connected")):
        return "Unavailable"
    if state in ("charging", "discharging"):
        # SuspendedEVSE while our limit is zero (pause, a zero profile); no SuspendedEV from
        # the power alone: every ramp-up would flap Charging/SuspendedEV at the CSMS
        return "SuspendedEVSE" if limit_kw <= 0.0 else "Charging"
    if state == "finishing" or (state == "vehicle_connected" and finishing):
        return "Finishing"
    if state in ("preparing", "vehicle_connected"):
        return "Preparing"
    return "Available"
