"""Operator endpoints of the emulator (``/emulator/*``) for tests, the demo and bench work.

Plain JSON (no platform envelope). Errors answer ``{"error": "<message>"}`` with 400, 404
or 409. Request bodies are the models in :mod:`agent.emulator.operator_models`; unknown keys
are rejected. These endpoints are never affected by an injected outage or by rate limits.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError

from agent.emulator.context import CONTEXT, EmulatorContext
from agent.emulator.errors import OperatorError
from agent.emulator.operator_models import (
    ConfigUpdate,
    ConfigView,
    FaultRequest,
    OutageRequest,
    QueueCommandRequest,
    QueueCommandResponse,
    RequestKind,
    TokenActionRequest,
    TokenActionResponse,
)

__all__ = ["OPERATOR_PREFIX", "add_operator_routes", "operator_middleware"]

log = structlog.get_logger("agent.emulator.operator")

OPERATOR_PREFIX = "/emulator"
"""Base path of the operator endpoints."""

ModelT = TypeVar("ModelT", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def operator_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn :class:`OperatorError` into ``{"error": ...}`` responses under ``/emulator``."""
    if not request.path.startswith(OPERATOR_PREFIX + "/"):
        return await handler(request)
    try:
        return await handler(request)
    except OperatorError as err:
        return web.json_response({"error": err.message}, status=err.status)
    except web.HTTPNotFound:
        return web.json_response({"error": "no such operator endpoint"}, status=404)
    except web.HTTPMethodNotAllowed:
        return web.json_response({"error": "method not allowed"}, status=405)


def _ctx(request: web.Request) -> EmulatorContext:
    return request.app[CONTEXT]


def _json(model: BaseModel | dict[str, Any], status: int = 200) -> web.Response:
    if isinstance(model, BaseModel):
        return web.json_response(text=model.model_dump_json(), status=status)
    return web.json_response(text=json.dumps(model), status=status)


def _models_json(key: str, models: list[Any]) -> web.Response:
    items = ",".join(m.model_dump_json() for m in models)
    return web.json_response(text=f'{{"{key}":[{items}]}}')


async def _body(request: web.Request, model: type[ModelT]) -> ModelT:
    raw = await request.read()
    try:
        data = json.loads(raw) if raw.strip() else {}
    except ValueError:
        raise OperatorError(400, "malformed JSON body") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise OperatorError(400, f"{field}: {first['msg']}") from None


