"""Acrel DJSF1352-RN DC energy meter (Modbus RTU, holding registers, FC 03).

One poll is a single read of holding registers 0x0000..0x0013 (20 registers):

====== ==========================================================================
PDU    content
====== ==========================================================================
0x0000 voltage raw (uint16); V = raw x 10^(dp - 3), dp = register 0x0001
0x0002 current raw (int16, signed); A = raw x 10^(dp - 3), dp = register 0x0003
0x0004 broken-wire detection: 0 ok, 1 broken
0x0005 internal temperature, x 0.1 degC (decoded as int16: sub-zero readings)
0x0008 power raw (int16); W = raw x 10^(dp - 3), dp = register 0x0009
0x000C total forward (import) energy, uint32 high word first
0x000E total reverse (export) energy, uint32 high word first
0x0013 alarm state bits (reported by ``describe()`` only)
====== ==========================================================================

Energy unit: sources disagree on the unit of the energy counters (EVerest treats
the raw count as Wh, another public driver as 0.0001 kWh). The ``energy_unit_kwh``
option (default 0.001 = Wh, as EVerest) converts counts to kWh. **Verify it against
the meter's own display before using the counter for sessions.**

Contract (on top of :class:`hal.interfaces.EnergyMeter` and
:class:`hal.modbus.poller.PolledDevice`):

* Decimal-point codes outside 0..6, a broken-wire register other than 0/1, or
  impossible values (voltage above 2000 V, |current| above 5000 A, temperature
  outside -50..150 degC) make the poll garbage: counted, discarded.
* Broken-wire flag set -> ``FAULT``/``meter_broken_wire``, ``reading()`` ``None``
  (the meter's own measurements are not trustworthy). It has precedence over
  ``meter_frozen`` (:class:`hal.modbus.poller.FreezeDetector`).
* ``phases`` and ``frequency_hz`` are ``None``; ``temperature`` is the meter's
  internal temperature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from hal.context import BuildContext
from hal.interfaces import Health, HealthState, MeterReading, monotonic
from hal.modbus.link import decode_int16, decode_uint32
from hal.modbus.poller import DeviceDataError, MeterOptions, PolledMeter

#: The single holding-register block read per poll.
MAIN_BLOCK: tuple[int, int] = (0x0000, 20)


def scale_decimal(raw: int, dp_code: int) -> float:
    """``raw x 10^(dp_code - 3)``, rounded to the resolution the code implies.

    Raises :class:`DeviceDataError` for a code outside 0..6.
    """
    if not 0 <= dp_code <= 6:
        raise DeviceDataError(f"decimal-point code {dp_code} outside 0..6")
    exponent = dp_code - 3
    if exponent >= 0:
        return float(raw * 10**exponent)
    return round(raw / 10 ** (-exponent), -exponent)


@dataclass(frozen=True, slots=True)
class DjsfDecoded:
    """One decoded main block: the reading plus the flags that are not in it."""

    reading: MeterReading
    broken_wire: bool
    alarm_bits: int
    energy_raw: tuple[int, int]


def decode_djsf1352(
    registers: Sequence[int], taken_at: float, energy_unit_kwh: float = 0.001
) -> DjsfDecoded:
    """Decode the 20-register main block. Raises :class:`DeviceDataError` on garbage."""
    if len(registers) != MAIN_BLOCK[1]:
        raise DeviceDataError(f"expected {MAIN_BLOCK[1]} registers, got {len(registers)}")
    voltage = scale_decimal(registers[0x00], registers[0x01])
    current = scale_decimal(decode_int16([registers[0x02]])[0], registers[0x03])
    wire = registers[0x04]
    if wire not in (0, 1):
        raise DeviceDataError(f"broken-wire register {wire} is neither 0 nor 1")
    temperature = decode_int16([registers[0x05]])[0] / 10.0
    power_w = scale_decimal(decode_int16([registers[0x08]])[0], registers[0x09])
    imp_raw, exp_raw = decode_uint32(registers[0x0C:0x10])
    if voltage > 2000.0:
        raise DeviceDataError(f"voltage out of range: {voltage}")
    if abs(current) > 5000.0:
        raise DeviceDataError(f"current out of range: {current}")
    if not -50.0 <= temperature <= 150.0:
        raise DeviceDataError(f"temperature out of range: {temperature}")
    reading = MeterReading(
        voltage=voltage,
        current=current,
        power_kw=power_w / 1000.0,
        energy_import_kwh=imp_raw * energy_unit_kwh,
        energy_export_kwh=exp_raw * energy_unit_kwh,
        taken_at=taken_at,
        temperature=temperature,
    )
    return DjsfDecoded(reading, wire == 1, registers[0x13], (imp_raw, exp_raw))


class Djsf1352Meter(PolledMeter):
    """:class:`hal.interfaces.EnergyMeter` for an Acrel DJSF1352-RN (see module docstring)."""

    driver = "acrel_djsf1352"

    class Options(MeterOptions):
        """DJSF1352 options: as every meter, plus the energy-counter unit."""

        energy_unit_kwh: float = Field(
            0.001,
            gt=0.0,
            le=1.0,
            description=(
                "kWh per count of the energy registers (0.001 = Wh as EVerest reads it; "
                "sources disagree - verify against the meter display)"
            ),
        )

    def __init__(self, name: str, options: Options, ctx: BuildContext) -> None:
        super().__init__(name, options, ctx)
        self.options = options
        self._alarm_bits: int | None = None

    async def _poll(self) -> MeterReading:
        address, count = MAIN_BLOCK
        raw = await self._link.read_holding(address, count, self._unit_id)
        decoded = decode_djsf1352(raw, monotonic(), self.options.energy_unit_kwh)
        reading = decoded.reading
        self._alarm_bits = decoded.alarm_bits
        frozen = self._freeze.update(
            reading.taken_at,
            tuple(raw),
            reading.power_kw,
            reading.energy_import_kwh,
            reading.energy_export_kwh,
        )
        if decoded.broken_wire:
            health: Health | None = Health(
                HealthState.FAULT, "meter_broken_wire", "meter reports a broken measuring wire"
            )
        elif frozen:
            health = Health(HealthState.FAULT, "meter_frozen", frozen)
        else:
            health = None
        self._set_device_health(health)
        return reading

    async def stop(self) -> None:
        await super().stop()
        self._freeze.reset()

    def reading(self) -> MeterReading | None:
        """Latest reading; ``None`` when stale, frozen, broken wire or not started."""
        return self._published_value()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["function_code"] = 3
        d["register_blocks"] = [f"{MAIN_BLOCK[0]:#06x}x{MAIN_BLOCK[1]}"]
        d["alarm_bits"] = self._alarm_bits
        d["energy_unit_note"] = "energy_unit_kwh must be verified against the meter display"
        d["options"] = self.options.model_dump()
        return d
