"""Typed asyncio client for the emulator's operator endpoints (``/emulator/*``).

Used by tests, the demo and benchmarks to drive a running emulator (in-process or started
from the CLI)::

    async with OperatorClient("http://127.0.0.1:8080") as op:
        command_id = await op.queue_command("start_charging", {"charge_power": 7}, connector_id=1)
        view = await op.wait_for_status(command_id, "accepted", timeout=10)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Self, TypeVar

import aiohttp
from pydantic import BaseModel

from agent.emulator.operator_models import (
    ChargingRecordView,
    CommandView,
    ConfigUpdate,
    ConfigView,
    DeviceView,
    DeliveryChannel,
    FaultMode,
    FaultRequest,
    FaultView,
    OutageMode,
    OutageRequest,
    OutageView,
    QueueCommandRequest,
    QueueCommandResponse,
    ReceivedRequest,
    RequestKind,
    TokenActionRequest,
    TokenActionResponse,
)

__all__ = ["OperatorClient", "OperatorRequestError"]

ModelT = TypeVar("ModelT", bound=BaseModel)

_OPERATOR_PREFIX = "/emulator"


class OperatorRequestError(Exception):
    """The emulator refused an operator request (HTTP ≥ 400).

    Attributes:
        status: HTTP status.
        message: the ``error`` text from the response (or the raw body).
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class OperatorClient:
    """Client for one emulator.

    Args:
        base_url: the emulator root (``http://127.0.0.1:8080``); a trailing ``/emulator`` is
            accepted too.
        session: an existing session to reuse (not closed by :meth:`close`); by default the
            client creates and owns one.
        timeout: total timeout per request, seconds.
    """

    def __init__(
        self,
        base_url: str,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 10.0,
    ) -> None:
        root = base_url.rstrip("/")
        root = root.removesuffix(_OPERATOR_PREFIX)
        self._url = root + _OPERATOR_PREFIX
        self._session = session
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if this client created it."""
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
            self._owns_session = True
        return self._session

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: BaseModel | None = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        kwargs: dict[str, Any] = {"timeout": self._timeout}
        if body is not None:
            kwargs["data"] = body.model_dump_json(exclude_none=True)
            kwargs["headers"] = {"Content-Type": "application/json"}
        if params:
            kwargs["params"] = params
        async with self._get_session().request(method, self._url + path, **kwargs) as resp:
            text = await resp.text()
            if resp.status >= 400:
                message = text
                try:
                    payload = await resp.json(content_type=None)
                    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
                        message = payload["error"]
                except ValueError:
                    pass
                raise OperatorRequestError(resp.status, message)
            return await resp.json(content_type=None)

    @staticmethod
    def _parse(model: type[ModelT], payload: Any) -> ModelT:
        return model.model_validate(payload)

    @staticmethod
    def _parse_list(model: type[ModelT], items: Iterable[Any]) -> list[ModelT]:
        return [model.model_validate(item) for item in items]

    # ------------------------------------------------------------------ endpoints

    async def health(self) -> bool:
        """``True`` when the emulator answers ``GET /emulator/health``."""
        payload = await self._request("GET", "/health")
        return isinstance(payload, dict) and payload.get("status") == "ok"

    async def get_config(self) -> ConfigView:
        """Current runtime settings."""
        return self._parse(ConfigView, await self._request("GET", "/config"))

    async def update_config(
        self,
        *,
        token_ttl: float | None = None,
        secret_ttl: int | None = None,
        rate_limits_enabled: bool | None = None,
    ) -> ConfigView:
        """Change settings; ``None`` leaves a setting unchanged. New tokens use the new TTL."""
        body = ConfigUpdate(
            token_ttl=token_ttl, secret_ttl=secret_ttl, rate_limits_enabled=rate_limits_enabled
        )
        return self._parse(ConfigView, await self._request("PATCH", "/config", body=body))

    async def devices(self) -> list[DeviceView]:
        """Registered devices in registration order."""
        payload = await self._request("GET", "/devices")
        return self._parse_list(DeviceView, payload["devices"])

    async def delete_device(self, device_id: str) -> None:
        """Remove a device (its credentials and tokens stop working).

        Raises:
            OperatorRequestError: 404 for an unknown device.
        """
        await self._request("DELETE", f"/devices/{device_id}")

    async def queue_command(
        self,
        command: str,
        params: dict[str, Any] | None = None,
        *,
        device_id: str | None = None,
        connector_id: int | None = None,
        expiry: datetime | None = None,
        command_id: str | None = None,
        deliveries: int = 1,
        channel: DeliveryChannel | str | None = None,
    ) -> str:
        """Queue a command and return its ``command_id`` (``channel``: deliver it only there,
        e.g. ``heartbeat``).

        Without ``connector_id`` the command is device-level (any connector's long-poll and
        heartbeats may take it); without ``device_id`` the only registered device is used.
        ``deliveries`` > 1 hands out the same ``command_id`` that many times.

        Raises:
            OperatorRequestError: 400 (no/ambiguous device, bad body), 404 (unknown device),
                409 (``command_id`` exists).
        """
        body = QueueCommandRequest(
            device_id=device_id,
            connector_id=connector_id,
            command=command,
            params=params or {},
            expiry=expiry,
            command_id=command_id,
            deliveries=deliveries,
            channel=DeliveryChannel(channel) if channel is not None else None,
        )
        payload = await self._request("POST", "/commands", body=body)
        return self._parse(QueueCommandResponse, payload).command_id

    async def commands(self, device_id: str | None = None) -> list[CommandView]:
        """All commands (of one device) in queue order."""
        params = {"device_id": device_id} if device_id else None
        payload = await self._request("GET", "/commands", params=params)
        return self._parse_list(CommandView, payload["commands"])

    async def command(self, command_id: str) -> CommandView:
        """One command with its deliveries and status history.

        Raises:
            OperatorRequestError: 404 for an unknown command.
        """
        return self._parse(CommandView, await self._request("GET", f"/commands/{command_id}"))

    async def redeliver(self, command_id: str) -> CommandView:
        """Deliver the same ``command_id`` once more (de-duplication tests)."""
        payload = await self._request("POST", f"/commands/{command_id}/redeliver")
        return self._parse(CommandView, payload)

    async def received(
        self,
        kind: RequestKind | str | None = None,
        *,
        device_id: str | None = None,
        since_seq: int = 0,
    ) -> list[ReceivedRequest]:
        """Device requests the emulator received (accepted and rejected), in arrival order."""
        params: dict[str, str] = {}
        if kind is not None:
            params["kind"] = RequestKind(kind).value
        if device_id is not None:
            params["device_id"] = device_id
        if since_seq:
            params["since_seq"] = str(since_seq)
        payload = await self._request("GET", "/received", params=params)
        return self._parse_list(ReceivedRequest, payload["requests"])

    async def charging_records(self, device_id: str | None = None) -> list[ChargingRecordView]:
        """Stored charging records with their rejected-duplicate counts."""
        params = {"device_id": device_id} if device_id else None
        payload = await self._request("GET", "/charging-records", params=params)
        return self._parse_list(ChargingRecordView, payload["records"])

    async def start_outage(
        self, seconds: float, mode: OutageMode | str = OutageMode.HTTP_503
    ) -> OutageView:
        """Fail every device request for ``seconds`` seconds (``http_503`` or ``drop``)."""
        body = OutageRequest(seconds=seconds, mode=OutageMode(mode))
        return self._parse(OutageView, await self._request("POST", "/outage", body=body))

    async def inject_fault(
        self,
        endpoint: RequestKind | str,
        mode: FaultMode | str = FaultMode.INTERNAL_ERROR,
        seconds: float = 60.0,
    ) -> FaultView:
        """Make one device endpoint fail (9001, 403, or 429 without retry_after) for ``seconds``."""
        body = FaultRequest(endpoint=RequestKind(endpoint), mode=FaultMode(mode), seconds=seconds)
        return self._parse(FaultView, await self._request("POST", "/faults", body=body))

    async def clear_faults(self) -> None:
        """End every injected endpoint fault."""
        await self._request("DELETE", "/faults")

    async def outage(self) -> OutageView:
        """Current outage state."""
        return self._parse(OutageView, await self._request("GET", "/outage"))

    async def end_outage(self) -> OutageView:
        """End an outage early."""
        return self._parse(OutageView, await self._request("DELETE", "/outage"))

    async def expire_tokens(self, device_id: str | None = None) -> int:
        """Force tokens (of one device, or all) to expire; they answer 401/2002."""
        body = TokenActionRequest(device_id=device_id)
        payload = await self._request("POST", "/tokens/expire", body=body)
        return self._parse(TokenActionResponse, payload).affected

    async def revoke_tokens(self, device_id: str | None = None) -> int:
        """Invalidate tokens (of one device, or all); they answer 401/2001."""
        body = TokenActionRequest(device_id=device_id)
        payload = await self._request("POST", "/tokens/revoke", body=body)
        return self._parse(TokenActionResponse, payload).affected

    async def reset(self) -> None:
        """Forget all emulator state."""
        await self._request("POST", "/reset")

    # ------------------------------------------------------------------ waiting helpers

    async def wait_for_status(
        self, command_id: str, status: str, *, timeout: float = 10.0, interval: float = 0.05
    ) -> CommandView:
        """Poll until the command's history contains ``status``; return the command.

        Raises:
            TimeoutError: ``status`` not reported within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            view = await self.command(command_id)
            if any(s.status == status for s in view.statuses):
                return view
            if time.monotonic() >= deadline:
                raise TimeoutError(f"command {command_id} never reported {status!r}")
            await asyncio.sleep(interval)