def _int_query(request: web.Request, name: str, default: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise OperatorError(400, f"{name} must be an integer") from None


# ---------------------------------------------------------------------- handlers


async def health(request: web.Request) -> web.StreamResponse:
    """``GET /emulator/health`` → ``{"status": "ok"}``."""
    return _json({"status": "ok"})


async def get_config(request: web.Request) -> web.StreamResponse:
    """``GET /emulator/config`` → :class:`ConfigView`."""
    s = _ctx(request).store.settings
    return _json(
        ConfigView(
            token_ttl=s.token_ttl,
            secret_ttl=s.secret_ttl,
            rate_limits_enabled=s.rate_limits_enabled,
            connectors=list(s.connectors),
            accept_extensions=s.accept_extensions,
        )
    )


async def patch_config(request: web.Request) -> web.StreamResponse:
    """``PATCH /emulator/config`` (:class:`ConfigUpdate`) → :class:`ConfigView`."""
    update = await _body(request, ConfigUpdate)
    s = _ctx(request).store.settings
    if update.token_ttl is not None:
        s.token_ttl = update.token_ttl
    if update.secret_ttl is not None:
        s.secret_ttl = update.secret_ttl
    if update.rate_limits_enabled is not None:
        s.rate_limits_enabled = update.rate_limits_enabled
    if update.connectors is not None:
        s.connectors = tuple(sorted(set(update.connectors)))
    if update.accept_extensions is not None:
        s.accept_extensions = update.accept_extensions
    log.info("config_updated", **update.model_dump(exclude_none=True))
    return await get_config(request)


async def list_devices(request: web.Request) -> web.StreamResponse:
    """``GET /emulator/devices`` → ``{"devices": [DeviceView]}``."""
    return _models_json("devices", [d.view() for d in _ctx(request).store.devices()])


async def delete_device(request: web.Request) -> web.StreamResponse:
    """``DELETE /emulator/devices/{device_id}`` → ``{"deleted": device_id}``; 404 if unknown.

    The device's credentials and tokens stop working (2001 / token 401) and its ``sn`` may
    register again."""
    device_id = request.match_info["device_id"]
    _ctx(request).store.delete_device(device_id)
    return _json({"deleted": device_id})


async def queue_command(request: web.Request) -> web.StreamResponse:
    """``POST /emulator/commands`` (:class:`QueueCommandRequest`) → 201
    :class:`QueueCommandResponse`."""
    body = await _body(request, QueueCommandRequest)
    record = _ctx(request).store.queue_command(
        command=body.command,
        params=body.params,
        device_id=body.device_id,
        connector_id=body.connector_id,
        expiry=body.expiry,
        command_id=body.command_id,
        deliveries=body.deliveries,
        channel=body.channel,
    )
    return _json(
        QueueCommandResponse(command_id=record.command_id, device_id=record.device_id), 201
    )


async def list_commands(request: web.Request) -> web.StreamResponse:
    """``GET /emulator/commands[?device_id=]`` → ``{"commands": [CommandView]}``."""
    device_id = request.query.get("device_id")
    return _models_json("commands", [c.view() for c in _ctx(request).store.commands(device_id)])


async def get_command(request: web.Request) -> web.StreamResponse:
    """``GET /emulator/commands/{command_id}`` → :class:`CommandView`; 404 if unknown."""
    return _json(_ctx(request).store.command(request.match_info["command_id"]).view())


async def redeliver_command(request: web.Request) -> web.StreamResponse:
    """``POST /emulator/commands/{command_id}/redeliver`` → :class:`CommandView`: the same
    ``command_id`` becomes deliverable once more."""
    return _json(_ctx(request).store.redeliver(request.match_info["command_id"]).view())


async def received(request: web.Request) -> web.StreamResponse:
    """``GET /emulator/received[?kind=&device_id=&since_seq=]`` →
    ``{"requests": [ReceivedRequest]}`` in arrival order (``since_seq`` exclusive)."""
    kind_text = request.query.get("kind")
    try:
        kind = RequestKind(kind_text) if kind_text else None
    except ValueError:
        raise OperatorError(400, f"unknown kind {kind_text!r}") from None
    items = _ctx(request).store.received(
        kind=kind,
        device_id=request.query.get("device_id"),
        since_seq=_int_query(request, "since_seq", 0),
    )
    return _models_json("requests", items)


async def charging_records(request: web.Request) -> web.StreamResponse:
    """``GET /emulator/charging-records[?device_id=]`` → ``{"records": [ChargingRecordView]}``."""
    return _models_json(
        "records", _ctx(request).store.charging_records(request.query.get("device_id"))
    )


async def start_outage(request: web.Request) -> web.StreamResponse:
    """``POST /emulator/outage`` (:class:`OutageRequest`) → :class:`OutageView`."""
    body = await _body(request, OutageRequest)
    return _json(_ctx(request).store.start_outage(body.seconds, body.mode))


async def inject_fault(request: web.Request) -> web.StreamResponse:
    """``POST /emulator/faults`` (:class:`FaultRequest`) → :class:`FaultView`: one endpoint
    fails (9001, 403, or 429 without ``retry_after``) while the others work."""
    body = await _body(request, FaultRequest)
    return _json(_ctx(request).faults.inject(body.endpoint, body.mode, body.seconds))


async def clear_faults(request: web.Request) -> web.StreamResponse:
    """``DELETE /emulator/faults`` → ``{"cleared": true}``."""
    _ctx(request).faults.clear()
    return _json({"cleared": True})


async def get_outage(request: web.Request) -> web.StreamResponse:
    """``GET /emulator/outage`` → :class:`OutageView`."""
    return _json(_ctx(request).store.outage())


async def end_outage(request: web.Request) -> web.StreamResponse:
    """``DELETE /emulator/outage`` → :class:`OutageView` (inactive)."""
    return _json(_ctx(request).store.end_outage())


async def expire_tokens(request: web.Request) -> web.StreamResponse:
    """``POST /emulator/tokens/expire`` (:class:`TokenActionRequest`) →
    :class:`TokenActionResponse`; affected tokens then answer 401/2002."""
    body = await _body(request, TokenActionRequest)
    return _json(TokenActionResponse(affected=_ctx(request).store.expire_tokens(body.device_id)))


async def revoke_tokens(request: web.Request) -> web.StreamResponse:
    """``POST /emulator/tokens/revoke`` (:class:`TokenActionRequest`) →
    :class:`TokenActionResponse`; affected tokens then answer 401/2001."""
    body = await _body(request, TokenActionRequest)
    return _json(TokenActionResponse(affected=_ctx(request).store.revoke_tokens(body.device_id)))


async def reset(request: web.Request) -> web.StreamResponse:
    """``POST /emulator/reset`` → ``{"status": "ok"}``: forget everything; held long-polls
    return "no command"."""
    _ctx(request).reset()
    return _json({"status": "ok"})


def add_operator_routes(app: web.Application) -> None:
    """Register every ``/emulator/*`` route."""
    p = OPERATOR_PREFIX
    r = app.router
    r.add_get(f"{p}/health", health)
    r.add_get(f"{p}/config", get_config)
    r.add_patch(f"{p}/config", patch_config)
    r.add_get(f"{p}/devices", list_devices)
    r.add_delete(f"{p}/devices/{{device_id}}", delete_device)
    r.add_post(f"{p}/commands", queue_command)
    r.add_get(f"{p}/commands", list_commands)
    r.add_get(f"{p}/commands/{{command_id}}", get_command)
    r.add_post(f"{p}/commands/{{command_id}}/redeliver", redeliver_command)
    r.add_get(f"{p}/received", received)
    r.add_get(f"{p}/charging-records", charging_records)
    r.add_post(f"{p}/outage", start_outage)
    r.add_get(f"{p}/outage", get_outage)
    r.add_delete(f"{p}/outage", end_outage)
    r.add_post(f"{p}/faults", inject_fault)
    r.add_delete(f"{p}/faults", clear_faults)
    r.add_post(f"{p}/tokens/expire", expire_tokens)
    r.add_post(f"{p}/tokens/revoke", revoke_tokens)
    r.add_post(f"{p}/reset", reset)
