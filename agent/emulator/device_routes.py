"""The charger-side platform API (``/v1/device/*``) as served by the emulator.

Processing order for every request: injected outage → injected fault of this endpoint
(:mod:`agent.emulator.faults`) → bearer authentication (2001/2002) → per-device rate limit
(5001) → query/body validation (1001/1002), then the oracle's stricter rules
(:mod:`agent.emulator.strict`: UTC ``Z`` timestamps, no unknown fields, known connectors,
kW, CDR consistency, ``component_health`` shape) → the endpoint's own rules (4001, 3001,
status sequence). Every response is the ``{code, message, data[, details]}`` envelope with
the HTTP status from the error-code table, except a successful token exchange (plain
OAuth-style object) and outage responses (plain-text 503 or a dropped connection).
Every request — accepted, rejected, or abandoned by the client (logged with HTTP status 0)
— is appended to the store's request log.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import structlog
from aiohttp import web

from agent.channels.tellus.models import (
    ENDPOINTS,
    AccessTokenResponse,
    ChargingRecordUpload,
    DeviceCommandStatus,
    DeviceEndpoint,
    DeviceRegisterRequest,
    DeviceRegisterResponse,
    DeviceTokenRequest,
    ErrorCode,
    EventReport,
    FirmwareUpgradeStatus,
    HeartbeatRequest,
    RateLimitClass,
    TelemetryUpload,
    TokenType,
    utc_now,
)
from agent.emulator.context import CONTEXT, EmulatorContext
from agent.emulator.errors import ApiError, envelope
from agent.emulator.operator_models import OutageMode, RequestKind, kind_of_endpoint
from agent.emulator.state import Device
from agent.emulator.strict import check_body, check_connector
from agent.emulator.validation import (
    ModelT,
    parse_json_body,
    parse_poll_query,
    validate_body,
)

__all__ = ["API_PREFIX", "add_device_routes", "device_api_middleware"]

log = structlog.get_logger("agent.emulator.api")

API_PREFIX = "/v1"
"""Base path of the platform API (the base URL ends in ``/v1``)."""

_SECRET_KEYS = frozenset({"device_secret", "access_token"})
_REDACTED = "***"

_DEVICE_ID = web.RequestKey("emulator_device_id", str)
_LOG_BODY = web.RequestKey("emulator_log_body", object)
_RESPONSE = web.RequestKey("emulator_response", object)
_CODE = web.RequestKey("emulator_code", int)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _redact(value: Any) -> Any:
    """Copy of a JSON value with secrets/tokens replaced (top level and ``data``)."""
    if not isinstance(value, dict):
        return value
    out = {k: (_REDACTED if k in _SECRET_KEYS else v) for k, v in value.items()}
    if isinstance(out.get("data"), dict):
        out["data"] = _redact(out["data"])
    return out


def _context(request: web.Request) -> EmulatorContext:
    return request.app[CONTEXT]


def _kind(request: web.Request) -> RequestKind:
    name = request.match_info.route.name
    if name is None or not name.startswith("device."):
        return RequestKind.UNKNOWN
    return RequestKind(name.removeprefix("device."))


def _client_alive(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and not transport.is_closing()


# ---------------------------------------------------------------------- middleware


@web.middleware
async def device_api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outage injection, error enveloping and request logging for ``/v1/*``."""
    if not request.path.startswith(API_PREFIX + "/"):
        return await handler(request)
    ctx = _context(request)
    received_at = utc_now()
    started = time.monotonic()
    kind = _kind(request)

    outage = ctx.store.outage_mode()
    if outage is not None:
        await _read_body(request)
        if outage is OutageMode.DROP:
            transport = request.transport
            if transport is not None:
                transport.abort()
            _record(ctx, request, kind, received_at, 0, None, None)
            log.info("device_request", kind=kind.value, status=0, outage=outage.value)
            # The connection is gone; this exception only ends the handler.
            raise web.HTTPServiceUnavailable()
        _record(ctx, request, kind, received_at, 503, None, None)
        log.info("device_request", kind=kind.value, status=503, outage=outage.value)
        return web.Response(status=503, text="503 Service Unavailable (emulated outage)")

    code: int | None
    failure: ApiError | None = ctx.faults.error(kind)
    if failure is not None:
        await _read_body(request)
    try:
        if failure is not None:
            raise failure
        response = await handler(request)
        code = request.get(_CODE)
    except ApiError as exc:
        failure = exc
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
        failure = ApiError(ErrorCode.NOT_FOUND, "resource not found")
    except web.HTTPRequestEntityTooLarge:
        failure = ApiError(ErrorCode.INVALID_PARAMETER, "request body too large")
    except asyncio.CancelledError:
        # The client went away (e.g. gave up on a long-poll): log it as "no response".
        _record(ctx, request, kind, received_at, 0, None, None)
        log.info("device_request", kind=kind.value, device_id=request.get(_DEVICE_ID),
                 status=0, cancelled=True)
        raise
    except Exception:
        log.exception("device_request_failed", kind=kind.value)
        failure = ApiError(ErrorCode.INTERNAL_ERROR, "internal server error")
    if failure is not None:
        if failure.device_id is not None:
            request[_DEVICE_ID] = failure.device_id
        payload = failure.body()
        request[_RESPONSE] = payload
        response = web.json_response(payload, status=failure.http_status, headers=failure.headers)
        code = int(failure.code)
    _record(ctx, request, kind, received_at, response.status, code, request.get(_RESPONSE))
    log.info(
        "device_request",
        kind=kind.value,
        device_id=request.get(_DEVICE_ID),
        status=response.status,
        code=code,
        duration_ms=round((time.monotonic() - started) * 1000, 1),
    )
    return response


