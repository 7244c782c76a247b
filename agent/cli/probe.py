"""``charger-agent probe``: read every configured device once, through the real drivers.

What a technician runs on a bench to check wiring. Every device is started, given
up to ``--timeout`` seconds to deliver a healthy first reading, read, and stopped.
A device that fails is reported with its reason while the others are still read.
Exit status: 0 when every device answered healthy, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field, is_dataclass
from enum import Enum
from typing import Any, Callable

from agent.config import LoadedConfig
from agent.service.devices import build_devices, make_context
from hal.interfaces import HealthState


@dataclass
class ProbeResult:
    kind: str
    name: str
    connector: int | None
    ok: bool
    health: str
    reason: str | None = None
    readings: dict[str, Any] = field(default_factory=dict)


def _plain(value: Any) -> Any:
    """Dataclasses/enums/frozensets -> JSON-able values."""
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (frozenset, set)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return round(value, 3)
    return value


def _readings(kind: str, device: Any) -> dict[str, Any]:
    if kind == "power_modules":
        port = device.describe().get("port", {})
        bus = {k: _plain(port.get(k)) for k in ("bus", "interface", "channel", "options")}
        return {
            "bus": bus,
            "modules": [_plain(m) for m in device.modules()],
            "voltage": device.measured_voltage(),
            "current": device.measured_current(),
        }
    if kind == "meter":
        r = device.reading()
        return _plain(r) if r is not None else {}
    if kind == "contactor":
        return _plain(device.status())
    if kind == "imd":
        r = device.reading()
        return _plain(r) if r is not None else {}
    if kind == "vehicle":
        return _plain(device.status())
    if kind == "bidirectional":
        return _plain(device.status())
    if kind == "thermal":
        return {"temperatures": _plain(dict(device.temperatures())), "fans": _plain(dict(device.fans()))}
    return {}


def _drop_taken_at(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_taken_at(v) for k, v in d.items() if k not in ("taken_at", "last_seen")}
    if isinstance(d, list):
        return [_drop_taken_at(v) for v in d]
    return d


async def run_probe(
    loaded: LoadedConfig, *, timeout_s: float = 6.0, on_simulator: Callable[[Any], None] | None = None
) -> list[ProbeResult]:
    """Probe every device; never raises for a device problem (it becomes a failed result).

    ``on_simulator`` is called with the in-process simulator (if any) before the
    devices start -- tests use it to inject faults.
    """
    cfg = loaded.model
    async with AsyncExitStack() as stack:
        if cfg.sim is not None and cfg.sim.in_process:
            from agent.cli.sim import SimulatedCharger

            assert loaded.sim_root is not None
            sim = await stack.enter_async_context(SimulatedCharger(cfg, loaded.sim_root))
            if on_simulator is not None:
                on_simulator(sim)
        ctx = make_context(cfg)
        stack.push_async_callback(ctx.close)
        devices = build_devices(cfg, ctx)
        entries: list[tuple[str, int | None, Any]] = []
        for kind, group in (
            ("power_modules", devices.power_modules),
            ("meter", devices.meters),
            ("contactor", devices.contactors),
            ("vehicle", devices.vehicles),
            ("bidirectional", devices.bidirectional),
        ):
            entries.extend((kind, cid, dev) for cid, dev in group.items())
        seen: list[Any] = []
        for imd_connector, imd in devices.imd.items():
            if not any(imd is s for s in seen):
                seen.append(imd)
                entries.append(("imd", imd_connector, imd))
        if devices.thermal is not None:
            entries.append(("thermal", None, devices.thermal))

        start_errors: dict[int, str] = {}

        async def start(i: int, dev: Any) -> None:
            try:
                await asyncio.wait_for(dev.start(), timeout_s)
            except Exception as exc:  # reported per device, the others go on
                start_errors[i] = f"{type(exc).__name__}: {exc}"

        await asyncio.gather(*(start(i, dev) for i, (_k, _c, dev) in enumerate(entries)))
        for i, (_k, _c, dev) in enumerate(entries):
            if i not in start_errors:
                stack.push_async_callback(dev.stop)

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(i in start_errors or dev.health().ok for i, (_k, _c, dev) in enumerate(entries)):
                break
            await asyncio.sleep(0.2)

        results = []
        for i, (kind, cid, dev) in enumerate(entries):
            if i in start_errors:
                results.append(ProbeResult(kind, dev.name, cid, False, HealthState.OFFLINE.value, start_errors[i]))
                continue
            health = dev.health()
            reason = None if health.ok else f"{health.code or health.state.value}: {health.detail or 'no detail'}"
            results.append(
                ProbeResult(kind, dev.name, cid, health.ok, health.state.value, reason, _drop_taken_at(_readings(kind, dev)))
            )
        return results


def render_json(results: list[ProbeResult]) -> str:
    return json.dumps(
        {"ok": all(r.ok for r in results), "devices": [asdict(r) for r in results]}, indent=2, sort_keys=False
    )


def _fmt(value: Any, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def _summary(r: ProbeResult) -> list[str]:
    d = r.readings
    if r.kind == "power_modules":
        lines = []
        bus = d.get("bus") or {}
        if bus.get("interface"):
            opts = ", ".join(f"{k}={v!r}" for k, v in sorted((bus.get("options") or {}).items()))
            lines.append(
                f"CAN bus {bus.get('bus')}: interface {bus['interface']} channel {bus.get('channel')!r}"
                f"  options {{{opts}}}"
            )
        for m in d.get("modules", []):
            flags = ",".join(m.get("flags") or []) or "-"
            lines.append(
                f"module 0x{m['address']:02X}: {'online' if m['online'] else 'OFFLINE'}  "
                f"{_fmt(m.get('voltage'), ' V')}  {_fmt(m.get('current'), ' A')}  {_fmt(m.get('temperature'), ' °C')}  flags {flags}"
            )
        return lines
    if r.kind == "meter" and d:
        line = (
            f"{_fmt(d.get('voltage'), ' V')}  {_fmt(d.get('current'), ' A')}  {_fmt(d.get('power_kw'), ' kW', 2)}  "
            f"import {_fmt(d.get('energy_import_kwh'), ' kWh', 3)}  export {_fmt(d.get('energy_export_kwh'), ' kWh', 3)}"
        )
        lines = [line]
        if d.get("phases"):
            lines.append(
                "phases "
                + "  ".join(f"L{i + 1} {_fmt(p['voltage'], ' V')}/{_fmt(p['current'], ' A')}" for i, p in enumerate(d["phases"]))
            )
        return lines
    if r.kind == "contactor" and d:
        return [
            f"coil {'ON' if d['coil_energised'] else 'off'}  mirror says {'open' if d['mirror_says_open'] else 'CLOSED'}  "
            f"position {d['position']}  welded {d['welded']}  cycles {d['cycles']}"
        ]
    if r.kind == "imd" and d:
        return [f"insulation {_fmt(d.get('resistance_kohm'), ' kΩ', 0)}  alarm {d.get('alarm')}  U {_fmt(d.get('voltage'), ' V')}"]
    if r.kind == "vehicle" and d:
        return [
            f"pilot {d['pilot']}  plugged {d['plugged']}  ev_ready {d['ev_ready']}  pwm {_fmt(d['pwm_duty_percent'], ' %')}  "
            f"soc {_fmt(d.get('soc'), ' %')}"
        ]
    if r.kind == "bidirectional" and d:
        return [f"active {d['active']}  export {_fmt(d.get('power_kw'), ' kW', 2)}  grid synced {d['grid_synced']}  cycles {d['cycles']}"]
    if r.kind == "thermal" and d:
        temps = "  ".join(f"{k} {_fmt(v.get('celsius'), ' °C')}" for k, v in d.get("temperatures", {}).items())
        fans = "  ".join(
            f"fan {k} {_fmt(v.get('rpm'), ' rpm', 0)} @ {_fmt(v.get('duty_percent'), ' %', 0)}" for k, v in d.get("fans", {}).items()
        )
        return [temps, fans]
    return []


def render_table(results: list[ProbeResult]) -> str:
    out = []
    width = max(len(r.name) for r in results) if results else 10
    for r in results:
        status = "OK  " if r.ok else "FAIL"
        out.append(f"{status} {r.name:<{width}}  [{r.kind}]" + (f"  {r.reason}" if r.reason else ""))
        for line in _summary(r):
            out.append(" " * (6 + 0) + line)
    failed = sum(not r.ok for r in results)
    out.append("")
    out.append(f"{len(results) - failed} of {len(results)} devices answered healthy" + (f", {failed} failed" if failed else ""))
    return "\n".join(out)
