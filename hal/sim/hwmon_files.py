"""The simulated cabinet's temperature sensors and fans as a hwmon-style sysfs directory.

:class:`HwmonSimulator` keeps one directory up to date from a :class:`SimWorld`::

    {root}/{hwmon}/name                "charger_sim"
    {root}/{hwmon}/temp{i}_label       sensor name (i = 1.. in world.temperatures order)
    {root}/{hwmon}/temp{i}_input       millidegree C, from world.temperatures[name]
    {root}/{hwmon}/fan{j}_label        fan name (j = 1.. in world.fans order)
    {root}/{hwmon}/fan{j}_input        rpm, from world.fans[name].rpm
    {root}/{hwmon}/pwm{j}              0..255: read back into world.fans[name].duty_percent
    {root}/{hwmon}/pwm{j}_enable       "2" (automatic) at start; the driver writes "1"

Temperatures are written exactly as ``world.temperatures`` holds them: adding the
``over_temperature`` injection (``world.extra_heat``) and turning duty into rpm
(``fan_slowdown``) is :mod:`hal.sim.physics`' job. A sensor name listed in
``unplugged`` (or removed from ``world.temperatures``) has its ``temp*_input``
file deleted, like a sensor that has gone away. Values are written atomically
(temp file + rename) and only when they change; an unparsable ``pwm`` value is
ignored (the previous duty is kept).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from hal.gpio.lines import atomic_write_text
from hal.sim.world import SimWorld
from hal.tasks import stop_task

log = structlog.get_logger(__name__)

PWM_MAX = 255


@dataclass(frozen=True, slots=True)
class FanFiles:
    rpm: Path
    pwm: Path
    enable: Path


@dataclass(frozen=True, slots=True)
class HwmonLayout:
    """Paths of one simulated hwmon directory, and the driver options that read it."""

    directory: Path
    sensors: Mapping[str, Path]
    fans: Mapping[str, FanFiles]

    def driver_options(
        self,
        max_c: float | Mapping[str, float] = 85.0,
        poll_interval_s: float = 1.0,
        **fan_overrides: Any,
    ) -> dict[str, Any]:
        """Options for ``HwmonThermal`` (``driver = "hwmon"``): every sensor and fan here.

        ``max_c`` is one limit for all sensors or a mapping by sensor name (missing
        names get 85 degC); ``fan_overrides`` (e.g. ``grace_s=0.5``) apply to every fan.
        """
        limits = max_c if isinstance(max_c, Mapping) else {name: max_c for name in self.sensors}
        return {
            "poll_interval_s": poll_interval_s,
            "sensors": [
                {"name": name, "path": str(path), "max_c": limits.get(name, 85.0)}
                for name, path in self.sensors.items()
            ],
            "fans": [
                {
                    "name": name,
                    "rpm_path": str(files.rpm),
                    "pwm_path": str(files.pwm),
                    "pwm_enable_path": str(files.enable),
                    **fan_overrides,
                }
                for name, files in self.fans.items()
            ],
        }


def layout(
    root: str | Path, sensors: Iterable[str], fans: Iterable[str], hwmon: str = "hwmon0"
) -> HwmonLayout:
    """File paths for ``sensors`` and ``fans`` (numbered from 1 in the given order)."""
    directory = Path(root) / hwmon
    return HwmonLayout(
        directory=directory,
        sensors={name: directory / f"temp{i}_input" for i, name in enumerate(sensors, start=1)},
        fans={
            name: FanFiles(
                directory / f"fan{j}_input", directory / f"pwm{j}", directory / f"pwm{j}_enable"
            )
            for j, name in enumerate(fans, start=1)
        },
    )


class HwmonSimulator:
    """Writes world temperatures and fan rpm to hwmon files; reads PWM back into the world."""

    def __init__(
        self, root: str | Path, world: SimWorld, *, hwmon: str = "hwmon0", interval_s: float = 0.05
    ) -> None:
        self.world = world
        self.layout = layout(root, list(world.temperatures), list(world.fans), hwmon)
        self.interval_s = interval_s
        self.unplugged: set[str] = set()
        self._written: dict[Path, str] = {}
        self._task: asyncio.Task[None] | None = None
        self._io_error: str | None = None

    async def start(self) -> None:
        """Create the directory and every file (PWM from the fans' current duty); start (idempotent)."""
        if self._task is not None:
            return
        d = self.layout.directory
        d.mkdir(parents=True, exist_ok=True)
        self._written.clear()
        atomic_write_text(d / "name", "charger_sim\n")
        for name, path in self.layout.sensors.items():
            atomic_write_text(path.with_name(path.name.replace("_input", "_label")), f"{name}\n")
        for name, files in self.layout.fans.items():
            atomic_write_text(
                files.rpm.with_name(files.rpm.name.replace("_input", "_label")), f"{name}\n"
            )
            duty = self.world.fans[name].duty_percent
            atomic_write_text(files.pwm, f"{round(duty * PWM_MAX / 100.0)}\n")
            atomic_write_text(files.enable, "2\n")
        self.step()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-hwmon")

    async def stop(self) -> None:
        """Stop updating; the files stay (idempotent)."""
        task, self._task = self._task, None
        await stop_task(task)

    def step(self) -> None:
        """One update: temperatures and rpm out, PWM duty in."""
        for name, path in self.layout.sensors.items():
            celsius = self.world.temperatures.get(name)
            if celsius is None or name in self.unplugged:
                if self._written.pop(path, None) is not None or path.exists():
                    path.unlink(missing_ok=True)
                continue
            self._write(path, f"{round(celsius * 1000.0)}\n")
        for name, files in self.layout.fans.items():
            fan = self.world.fans.get(name)
            if fan is None:
                continue
            try:
                raw = int(files.pwm.read_text(encoding="ascii").strip())
            except (OSError, ValueError):
                raw = -1
            if 0 <= raw <= PWM_MAX:
                fan.duty_percent = raw * 100.0 / PWM_MAX
            self._write(files.rpm, f"{max(0, round(fan.rpm))}\n")

    def _write(self, path: Path, text: str) -> None:
        if self._written.get(path) == text:
            return
        atomic_write_text(path, text)
        self._written[path] = text

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.step()
            except OSError as exc:
                if self._io_error != str(exc):
                    log.warning("sim_hwmon_io_error", error=str(exc))
                self._io_error = str(exc)
            else:
                self._io_error = None
