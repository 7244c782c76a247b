"""Contactor coil/mirror lines as gpio-sim-style files, driven by a :class:`SimContactor`.

The GPIO contactor driver with ``backend = "sim"`` (:class:`hal.gpio.lines.SimLines`)
and :class:`ContactorLineSimulator` meet in one directory::

    {root}/{chip}/sim_gpio{coil_line}/value     written by the driver ("1" = coil energised)
    {root}/{chip}/sim_gpio{mirror_line}/value   written here: the mirror's electrical level

The simulator polls the coil file (every ``interval_s``, 2 ms by default), copies it
into ``SimContactor.coil`` and writes the mirror level from
``SimContactor.mirror_closed``: electrical = mirror_closed XOR mirror_active_low.
A missing coil file means the line is not requested (board pull-down: coil off);
an unparsable one keeps the previous value.

Contact mechanics (operate/release time, weld, fail-to-close) are
:func:`hal.sim.physics.advance_contactor`, re-exported here; there is one
implementation. Exactly one owner must call it per contactor, with one clock:
either :func:`hal.sim.physics.step` (``world.time``; keep ``mechanics=False`` here,
the default) or this simulator (``mechanics=True``: called with
``time.monotonic()`` on every poll, for stand-alone GPIO benches and tests). The
driver's ``close_timeout_ms`` must cover operate time + ``debounce_ms`` + one
mechanics step + one poll of this simulator.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from hal.gpio.lines import atomic_write_text, sim_value_path
from hal.sim.physics import advance_contactor
from hal.sim.world import SimContactor
from hal.tasks import stop_task

__all__ = ["ContactorLineLayout", "ContactorLineSimulator", "advance_contactor", "layout"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ContactorLineLayout:
    """Where one contactor's lines live, and the driver options that match."""

    root: Path
    chip: str
    coil_line: int
    mirror_line: int
    mirror_active_low: bool
    coil_value: Path
    mirror_value: Path

    def driver_options(self, **overrides: Any) -> dict[str, Any]:
        """Options for ``GpioContactor`` (``driver = "gpio"``) pointing at these files."""
        options: dict[str, Any] = {
            "backend": "sim",
            "root": str(self.root),
            "chip": self.chip,
            "coil_line": self.coil_line,
            "mirror_line": self.mirror_line,
            "mirror_active_low": self.mirror_active_low,
        }
        options.update(overrides)
        return options


def layout(
    root: str | Path, chip: str, coil_line: int, mirror_line: int, mirror_active_low: bool = True
) -> ContactorLineLayout:
    """The file paths :class:`ContactorLineSimulator` uses for these arguments."""
    base = Path(root)
    return ContactorLineLayout(
        root=base,
        chip=chip,
        coil_line=coil_line,
        mirror_line=mirror_line,
        mirror_active_low=mirror_active_low,
        coil_value=sim_value_path(base, chip, coil_line),
        mirror_value=sim_value_path(base, chip, mirror_line),
    )


class ContactorLineSimulator:
    """Plays the contactor hardware behind one coil line and one mirror line (files)."""

    def __init__(
        self,
        root: str | Path,
        chip: str,
        coil_line: int,
        mirror_line: int,
        mirror_active_low: bool,
        sim_contactor: SimContactor,
        *,
        interval_s: float = 0.002,
        mechanics: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.layout = layout(root, chip, coil_line, mirror_line, mirror_active_low)
        self.contactor = sim_contactor
        self.interval_s = interval_s
        self.mechanics = mechanics
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._written_level: bool | None = None
        self._io_error: str | None = None

    async def start(self) -> None:
        """Create the chip directory and the mirror file, then start polling (idempotent)."""
        if self._task is not None:
            return
        self.layout.mirror_value.parent.mkdir(parents=True, exist_ok=True)
        self.layout.coil_value.parent.mkdir(parents=True, exist_ok=True)
        self._written_level = None
        self.step()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-contactor-lines")

    async def stop(self) -> None:
        """Stop polling; the files stay as they are (idempotent)."""
        task, self._task = self._task, None
        await stop_task(task)

    def step(self) -> None:
        """One poll: coil file -> SimContactor (-> mechanics) -> mirror file."""
        coil = self._read_coil()
        if coil is not None and coil != self.contactor.coil:
            self.contactor.coil = coil
        if self.mechanics:
            advance_contactor(self.contactor, self._clock())
        level = self.contactor.mirror_closed != self.layout.mirror_active_low
        if level != self._written_level:
            atomic_write_text(self.layout.mirror_value, "1\n" if level else "0\n")
            self._written_level = level

    def _read_coil(self) -> bool | None:
        try:
            text = self.layout.coil_value.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return False  # line not requested: the board pull-down keeps the coil off
        except OSError:
            return None
        if text in ("0", "1"):
            return text == "1"
        return None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.step()
            except OSError as exc:
                if self._io_error != str(exc):
                    log.warning(
                        "sim_contactor_lines_io_error", error=str(exc), root=str(self.layout.root)
                    )
                self._io_error = str(exc)
            else:
                self._io_error = None
