"""Run the simulated charger behind a config: every device's *hardware side*.

:class:`SimulatedCharger` reads the same config the agent uses and plays the other
end of each configured device on the same transport the real driver uses:

* power modules: :class:`hal.sim.can_modules.CanModuleSimulator` on the configured
  python-can bus (``virtual`` in one process, ``vcan0`` across processes);
* meters and IMD: pymodbus servers on loopback TCP, or RTU over a pty pair;
* contactors, hwmon and the control pilot: files under the simulator root, laid
  out like the kernel's gpio-sim, hwmon, IIO and PWM sysfs attributes;
* physics: :func:`hal.sim.physics.step` every ``[sim] step_s`` of wall time.

Transport endpoints left to the simulator (``tcp_port = 0``, ``port = "sim"``) are
bound first and written back into the config, so drivers built afterwards find
them. A loopback HTTP control endpoint (``[sim] control_port``) accepts fault
injections: ``POST /inject`` and ``POST /clear`` with ``{"fault": ..., "connector": ...}``,
``GET /state`` for a snapshot.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from agent.charging.config import ConnectorConfig
from agent.config import AgentConfig, SimSection
from hal.sim import faults as sim_faults
from hal.sim import physics
from hal.sim.can_modules import CanModuleSimulator
from hal.sim.gpio_files import ContactorLineSimulator
from hal.sim.hwmon_files import HwmonSimulator
from hal.sim.modbus_devices import (
    BenderSimulator,
    DeviceSimulator,
    Djsf1352Simulator,
    ModbusSimServer,
    Sdm630Simulator,
)
from hal.sim.pilot_files import PilotSimulator
from hal.sim.pilot_files import layout as pilot_layout
from hal.sim.scenario import make_ac_connector, make_dc_connector, make_world, world_snapshot
from hal.sim.world import SimWorld
from hal.tasks import stop_task

log = structlog.get_logger(__name__)

PART_STOP_TIMEOUT_S = 10.0


class SimConfigError(ValueError):
    """The config cannot be simulated (a device whose endpoint the simulator cannot play)."""


def _module_addresses(conn: ConnectorConfig, sim: SimSection) -> list[int]:
    assert conn.power_modules is not None
    addresses = getattr(conn.power_modules.options, "addresses", None)
    return list(addresses) if addresses else list(range(sim.module_count))


def build_world(cfg: AgentConfig) -> SimWorld:
    """A SimWorld with one simulated connector (modules, meter, EV) per configured connector."""
    sim = cfg.sim or SimSection()
    connectors = []
    for conn in cfg.connectors:
        if conn.kind == "dc":
            opts = conn.power_modules.options if conn.power_modules is not None else None
            connectors.append(
                make_dc_connector(
                    conn.id,
                    _module_addresses(conn, sim),
                    group=getattr(opts, "group", conn.id),
                    module_max_current=sim.module.max_current,
                    module_rated_power_w=sim.module.rated_power_w,
                    module_max_voltage=sim.module.max_voltage,
                )
            )
        else:
            connectors.append(make_ac_connector(conn.id, phases=conn.phases))
    world = make_world(connectors)
    for v in sim.vehicles:
        ev = world.connector(v.connector).vehicle
        ev.plug_in_at = v.plug_in_after_s
        ev.soc = v.soc
        ev.target_soc = v.target_soc
        ev.capacity_kwh = v.capacity_kwh
        ev.nominal_voltage = v.nominal_voltage
        ev.max_current = v.max_current
        ev.ac_max_current = v.ac_max_current
        ev.v2g_capable = v.v2g_capable
        ev.vin = v.vin
    return world


class SimulatedCharger:
    """All simulators for one config, plus the physics loop. ``async with`` or start/stop."""

    def __init__(self, cfg: AgentConfig, root: Path, *, world: SimWorld | None = None) -> None:
        self.cfg = cfg
        self.root = root
        self.sim = cfg.sim or SimSection()
        self.world = world or build_world(cfg)
        self.control_port: int | None = None
        self._parts: list[Any] = []
        self._physics: asyncio.Task[None] | None = None
        self._control: web.AppRunner | None = None
        self.pilots: dict[int, PilotSimulator] = {}
        self.modbus_devices: dict[tuple[str, int], DeviceSimulator] = {}

    async def __aenter__(self) -> "SimulatedCharger":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ start/stop

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            await self._start_can()
            await self._start_modbus()
            await self._start_files()
        except BaseException:
            await self.stop()
            raise
        self._physics = asyncio.create_task(self._physics_loop(), name="sim-physics")
        if self.sim.control_port is not None:
            await self._start_control()
        log.info("simulator_started", root=str(self.root), connectors=sorted(self.world.connectors))

    async def stop(self) -> None:
        physics, self._physics = self._physics, None
        await stop_task(physics)
        if self._control is not None:
            await self._control.cleanup()
            self._control = None
        for part in reversed(self._parts):
            try:
                await asyncio.wait_for(part.stop(), PART_STOP_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.error("simulator_stop_timeout", part=type(part).__name__, timeout_s=PART_STOP_TIMEOUT_S)
            except Exception:
                log.exception("simulator_stop_error", part=type(part).__name__)
        self._parts.clear()

    async def _add(self, part: Any) -> None:
        await part.start()
        self._parts.append(part)

    async def _start_can(self) -> None:
        groups: dict[tuple[str, str], dict[int, Any]] = {}
        protocol_options: dict[tuple[str, str], dict[str, Any]] = {}
        for conn in self.cfg.connectors:
            if conn.power_modules is None:
                continue
            opts = conn.power_modules.options
            key = (opts.bus, conn.power_modules.driver)
            for module in self.world.connector(conn.id).modules:
                groups.setdefault(key, {})[module.address] = module
            if conn.power_modules.driver == "winline":
                # the simulated modules follow what the driver was told about them
                protocol_options.setdefault(key, {
                    "winline_ptp_group_bits": opts.ptp_group_bits,
                    "winline_current_limit_point": opts.current_limit_point,
                })
        for (bus, protocol), modules in groups.items():
            if protocol not in ("infypower", "winline"):
                raise SimConfigError(f"no simulator for power-module driver {protocol!r}")
            await self._add(
                CanModuleSimulator(
                    self.cfg.can[bus], modules, protocol, self.world,  # type: ignore[arg-type]
                    **protocol_options.get((bus, protocol), {}),
                )
            )

    async def _start_modbus(self) -> None:
        per_link: dict[str, list[DeviceSimulator]] = {}
        for conn in self.cfg.connectors:
            sc = self.world.connector(conn.id)
            opts = conn.meter.options
            device: DeviceSimulator
            if conn.meter.driver == "eastron_sdm630":
                device = Sdm630Simulator(sc, unit_id=opts.unit_id)
            elif conn.meter.driver == "acrel_djsf1352":
                device = Djsf1352Simulator(sc, unit_id=opts.unit_id, energy_unit_kwh=opts.energy_unit_kwh)
            else:
                raise SimConfigError(f"no simulator for meter driver {conn.meter.driver!r}")
            per_link.setdefault(opts.link, []).append(device)
            self.modbus_devices[("meter", conn.id)] = device
        for name, section in self.cfg.imd.items():
            users = [c.id for c in self.cfg.connectors if c.imd == name]
            if not users:
                continue
            opts = section.options
            bender = BenderSimulator(self.world.connector(users[0]), unit_id=opts.unit_id, world=self.world)
            per_link.setdefault(opts.link, []).append(bender)
            self.modbus_devices[("imd", users[0])] = bender
        for link_name, devices in per_link.items():
            link = self.cfg.modbus[link_name]
            if link.transport == "tcp":
                server = ModbusSimServer(devices, transport="tcp", tcp_port=link.tcp_port)
                await self._add(server)
                link.tcp_port = server.port
            else:
                server = ModbusSimServer(
                    devices,
                    transport="rtu",
                    baudrate=link.baudrate,
                    parity=link.parity,
                    stopbits=link.stopbits,
                    bytesize=link.bytesize,
                )
                await self._add(server)
                link.port = server.client_path

    async def _start_files(self) -> None:
        for conn in self.cfg.connectors:
            sc = self.world.connector(conn.id)
            c = conn.contactor.options
            if getattr(c, "backend", None) != "sim":
                raise SimConfigError(f"connector {conn.id}: contactor backend must be 'sim' to be simulated")
            await self._add(
                # physics steps every [sim] step_s; polling the coil much faster buys nothing
                ContactorLineSimulator(
                    c.root, c.chip, c.coil_line, c.mirror_line, c.mirror_active_low, sc.contactor, interval_s=0.01
                )
            )
            v = conn.vehicle.options
            expected = pilot_layout(Path(v.adc_raw_path).parent.parent, conn.id)
            if Path(v.adc_raw_path) != expected.adc_raw or Path(v.pwm_dir) != expected.pwm_dir:
                raise SimConfigError(
                    f"connector {conn.id}: vehicle paths must follow the simulator layout "
                    f"({expected.adc_raw}, {expected.pwm_dir})"
                )
            pilot = PilotSimulator(
                Path(v.adc_raw_path).parent.parent, sc, divider_ratio=v.divider_ratio, offset_v=v.offset_v
            )
            await self._add(pilot)
            self.pilots[conn.id] = pilot
        if self.cfg.thermal is not None:
            sensors = self.cfg.thermal.options.sensors
            root = Path(sensors[0].path).parent.parent if sensors else self.root / "hwmon"
            await self._add(HwmonSimulator(root, self.world))

    # ------------------------------------------------------------------ physics

    async def _physics_loop(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.sim.step_s)
            now = time.monotonic()
            dt = min(max(now - last, 1e-4), 1.0)
            last = now
            physics.step(self.world, dt)

    # ------------------------------------------------------------------ control

    def inject(self, fault: str, **target: Any) -> str:
        return sim_faults.inject(self.world, fault, **target)

    def clear(self, fault: str, **target: Any) -> str:
        return sim_faults.clear(self.world, fault, **target)

    def snapshot(self) -> dict[str, Any]:
        snap = world_snapshot(self.world)
        snap["active_faults"] = sim_faults.active_faults(self.world)
        return snap

    async def _start_control(self) -> None:
        app = web.Application()

        async def change(request: web.Request) -> web.Response:
            try:
                body = await request.json()
                if not isinstance(body, dict) or not isinstance(body.get("fault"), str):
                    raise ValueError("fault: expected a string naming a fault")
                fault = body.pop("fault")
                do = self.inject if request.path.endswith("inject") else self.clear
                return web.json_response({"ok": True, "message": do(fault, **body)})
            except (ValueError, TypeError) as exc:
                return web.json_response({"ok": False, "error": str(exc)}, status=400)

        async def state(_request: web.Request) -> web.Response:
            return web.json_response(self.snapshot())

        async def plug(request: web.Request) -> web.Response:
            cid = int(request.match_info["cid"])
            if cid not in self.world.connectors:
                return web.json_response({"ok": False, "error": f"connector: unknown id {cid}"}, status=400)
            self.world.connector(cid).vehicle.plugged = not request.path.endswith("unplug")  # "unplug" ends in "plug" too
            return web.json_response({"ok": True})

        async def v2g(request: web.Request) -> web.Response:
            cid = int(request.match_info["cid"])
            if cid not in self.world.connectors:
                return web.json_response({"ok": False, "error": f"connector: unknown id {cid}"}, status=404)
            conn = self.world.connector(cid)
            if request.method == "POST":
                body = await request.json()
                power = float(body.get("power_kw", 0.0)) if isinstance(body, dict) else 0.0
                if power > 0 and not conn.discharging:
                    conn.inverter_cycles += 1
                conn.discharging = power > 0
                conn.discharge_setpoint_kw = max(power, 0.0)
            exported = -physics.connector_power_kw(conn)
            return web.json_response(
                {
                    "active": conn.discharging and exported > 0.1,
                    "power_kw": round(max(exported, 0.0), 3),
                    "setpoint_kw": conn.discharge_setpoint_kw,
                    "synced": not conn.inverter_sync_lost,
                    "cycles": conn.inverter_cycles,
                    "thd_pct": conn.harmonic_distortion_pct,
                }
            )

        async def tap(request: web.Request) -> web.Response:
            from hal.auth.sim import record_tap

            cid = int(request.match_info["cid"])
            body = await request.json()
            tag = body.get("id_tag") if isinstance(body, dict) else None
            if cid not in self.world.connectors or not isinstance(tag, str) or not 0 < len(tag) <= 20:
                return web.json_response({"ok": False, "error": "id_tag: expected 1-20 characters on a known connector"}, status=400)
            record_tap(self.root, cid, tag)
            return web.json_response({"ok": True})

        app.router.add_post("/auth/{cid}/tap", tap)
        app.router.add_get("/v2g/{cid}", v2g)
        app.router.add_post("/v2g/{cid}", v2g)
        app.router.add_post("/inject", change)
        app.router.add_post("/clear", change)
        app.router.add_get("/state", state)
        app.router.add_post("/vehicle/{cid}/plug", plug)
        app.router.add_post("/vehicle/{cid}/unplug", plug)
        self._control = web.AppRunner(app, access_log=None)
        await self._control.setup()
        site = web.TCPSite(self._control, "127.0.0.1", self.sim.control_port or 0)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.control_port = sockets[0].getsockname()[1] if sockets else self.sim.control_port
        (self.root / "control.port").write_text(f"{self.control_port}\n")
