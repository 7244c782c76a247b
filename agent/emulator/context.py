"""The emulator's shared objects, stored on the aiohttp application."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from agent.emulator.faults import EndpointFaults
from agent.emulator.longpoll import CommandBroker
from agent.emulator.ratelimit import RateLimiter
from agent.emulator.state import EmulatorStore

__all__ = ["CONTEXT", "EmulatorContext"]


@dataclass
class EmulatorContext:
    """Everything the route handlers need: state store, long-poll broker, rate limiter,
    per-endpoint faults."""

    store: EmulatorStore
    broker: CommandBroker
    limiter: RateLimiter
    faults: EndpointFaults

    def reset(self) -> None:
        """Forget all state, end held long-polls with "no command" and clear rate windows."""
        self.broker.release_all()
        self.store.reset()
        self.limiter.reset()
        self.faults.clear()


CONTEXT = web.AppKey("emulator_context", EmulatorContext)
"""Application key under which :func:`agent.emulator.app.create_app` stores the context."""
