"""Shared resources handed to every driver at construction time.

One CAN bus or one RS-485 port is shared by several drivers (two connectors' module
groups on ``can0``, two meters on one RS-485 line). The context creates each
transport once, on first request, and closes them all in :meth:`close`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from hal.config import CanBusConfig, ModbusLinkConfig
from hal.tick import Pace

if TYPE_CHECKING:
    from hal.can.port import CanPort
    from hal.modbus.link import ModbusLink


class BuildContext:
    def __init__(
        self,
        *,
        can: Mapping[str, CanBusConfig],
        modbus: Mapping[str, ModbusLinkConfig],
        state_dir: Path,
        connector_id: int | None = None,
        pace: Pace | None = None,
        _shared: dict[str, object] | None = None,
    ) -> None:
        self.can_configs = dict(can)
        self.modbus_configs = dict(modbus)
        self.state_dir = state_dir
        self.connector_id = connector_id
        self._shared: dict[str, object] = {} if _shared is None else _shared
        #: the one :class:`~hal.tick.Pace` of the process: drivers slow their polls by
        #: it, the connectors report to it (busy until somebody reports)
        self.pace = pace if pace is not None else Pace()

    def for_connector(self, connector_id: int | None) -> "BuildContext":
        """A view of the same context (same shared transports) for one connector."""
        return BuildContext(
            can=self.can_configs,
            modbus=self.modbus_configs,
            state_dir=self.state_dir,
            connector_id=connector_id,
            pace=self.pace,
            _shared=self._shared,
        )

    def can_port(self, name: str) -> "CanPort":
        from hal.can.port import CanPort

        key = f"can:{name}"
        if key not in self._shared:
            self._shared[key] = CanPort(name, self.can_configs[name])
        port = self._shared[key]
        assert isinstance(port, CanPort)
        return port

    def modbus_link(self, name: str) -> "ModbusLink":
        from hal.modbus.link import ModbusLink

        key = f"modbus:{name}"
        if key not in self._shared:
            self._shared[key] = ModbusLink(name, self.modbus_configs[name])
        link = self._shared[key]
        assert isinstance(link, ModbusLink)
        return link

    async def close(self) -> None:
        """Close every transport created through this context (idempotent)."""
        for key, resource in list(self._shared.items()):
            close = getattr(resource, "close", None)
            if close is not None:
                result = close()
                if hasattr(result, "__await__"):
                    await result
            del self._shared[key]
