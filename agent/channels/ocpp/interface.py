"""The internal interface between the charger and an OCPP implementation.

:class:`ChargerPort` is everything an OCPP version may use of the charger: the connector
state machines (read their state, ``request_start``/``request_stop``, ``set_limit`` with
source ``"ocpp"``), the fault board, the firmware and log-bundle paths and the restart
request. :class:`CsmsChannel` is what the runtime sees of a running OCPP channel. OCPP 1.6
(:mod:`agent.channels.ocpp.v16`) implements it; 2.0.1 can be a second implementation of
the same two protocols without touching the connector state machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol

from agent.charging.connector import Connector
from agent.charging.faults import FaultBoard


@dataclass
class ChargerPort:
    serial_number: str
    model: str
    vendor: str
    firmware_version: str
    state_dir: Path
    connectors: dict[int, Connector]
    faults: FaultBoard
    free_vend: bool
    #: restart the agent (hard=True: the controller) after sessions were stopped
    request_restart: Callable[[bool], Awaitable[None]]
    #: install a firmware bundle from a URL through the signed firmware path; progress(status)
    install_firmware: Callable[[str, Callable[[str], None]], Awaitable[None]] | None = None
    #: build and upload a diagnostics bundle to a URL; returns the file name
    upload_diagnostics: Callable[[str, str | None, str | None], Awaitable[str]] | None = None
    #: extra state, e.g. the ID-token readers (hal.auth)
    readers: dict[int, Any] = field(default_factory=dict)


class CsmsChannel(Protocol):
    """A running OCPP channel (any version)."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def force_reconnect(self) -> None: ...
    def metadata(self) -> dict[str, Any]: ...
    @property
    def online(self) -> bool: ...