def _record(
    ctx: EmulatorContext,
    request: web.Request,
    kind: RequestKind,
    received_at: datetime,
    status: int,
    code: int | None,
    response: Any,
) -> None:
    ctx.store.record_request(
        kind=kind,
        method=request.method,
        path=request.path,
        device_id=request.get(_DEVICE_ID),
        received_at=received_at,
        query=dict(request.query),
        body=request.get(_LOG_BODY),
        http_status=status,
        code=code,
        response=_redact(response),
    )


# ---------------------------------------------------------------------- helpers


async def _read_body(request: web.Request) -> bytes:
    """Read the raw body once and remember a loggable (redacted) form of it."""
    raw = await request.read()
    if _LOG_BODY not in request:
        logged: Any = None
        if raw:
            try:
                logged = _redact(parse_json_body(raw))
            except ApiError:
                logged = raw.decode("utf-8", errors="replace")
        request[_LOG_BODY] = logged
    return raw


def _bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _authenticate(request: web.Request) -> Device:
    device = _context(request).store.authenticate(_bearer_token(request))
    request[_DEVICE_ID] = device.device_id
    return device


def _rate_limit(request: web.Request, device: Device, limit_class: RateLimitClass) -> None:
    ctx = _context(request)
    if not ctx.store.settings.rate_limits_enabled:
        return
    retry_after = ctx.limiter.check(device.device_id, limit_class)
    if retry_after is not None:
        raise ApiError(
            ErrorCode.TOO_MANY_REQUESTS,
            "too many requests",
            details={"retry_after_seconds": retry_after},
            headers={"Retry-After": str(retry_after)},
        )


def _validated(request: web.Request, model: type[ModelT], raw: bytes) -> ModelT:
    """The body validated against ``model`` and the oracle's stricter rules."""
    body = validate_body(model, raw)
    check_body(body, parse_json_body(raw), _context(request).store.settings)
    return body


def _ok(request: web.Request, data: Any = None) -> web.Response:
    payload = envelope(data)
    request[_RESPONSE] = payload
    request[_CODE] = int(ErrorCode.SUCCESS)
    return web.json_response(payload)


# ---------------------------------------------------------------------- handlers


async def register(request: web.Request) -> web.StreamResponse:
    """``POST /v1/device/register`` (no auth): 200 with credentials, 409/4001 for a known sn."""
    raw = await _read_body(request)
    body = _validated(request, DeviceRegisterRequest, raw)
    device = _context(request).store.register(body)
    request[_DEVICE_ID] = device.device_id
    data = DeviceRegisterResponse(
        device_id=device.device_id,
        device_secret=device.secret,
        expires_in=_context(request).store.settings.secret_ttl,
    )
    return _ok(request, data.to_wire())


