"""The emulator's stricter-than-the-schema rules: what the real platform refuses with 1001.

The wire models (:mod:`agent.channels.tellus.models`) accept what the published schema
allows; the platform itself is stricter, and so is this oracle. Applied after the model
validated the body (so types, enums and required fields are already checked):

* **Timestamps** (``timestamp``, ``start_time``, ``end_time``) are UTC with upper-case
  ``T`` and ``Z`` -- no ``+02:00``, no ``t``/``z`` (platform-api §2).
* **No unknown fields.** A top-level or nested key the schema does not name is refused
  (``details.field`` names it), except the project's documented extensions while
  ``accept_extensions`` is on: charging-record ``stop_reason``/``transaction_id``/
  ``direction``, telemetry ``component_health`` and ``ocpp``, command-status ``progress``.
* ``component_health`` must match :class:`~agent.channels.tellus.extensions.ComponentHealthBlock`,
  ``ocpp`` :class:`~agent.channels.tellus.extensions.OcppMetadataBlock`.
* ``connector_id`` must be one of the device's connectors (``settings.connectors``).
* Telemetry ``power`` is kW: more than 1000 kW, or far more than ``voltage x current``
  allows (3 phases, 25 % margin, +1 kW), is refused as a unit error.
* A charging record needs ``energy >= 0`` and ``end_time >= start_time``.
* :func:`check_status_sequence`: after a terminal status (``rejected``, ``completed``,
  ``failed``) only the same status may be repeated -- unless the command was delivered
  again after that report (a new delivery is a new attempt).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from agent.channels.tellus.extensions import UTC_Z_TIMESTAMP, ComponentHealthBlock, OcppMetadataBlock
from agent.channels.tellus.models import (
    ChargingRecordUpload,
    DeviceCommandStatus,
    ErrorCode,
    EventReport,
    PhaseDetail,
    PhaseDetails,
    TelemetryUpload,
    VehicleInfo,
)
from agent.emulator.errors import ApiError



class Settings(Protocol):
    """What the rules read of :class:`agent.emulator.state.EmulatorSettings`."""

    connectors: tuple[int, ...]
    accept_extensions: bool

__all__ = ["check_body", "check_connector", "check_status_sequence"]

TERMINAL = frozenset({"rejected", "completed", "failed"})
_TIMESTAMP_FIELDS = ("timestamp", "start_time", "end_time")
_EXTENSIONS: dict[type[BaseModel], frozenset[str]] = {
    ChargingRecordUpload: frozenset({"stop_reason", "transaction_id", "direction"}),
    TelemetryUpload: frozenset({"component_health", "ocpp"}),
    DeviceCommandStatus: frozenset({"progress"}),
}
_NESTED: dict[type[BaseModel], dict[str, type[BaseModel]]] = {
    ChargingRecordUpload: {"vehicle_info": VehicleInfo},
    TelemetryUpload: {"phase_details": PhaseDetails},
}
MAX_POWER_KW = 1000.0


def _invalid(field: str, message: str, value: Any = None) -> ApiError:
    return ApiError(
        ErrorCode.INVALID_PARAMETER,
        f"invalid parameter {field}: {message}",
        details={"field": field, "value": value},
    )


def _known(model: type[BaseModel]) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


def _unknown_fields(
    model: type[BaseModel], body: dict[str, Any], allowed: frozenset[str], prefix: str = ""
) -> None:
    known = _known(model) | allowed
    for key in body:
        if key not in known:
            raise _invalid(f"{prefix}{key}", "unknown field", key)
    nested = dict(_NESTED.get(model, {}))
    if model is PhaseDetails:
        nested = {k: PhaseDetail for k in _known(PhaseDetails)}
    for key, sub in nested.items():
        value = body.get(key)
        if isinstance(value, dict):
            _unknown_fields(sub, value, frozenset(), f"{prefix}{key}.")


def check_connector(connector_id: int, settings: Settings) -> None:
    """1001 unless ``connector_id`` is one of the device's connectors."""
    if connector_id not in settings.connectors:
        raise _invalid(
            "connector_id",
            f"no such connector on this device (has {sorted(settings.connectors)})",
            connector_id,
        )


def check_body(model: BaseModel, body: dict[str, Any], settings: Settings) -> None:
    """Apply the module's rules to a validated ``model`` of the raw JSON ``body``."""
    kind = type(model)
    for name in _TIMESTAMP_FIELDS:
        value = body.get(name)
        if isinstance(value, str) and not UTC_Z_TIMESTAMP.match(value):
            raise _invalid(name, "expected a UTC time like 2025-03-15T10:30:00Z", value)
    allowed = _EXTENSIONS.get(kind, frozenset()) if settings.accept_extensions else frozenset()
    _unknown_fields(kind, body, allowed)
    if isinstance(model, (TelemetryUpload, EventReport, ChargingRecordUpload)):
        check_connector(model.connector_id, settings)
    if isinstance(model, TelemetryUpload):
        _check_power(model)
        if "component_health" in body:
            _check_block("component_health", ComponentHealthBlock, body["component_health"])
        if "ocpp" in body:
            _check_block("ocpp", OcppMetadataBlock, body["ocpp"])
    if isinstance(model, ChargingRecordUpload):
        if model.energy < 0:
            raise _invalid("energy", "must not be negative", model.energy)
        if model.end_time < model.start_time:
            raise _invalid("end_time", "is before start_time", body.get("end_time"))


def _check_power(model: TelemetryUpload) -> None:
    power = abs(model.power)
    plausible = 3 * abs(model.voltage) * abs(model.current) / 1000.0 * 1.25 + 1.0
    if power > MAX_POWER_KW or power > plausible:
        raise _invalid(
            "power", "expected kW (inconsistent with voltage x current: a W value?)", model.power
        )


def _check_block(name: str, model: type[BaseModel], value: Any) -> None:
    """An optional extension block: an object valid for ``model``, else 1001 naming the field."""
    if not isinstance(value, dict):
        raise _invalid(name, "expected an object", value)
    try:
        model.model_validate(value)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err["loc"])
        field = f"{name}.{loc}" if loc else name
        raise _invalid(field, str(err["msg"]), err.get("input")) from None


def check_status_sequence(
    statuses: Sequence[Any], deliveries: Sequence[Any], status: str, device_id: str
) -> None:
    """1001 (field ``status``) for a status after a terminal one, unless it repeats it or the
    command was delivered again since (``statuses``: reports with ``status`` and
    ``received_at``; ``deliveries``: with ``delivered_at``)."""
    last_terminal = next((s for s in reversed(statuses) if s.status in TERMINAL), None)
    if last_terminal is None or status == last_terminal.status:
        return
    if any(d.delivered_at > last_terminal.received_at for d in deliveries):
        return
    raise ApiError(
        ErrorCode.INVALID_PARAMETER,
        f"invalid parameter status: command is already {last_terminal.status}",
        details={"field": "status", "value": status},
        device_id=device_id,
    )
