"""What a protocol driver supplies to :class:`~hal.can.modules_base.PowerModuleGroup`.

Frame building and decoding only: every hook is a pure function of its arguments
and the driver's options (plus the controller address); the group decides when
frames are sent and what the answers mean for the module table.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar

from hal.can.module_table import Discovery, Frame, Reading


class ModuleProtocol(abc.ABC):
    """The hooks a CAN power-module protocol implements."""

    protocol: ClassVar[str]

    @abc.abstractmethod
    def _source(self, arbitration_id: int) -> int | None:
        """The module address a received frame comes from, :data:`GROUP_SOURCE` for an
        answer from our group as a whole, ``None`` for a frame that is not ours."""

    @abc.abstractmethod
    def _decode(self, source: int, arbitration_id: int, data: bytes | bytearray) -> (
        Reading | Discovery | None
    ):
        """Decode a frame from ``source``; FrameError on garbage, None when irrelevant.

        ``source`` may be an address not (yet) in the module table when discovering.
        """

    @abc.abstractmethod
    def _poll_frames(self, address: int) -> list[Frame]:
        """Requests that read one module's values and status (also the keep-alive)."""

    @abc.abstractmethod
    def _ratings_frames(self, address: int) -> list[Frame]:
        """Requests that read one module's ratings."""

    @abc.abstractmethod
    def _discovery_frames(self) -> list[Frame]:
        """Requests whose answers name the modules of our group."""

    @abc.abstractmethod
    def _on_frames(self, address: int) -> list[Frame]:
        """Switch one module's output on."""

    @abc.abstractmethod
    def _off_frames(self, address: int) -> list[Frame]:
        """Switch one module's output off."""

    @abc.abstractmethod
    def _group_off_frames(self) -> list[Frame]:
        """Switch every module of our group off (used when modules are discovered)."""

    @abc.abstractmethod
    def _setpoint_frames(
        self, voltage: float, total_current: float, shares: Mapping[int, float]
    ) -> list[Frame]:
        """Setpoints for the active modules: ``shares`` maps address -> amps and sums
        to ``total_current``."""

    def _describe_extra(self) -> dict[str, Any]:
        """Protocol-specific fields for :meth:`describe`."""
        return {}
