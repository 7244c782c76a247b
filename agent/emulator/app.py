"""Application factory and the :class:`Emulator` server wrapper."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Self

import structlog
from aiohttp import web

from agent.channels.tellus.models import RATE_LIMITS, RateLimit, RateLimitClass
from agent.emulator.context import CONTEXT, EmulatorContext
from agent.emulator.device_routes import API_PREFIX, add_device_routes, device_api_middleware
from agent.emulator.faults import EndpointFaults
from agent.emulator.longpoll import CommandBroker
from agent.emulator.operator_models import (
    DeliveryChannel,
    FaultMode,
    FaultView,
    OutageMode,
    OutageView,
    ReceivedRequest,
    RequestKind,
)
from agent.emulator.operator_routes import (
    OPERATOR_PREFIX,
    add_operator_routes,
    operator_middleware,
)
from agent.emulator.ratelimit import RateLimiter
from agent.emulator.state import EmulatorSettings, EmulatorStore

__all__ = ["Emulator", "build_context", "create_app"]

log = structlog.get_logger("agent.emulator")

_SHUTDOWN_TIMEOUT = 2.0


def build_context(
    settings: EmulatorSettings | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    rate_limits: Mapping[RateLimitClass, RateLimit] = RATE_LIMITS,
) -> EmulatorContext:
    """Create a fresh store, long-poll broker and rate limiter wired together.

    Args:
        settings: runtime settings; defaults to :class:`EmulatorSettings()`.
        clock: monotonic clock (seconds) for token expiry, rate limits and outages.
        rate_limits: limit per class (defaults to the documented ones).
    """
    store = EmulatorStore(settings or EmulatorSettings(), clock)
    return EmulatorContext(
        store=store,
        broker=CommandBroker(store),
        limiter=RateLimiter(clock, rate_limits),
        faults=EndpointFaults(clock),
    )


def create_app(context: EmulatorContext | None = None) -> web.Application:
    """Build the aiohttp application: ``/v1/device/*`` plus ``/emulator/*``.

    The context is reachable as ``app[agent.emulator.context.CONTEXT]``. Held long-polls are
    released when the application shuts down.
    """
    ctx = context or build_context()
    app = web.Application(middlewares=[device_api_middleware, operator_middleware])
    app[CONTEXT] = ctx
    add_device_routes(app)
    add_operator_routes(app)

    async def _release_waiters(_: web.Application) -> None:
        ctx.broker.release_all()

    app.on_shutdown.append(_release_waiters)
    return app


class Emulator:
    """The platform emulator as a library object.

    Usage::

        async with Emulator(token_ttl=2) as emu:      # listens on 127.0.0.1, random port
            client_base_url = emu.api_url              # "http://127.0.0.1:<port>/v1"
            emu.queue_command(command="stop_charging", connector_id=1)

    Args:
        token_ttl: access-token lifetime in seconds (default 86400).
        secret_ttl: ``expires_in`` reported at registration.
        rate_limits_enabled: apply the documented per-device rate limits.
        rate_limits: override the limit per class.
        clock: monotonic clock for token expiry, rate limits and outages.
        max_received: how many received requests the log keeps.
        connectors: the connector ids every registered device has (requests naming another
            connector are refused with 1001).
        accept_extensions: accept the project's extension fields (CDR ``stop_reason`` /
            ``transaction_id`` / ``direction``, telemetry ``component_health``); ``False``
            behaves like a strict server that refuses every unknown field.
    """

    def __init__(
        self,
        *,
        token_ttl: float = 86400.0,
        secret_ttl: int = 86400,
        rate_limits_enabled: bool = True,
        rate_limits: Mapping[RateLimitClass, RateLimit] = RATE_LIMITS,
        clock: Callable[[], float] = time.monotonic,
        max_received: int = 100_000,
        connectors: tuple[int, ...] = (1, 2),
        accept_extensions: bool = True,
    ) -> None:
        settings = EmulatorSettings(
            token_ttl=token_ttl,
            secret_ttl=secret_ttl,
            rate_limits_enabled=rate_limits_enabled,
            max_received=max_received,
            connectors=tuple(connectors),
            accept_extensions=accept_extensions,
        )
        self.context = build_context(settings, clock=clock, rate_limits=rate_limits)
        self.app = create_app(self.context)
        self._runner: web.AppRunner | None = None
        self._host = "127.0.0.1"
        self._port: int | None = None
        self._scheme = "http"

    # ------------------------------------------------------------------ lifecycle

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *, ssl_context: ssl.SSLContext | None = None
    ) -> int:
        """Start listening and return the bound port (``port=0`` picks a free one).

        Raises:
            RuntimeError: already started.
            OSError: the address cannot be bound.
        """
        if self._runner is not None:
            raise RuntimeError("emulator already started")
        runner = web.AppRunner(
            self.app,
            handler_cancellation=True,
            shutdown_timeout=_SHUTDOWN_TIMEOUT,
            access_log=None,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._host = host
        self._port = int(runner.addresses[0][1])
        self._scheme = "https" if ssl_context is not None else "http"
        log.info("emulator_started", url=self.base_url)
        return self._port

    async def stop(self) -> None:
        """Release held long-polls, close connections and stop listening. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self.context.broker.release_all()
        await runner.cleanup()
        log.info("emulator_stopped")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ addresses

    @property
    def port(self) -> int:
        """The bound port.

        Raises:
            RuntimeError: not started.
        """
        if self._port is None:
            raise RuntimeError("emulator not started")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the running server."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{self._scheme}://{host}:{self.port}"

    @property
    def api_url(self) -> str:
        """Platform base URL for the agent (ends in ``/v1``)."""
        return self.base_url + API_PREFIX

    @property
    def operator_url(self) -> str:
        """Base URL of the operator endpoints (ends in ``/emulator``)."""
        return self.base_url + OPERATOR_PREFIX

    # ------------------------------------------------------------------ in-process shortcuts

    def queue_command(
        self,
        *,
        command: str,
        params: dict[str, Any] | None = None,
        device_id: str | None = None,
        connector_id: int | None = None,
        expiry: datetime | None = None,
        command_id: str | None = None,
        deliveries: int = 1,
        channel: DeliveryChannel | None = None,
    ) -> str:
        """Queue a command (same rules as ``POST /emulator/commands``); returns its id."""
        record = self.context.store.queue_command(
            command=command,
            params=params or {},
            device_id=device_id,
            connector_id=connector_id,
            expiry=expiry,
            command_id=command_id,
            deliveries=deliveries,
            channel=channel,
        )
        return record.command_id

    def redeliver(
        self,
        command_id: str,
        *,
        channel: DeliveryChannel | None = None,
        connector_id: int | None = None,
    ) -> None:
        """Make ``command_id`` deliverable once more (optionally only on ``channel``; for the
        long-poll, only to ``connector_id``'s)."""
        self.context.store.redeliver(command_id, channel=channel, connector_id=connector_id)

    def inject_fault(
        self, endpoint: RequestKind, mode: FaultMode = FaultMode.INTERNAL_ERROR, seconds: float = 60.0
    ) -> FaultView:
        """Make one endpoint fail in ``mode`` for ``seconds`` (see :mod:`agent.emulator.faults`)."""
        return self.context.faults.inject(endpoint, mode, seconds)

    def clear_faults(self) -> None:
        """End every injected endpoint fault."""
        self.context.faults.clear()

    def received(
        self, kind: RequestKind | None = None, device_id: str | None = None
    ) -> list[ReceivedRequest]:
        """Logged device requests, optionally filtered."""
        return self.context.store.received(kind=kind, device_id=device_id)

    def expire_tokens(self, device_id: str | None = None) -> int:
        """Force live tokens to expire (they answer 2002); returns how many were live."""
        return self.context.store.expire_tokens(device_id)

    def start_outage(self, seconds: float, mode: OutageMode = OutageMode.HTTP_503) -> OutageView:
        """Fail every device request for ``seconds`` seconds."""
        return self.context.store.start_outage(seconds, mode)

    def reset(self) -> None:
        """Forget all state (see :meth:`EmulatorContext.reset`)."""
        self.context.reset()
