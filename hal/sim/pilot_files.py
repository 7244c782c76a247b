"""One connector's control pilot and HLC data as IIO / sysfs-PWM / JSON files.

:class:`PilotSimulator` plays the EV and the CP front end behind the files the
:class:`hal.pilot.iec61851.Iec61851Vehicle` driver uses::

    {root}/iio:device{id}/in_voltage0_raw     written here: CP high level as ADC counts
    {root}/iio:device{id}/in_voltage0_scale   written here once: mV per LSB
    {root}/pwmchip{id}/pwm0/period            written by the driver (ns)
    {root}/pwmchip{id}/pwm0/duty_cycle        written by the driver (ns)
    {root}/pwmchip{id}/pwm0/enable            written by the driver ("1")
    {root}/hlc-{id}.json                      written here: the HLC integration document

Each poll (``interval_s``): the PWM files become ``SimConnector.pwm_duty_percent``
(disabled or period 0 -> 0 %, i.e. the output idles low = state F); the state the
EV presents (``connector.pilot_state()``, forced to F while the duty is 0 even when
unplugged, since the EVSE drives -12 V itself) becomes a nominal CP level, turned
into ADC counts with the inverse of the driver's scaling::

    raw = round(((cp_volts - offset_v) / divider_ratio) * 1000 / adc_scale_mv)

clamped to the ADC range. ``force_state`` (A..F) and ``force_volts`` override the
EV for tests and fault demos (e.g. D, E or an out-of-window level).

The HLC document is rewritten atomically every ``hlc_interval_s`` while
``hlc_enabled`` (set it False to simulate a dead HLC stack). While plugged::

    soc                 round(vehicle.soc)
    target_voltage      vehicle.battery_voltage() + target_voltage_margin_v
    target_current      vehicle.current_request()
    discharge_allowed   v2g_capable and not refuse_discharge and soc > bms_min_soc
    discharge_refusal   "bms_refused" (refuse_discharge injection) or
                        "soc_below_minimum", only for a V2G-capable EV that refuses;
                        a real stack puts its ISO 15118-20 code string here
    max_discharge_current  vehicle.max_current while discharge is allowed
    vin                 vehicle.vin

Unplugged, every field is null (no session).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from hal.gpio.lines import atomic_write_text
from hal.sim.world import SimConnector
from hal.tasks import stop_task

log = structlog.get_logger(__name__)

NOMINAL_V = {"A": 12.0, "B": 9.0, "C": 6.0, "D": 3.0, "E": 0.0, "F": -12.0}

#: default front end: 12-bit ADC at 3.3 V full scale, CP -13.2..+13.2 V mapped onto 0..3.3 V
DEFAULT_ADC_SCALE_MV = 3300.0 / 4096.0
DEFAULT_DIVIDER_RATIO = 8.0
DEFAULT_OFFSET_V = -13.2


@dataclass(frozen=True, slots=True)
class PilotLayout:
    """Paths and scaling of one simulated connector, and the driver options that match."""

    adc_raw: Path
    adc_scale: Path
    pwm_dir: Path
    hlc_path: Path
    adc_scale_mv: float
    divider_ratio: float
    offset_v: float

    def driver_options(self, *, hlc: bool = True, **overrides: Any) -> dict[str, Any]:
        """Options for ``Iec61851Vehicle`` (``driver = "iec61851"``) reading these files."""
        options: dict[str, Any] = {
            "adc_raw_path": str(self.adc_raw),
            "adc_scale_path": str(self.adc_scale),
            "divider_ratio": self.divider_ratio,
            "offset_v": self.offset_v,
            "pwm_dir": str(self.pwm_dir),
        }
        if hlc:
            options.update(hlc="file", hlc_path=str(self.hlc_path))
        options.update(overrides)
        return options


def layout(
    root: str | Path,
    connector_id: int,
    *,
    adc_scale_mv: float = DEFAULT_ADC_SCALE_MV,
    divider_ratio: float = DEFAULT_DIVIDER_RATIO,
    offset_v: float = DEFAULT_OFFSET_V,
) -> PilotLayout:
    """The files :class:`PilotSimulator` uses for ``connector_id`` under ``root``."""
    base = Path(root)
    iio = base / f"iio:device{connector_id}"
    return PilotLayout(
        adc_raw=iio / "in_voltage0_raw",
        adc_scale=iio / "in_voltage0_scale",
        pwm_dir=base / f"pwmchip{connector_id}" / "pwm0",
        hlc_path=base / f"hlc-{connector_id}.json",
        adc_scale_mv=adc_scale_mv,
        divider_ratio=divider_ratio,
        offset_v=offset_v,
    )


class PilotSimulator:
    """EV + CP front end for one :class:`SimConnector`, through files."""

    def __init__(
        self,
        root: str | Path,
        connector: SimConnector,
        *,
        adc_scale_mv: float = DEFAULT_ADC_SCALE_MV,
        adc_bits: int = 12,
        divider_ratio: float = DEFAULT_DIVIDER_RATIO,
        offset_v: float = DEFAULT_OFFSET_V,
        interval_s: float = 0.01,
        hlc_interval_s: float = 0.25,
        target_voltage_margin_v: float = 10.0,
    ) -> None:
        self.connector = connector
        self.layout = layout(
            root,
            connector.connector_id,
            adc_scale_mv=adc_scale_mv,
            divider_ratio=divider_ratio,
            offset_v=offset_v,
        )
        self.adc_max = (1 << adc_bits) - 1
        self.interval_s = interval_s
        self.hlc_interval_s = hlc_interval_s
        self.target_voltage_margin_v = target_voltage_margin_v
        self.force_state: str | None = None
        self.force_volts: float | None = None
        self.hlc_enabled = True
        self._written_raw: int | None = None
        self._hlc_due = 0.0
        self._task: asyncio.Task[None] | None = None
        self._io_error: str | None = None

    async def start(self) -> None:
        """Create the IIO, PWM and HLC files, then start polling (idempotent)."""
        if self._task is not None:
            return
        lay = self.layout
        lay.adc_raw.parent.mkdir(parents=True, exist_ok=True)
        lay.pwm_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(lay.adc_scale, f"{lay.adc_scale_mv:.9f}\n")
        for name in ("period", "duty_cycle", "enable"):  # a freshly exported channel
            path = lay.pwm_dir / name
            if not path.exists():
                atomic_write_text(path, "0\n")
        self._written_raw = None
        self._hlc_due = 0.0
        loop = asyncio.get_running_loop()
        self.step(loop.time())
        self._task = loop.create_task(self._run(), name=f"sim-pilot-{self.connector.connector_id}")

    async def stop(self) -> None:
        """Stop updating; the files stay (idempotent)."""
        task, self._task = self._task, None
        await stop_task(task)

    # ------------------------------------------------------------------ one poll

    def step(self, now: float) -> None:
        """PWM files -> connector; presented state -> ADC file; HLC document when due."""
        duty = self.read_pwm_duty()
        if duty is not None:
            self.connector.pwm_duty_percent = duty
        raw = self.raw_for_volts(self.cp_volts())
        if raw != self._written_raw:
            atomic_write_text(self.layout.adc_raw, f"{raw}\n")
            self._written_raw = raw
        if self.hlc_enabled and now >= self._hlc_due:
            atomic_write_text(self.layout.hlc_path, json.dumps(self.hlc_document()) + "\n")
            self._hlc_due = now + self.hlc_interval_s

    def read_pwm_duty(self) -> float | None:
        """Duty in percent from the PWM files; None when they cannot be parsed right now."""
        try:
            values = {
                name: int((self.layout.pwm_dir / name).read_text(encoding="ascii").strip())
                for name in ("period", "duty_cycle", "enable")
            }
        except (OSError, ValueError):
            return None
        if values["enable"] != 1 or values["period"] <= 0:
            return 0.0
        return min(100.0, max(0.0, 100.0 * values["duty_cycle"] / values["period"]))

    def presented_state(self) -> str:
        """The IEC 61851 state on the CP line right now (A..F)."""
        if self.force_state is not None:
            return self.force_state
        if self.connector.pwm_duty_percent <= 0.0:
            return "F"
        return self.connector.pilot_state()

    def cp_volts(self) -> float:
        if self.force_volts is not None:
            return self.force_volts
        return NOMINAL_V[self.presented_state()]

    def raw_for_volts(self, volts: float) -> int:
        """ADC counts the driver turns back into ``volts`` (inverse of its scaling)."""
        lay = self.layout
        raw = round((volts - lay.offset_v) / lay.divider_ratio * 1000.0 / lay.adc_scale_mv)
        return min(self.adc_max, max(0, raw))

    def hlc_document(self) -> dict[str, Any]:
        """The HLC JSON document for the vehicle as it is now."""
        v = self.connector.vehicle
        if not v.plugged:
            return {
                "soc": None,
                "target_voltage": None,
                "target_current": None,
                "max_discharge_current": None,
                "discharge_allowed": None,
                "discharge_refusal": None,
                "vin": None,
            }
        allowed = v.v2g_capable and not v.refuse_discharge and v.soc > v.bms_min_soc
        refusal: str | None = None
        if v.v2g_capable and not allowed:
            refusal = "bms_refused" if v.refuse_discharge else "soc_below_minimum"
        return {
            "soc": round(v.soc),
            "target_voltage": round(v.battery_voltage() + self.target_voltage_margin_v, 1),
            "target_current": round(v.current_request(), 1),
            "max_discharge_current": v.max_current if allowed else None,
            "discharge_allowed": allowed,
            "discharge_refusal": refusal,
            "vin": v.vin,
        }

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.step(loop.time())
            except OSError as exc:
                if self._io_error != str(exc):
                    log.warning(
                        "sim_pilot_io_error", error=str(exc), connector=self.connector.connector_id
                    )
                self._io_error = str(exc)
            else:
                self._io_error = None
