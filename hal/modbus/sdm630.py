"""Eastron SDM630 three-phase AC energy meter (Modbus RTU/TCP, input registers, FC 04).

Every measurement is an IEEE-754 float32 in two input registers, high word first.
One poll is three block reads on the meter's link (never more than 30 parameters
per request):

======== ===== ===========================================================
PDU      count content
======== ===== ===========================================================
0x0000   18    V L1/L2/L3 (V), I L1/L2/L3 (A), P L1/L2/L3 (W)
0x0034   2     total system active power (W, negative = export)
0x0046   6     frequency (Hz), total import (kWh), total export (kWh)
======== ===== ===========================================================

Contract (on top of :class:`hal.interfaces.EnergyMeter` and
:class:`hal.modbus.poller.PolledDevice`):

* A poll is published only if all three reads succeed (one consistent reading);
  any failed read fails the whole poll without issuing the remaining reads.
* Values that cannot come from a working meter (NaN/inf, negative voltage or
  energy, voltage above 1000 V, frequency outside 0..100 Hz) make the poll
  garbage: counted, discarded, never published.
* Power is converted W -> kW; ``voltage``/``current`` are the means over the three
  phases; ``phases`` carries the per-phase values.
* Frozen meter: see :class:`hal.modbus.poller.FreezeDetector`; while frozen the
  health is ``FAULT``/``meter_frozen`` and ``reading()`` is ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from hal.context import BuildContext
from hal.interfaces import Health, HealthState, MeterReading, PhaseReading, monotonic
from hal.modbus.link import decode_float32
from hal.modbus.poller import DeviceDataError, MeterOptions, PolledMeter

#: (PDU address, register count) of the input-register blocks read per poll.
INPUT_BLOCKS: tuple[tuple[int, int], ...] = ((0x0000, 18), (0x0034, 2), (0x0046, 6))
#: Registers in one poll (sum of :data:`INPUT_BLOCKS`).
POLL_REGISTERS = sum(count for _, count in INPUT_BLOCKS)


def decode_sdm630(registers: Sequence[int], taken_at: float) -> MeterReading:
    """Decode the concatenated :data:`INPUT_BLOCKS` of one poll into a :class:`MeterReading`.

    Raises :class:`DeviceDataError` for a wrong register count or impossible values.
    """
    if len(registers) != POLL_REGISTERS:
        raise DeviceDataError(f"expected {POLL_REGISTERS} registers, got {len(registers)}")
    values = decode_float32(registers)
    if not all(math.isfinite(v) for v in values):
        raise DeviceDataError("non-finite float in meter registers")
    volts = values[0:3]
    amps = values[3:6]
    watts = values[6:9]
    total_w, frequency, imp_kwh, exp_kwh = values[9:13]
    if any(not 0.0 <= v <= 1000.0 for v in volts):
        raise DeviceDataError(f"phase voltage out of range: {volts}")
    if any(abs(a) > 100_000.0 for a in amps):
        raise DeviceDataError(f"phase current out of range: {amps}")
    if not 0.0 <= frequency <= 100.0:
        raise DeviceDataError(f"frequency out of range: {frequency}")
    if imp_kwh < 0.0 or exp_kwh < 0.0:
        raise DeviceDataError(f"negative energy register: {imp_kwh}, {exp_kwh}")
    phases = (
        PhaseReading(volts[0], amps[0], watts[0] / 1000.0),
        PhaseReading(volts[1], amps[1], watts[1] / 1000.0),
        PhaseReading(volts[2], amps[2], watts[2] / 1000.0),
    )
    return MeterReading(
        voltage=sum(volts) / 3.0,
        current=sum(amps) / 3.0,
        power_kw=total_w / 1000.0,
        energy_import_kwh=imp_kwh,
        energy_export_kwh=exp_kwh,
        taken_at=taken_at,
        phases=phases,
        frequency_hz=frequency,
    )


class Sdm630Meter(PolledMeter):
    """:class:`hal.interfaces.EnergyMeter` for an Eastron SDM630 (see module docstring)."""

    driver = "eastron_sdm630"

    class Options(MeterOptions):
        """SDM630 options: link, unit_id (factory default 1), poll/stale timing, freeze rules."""

    def __init__(self, name: str, options: Options, ctx: BuildContext) -> None:
        super().__init__(name, options, ctx)
        self.options = options

    async def _poll(self) -> MeterReading:
        raw: list[int] = []
        for address, count in INPUT_BLOCKS:
            raw.extend(await self._link.read_input(address, count, self._unit_id))
        reading = decode_sdm630(raw, monotonic())
        frozen = self._freeze.update(
            reading.taken_at,
            tuple(raw),
            reading.power_kw,
            reading.energy_import_kwh,
            reading.energy_export_kwh,
        )
        self._set_device_health(
            Health(HealthState.FAULT, "meter_frozen", frozen) if frozen else None
        )
        return reading

    async def stop(self) -> None:
        await super().stop()
        self._freeze.reset()

    def reading(self) -> MeterReading | None:
        """Latest consistent reading; ``None`` when stale, frozen or not started."""
        return self._published_value()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["function_code"] = 4
        d["register_blocks"] = [f"{a:#06x}x{c}" for a, c in INPUT_BLOCKS]
        d["options"] = self.options.model_dump()
        return d