async def token(request: web.Request) -> web.StreamResponse:
    """``POST /v1/device/token`` (no auth): un-enveloped token, or 401/2001 for bad credentials."""
    raw = await _read_body(request)
    body = validate_body(DeviceTokenRequest, raw)
    store = _context(request).store
    access_token, device = store.issue_token(body)
    request[_DEVICE_ID] = device.device_id
    payload = AccessTokenResponse(
        access_token=access_token,
        token_type=TokenType.BEARER,
        expires_in=max(1, math.ceil(store.settings.token_ttl)),
    ).to_wire()
    request[_RESPONSE] = payload
    return web.json_response(payload)


async def heartbeat(request: web.Request) -> web.StreamResponse:
    """``POST /v1/device/heartbeat``: every pending command of the device rides along."""
    raw = await _read_body(request)
    device = _authenticate(request)
    _rate_limit(request, device, RateLimitClass.HIGH_FREQUENCY)
    body = _validated(request, HeartbeatRequest, raw)
    device.last_heartbeat = body.to_wire()
    commands = _context(request).store.claim_for_heartbeat(device.device_id)
    return _ok(request, {"commands": [c.wire() for c in commands]})


async def telemetry(request: web.Request) -> web.StreamResponse:
    """``POST /v1/device/telemetry``."""
    raw = await _read_body(request)
    device = _authenticate(request)
    _rate_limit(request, device, RateLimitClass.HIGH_FREQUENCY)
    _validated(request, TelemetryUpload, raw)
    return _ok(request)


async def events(request: web.Request) -> web.StreamResponse:
    """``POST /v1/device/events``."""
    raw = await _read_body(request)
    device = _authenticate(request)
    _rate_limit(request, device, RateLimitClass.REPORTING)
    _validated(request, EventReport, raw)
    return _ok(request)


async def charging_records(request: web.Request) -> web.StreamResponse:
    """``POST /v1/device/charging-records``: 409/4001 for a ``record_id`` already stored."""
    raw = await _read_body(request)
    device = _authenticate(request)
    _rate_limit(request, device, RateLimitClass.REPORTING)
    body = _validated(request, ChargingRecordUpload, raw)
    _context(request).store.store_charging_record(device.device_id, body)
    return _ok(request)


async def commands(request: web.Request) -> web.StreamResponse:
    """``GET /v1/device/commands``: one command at once if pending, else hold up to ``wait`` s."""
    await _read_body(request)
    device = _authenticate(request)
    query = parse_poll_query(request.query)
    check_connector(query.connector_id, _context(request).store.settings)
    claimed = await _context(request).broker.wait_for_command(
        device.device_id,
        query.connector_id,
        float(query.wait),
        is_alive=lambda: _client_alive(request),
    )
    return _ok(request, claimed[0].wire() if claimed is not None else None)


async def command_status(request: web.Request) -> web.StreamResponse:
    """``POST /v1/device/command-status``: 404/3001 for an unknown ``command_id``."""
    raw = await _read_body(request)
    device = _authenticate(request)
    _rate_limit(request, device, RateLimitClass.REPORTING)
    body = _validated(request, DeviceCommandStatus, raw)
    _context(request).store.report_status(device.device_id, body)
    return _ok(request)


async def firmware_status(request: web.Request) -> web.StreamResponse:
    """``POST /v1/device/firmware/status``."""
    raw = await _read_body(request)
    device = _authenticate(request)
    body = _validated(request, FirmwareUpgradeStatus, raw)
    device.last_firmware_status = body.to_wire()
    return _ok(request)


_HANDLERS: dict[DeviceEndpoint, Handler] = {
    DeviceEndpoint.REGISTER: register,
    DeviceEndpoint.TOKEN: token,
    DeviceEndpoint.HEARTBEAT: heartbeat,
    DeviceEndpoint.TELEMETRY: telemetry,
    DeviceEndpoint.EVENTS: events,
    DeviceEndpoint.CHARGING_RECORDS: charging_records,
    DeviceEndpoint.COMMANDS: commands,
    DeviceEndpoint.COMMAND_STATUS: command_status,
    DeviceEndpoint.FIRMWARE_STATUS: firmware_status,
}


def add_device_routes(app: web.Application) -> None:
    """Register every ``/v1/device/*`` route (named ``device.<kind>``)."""
    for endpoint, spec in ENDPOINTS.items():
        app.router.add_route(
            spec.method,
            API_PREFIX + endpoint.value,
            _HANDLERS[endpoint],
            name=f"device.{kind_of_endpoint(endpoint).value}",
        )
