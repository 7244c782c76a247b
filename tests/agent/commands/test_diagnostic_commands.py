"""The diagnostic commands (platform-api §14.2) through the real dispatcher: risk gating and params.

Real parts: a :class:`~agent.store.Store` in ``tmp_path`` (ledger, audit log, outbox), the
:class:`~agent.channels.tellus.reporter.Reporter`, the :class:`~agent.commands.dispatcher.Dispatcher` with
:func:`~agent.commands.diagnostics.diagnostic_specs`, :class:`~agent.charging.connector.Connector`
state machines (1 DC with two power modules, 2 AC) on the in-memory HAL fakes, and the
agent's own ``calibrate`` / ``reset_fan_counter`` / ``any_session`` / ``stop_sessions``
(from :class:`agent.service.diagnostics.DiagnosticServices`) over a real :class:`~agent.maintenance.calibration.Calibration` and
:class:`~agent.maintenance.counters.FanRuntime`. Only the heavy services (reboot, soft reset, reconnect,
log upload, self test) are stand-ins that record their calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from agent.maintenance.calibration import Calibration
from agent.commands import diagnostics
from agent.commands.diagnostics import diagnostic_specs
from agent.commands.dispatcher import Dispatcher
from agent.charging.config import ChargingSection, ConnectorConfig, DeviceSection
from agent.charging.connector import Connector, ConnectorHardware, ConnectorState
from agent.maintenance.counters import FanRuntime
from agent.maintenance.logbundle import FetchLogsParams
from agent.charging.faults import FaultBoard
from agent.channels.tellus.reporter import Reporter
from agent.service.diagnostics import DiagnosticServices
from agent.charging.session import SessionRequest
from agent.store import Store
from hal.interfaces import OK, FanStatus, Health, ModuleRatings, ModuleStatus, TemperatureReading
from tests.agent.fakes import FakeContactor, FakeImd, FakeMeter, FakeModules, FakeVehicle
from tests.agent.helpers import decision_audit, until

NINE = (
    "reboot", "soft_reset", "force_reconnect", "fetch_logs", "run_self_test", "calibrate_sensor",
    "reset_contactor_counter", "reset_fan_counter", "reset_power_module",
)
LOW = ("reboot", "soft_reset", "force_reconnect", "fetch_logs", "reset_contactor_counter", "reset_fan_counter")
MEDIUM = ("run_self_test", "calibrate_sensor")
UPLOAD = "https://bucket.example.com/bundles/b.tar.gz?X-Amz-Signature=abc123"
#: params each command accepts (service mode on, no session)
VALID: dict[str, dict[str, Any]] = {
    "reboot": {},
    "soft_reset": {},
    "force_reconnect": {},
    "fetch_logs": {"upload_url": UPLOAD},
    "run_self_test": {},
    "calibrate_sensor": {"sensor": "control_board", "reference_value": 36.0},
    "reset_contactor_counter": {},
    "reset_fan_counter": {},
    "reset_power_module": {"module": 0},
}


# ---------------------------------------------------------------------------- fakes


@dataclass
class RatedModules(FakeModules):
    """Fake modules that state their ratings (``max_current`` A each)."""

    max_current: float = 40.0

    def modules(self) -> list[ModuleStatus]:
        ratings = ModuleRatings(750.0, 150.0, self.max_current, self.max_current * 750.0)
        return [ModuleStatus(address=a, online=a not in self.offline, ratings=ratings) for a in range(self.count)]


@dataclass
class FakeThermal:
    name: str = "thermal"
    temps: dict[str, float] = field(default_factory=lambda: {"power_module": 30.0, "control_board": 35.0})

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def temperatures(self) -> Mapping[str, TemperatureReading]:
        return {n: TemperatureReading(n, c) for n, c in self.temps.items()}

    def fans(self) -> Mapping[str, FanStatus]:
        return {"cabinet": FanStatus("cabinet", 900.0, 50.0, 1800.0)}

    async def set_fan_duty(self, fan: str, percent: float) -> None: ...
    def health(self) -> Health:
        return OK


class ServiceSwitch:
    def __init__(self) -> None:
        self.on = False

    def is_on(self) -> bool:
        return self.on


class Services:
    """:class:`~agent.commands.diagnostics.AgentServices` for the tests.

    ``any_session``, ``stop_sessions``, ``service_mode_on``, ``calibrate`` and
    ``reset_fan_counter`` are the agent's own (:class:`DiagnosticServices`); the rest
    record their calls.
    """

    any_session = DiagnosticServices.any_session
    stop_sessions = DiagnosticServices.stop_sessions
    service_mode_on = DiagnosticServices.service_mode_on
    calibrate = DiagnosticServices.calibrate
    reset_fan_counter = DiagnosticServices.reset_fan_counter

    def __init__(self, connectors: dict[int, Connector], calibration: Calibration, fan_runtime: FanRuntime) -> None:
        self.connectors = connectors
        self.hardware = SimpleNamespace(calibration=calibration, fan_runtime=fan_runtime)
        self.service_mode = ServiceSwitch()
        self.calls: list[tuple[Any, ...]] = []
        self.sessions_at_reboot: bool | None = None
        self.rebooted = asyncio.Event()

    async def schedule_reboot(self, command_id: str) -> None:
        self.sessions_at_reboot = self.any_session()  # type: ignore[misc]
        self.calls.append(("schedule_reboot", command_id))
        self.rebooted.set()

    async def soft_reset(self) -> dict[str, Any]:
        self.calls.append(("soft_reset",))
        return {"connectors": sorted(self.connectors)}

    async def force_reconnect(self) -> bool:
        self.calls.append(("force_reconnect",))
        return True

    async def fetch_logs(self, params: FetchLogsParams, progress: Callable[[int], None]) -> dict[str, Any]:
        self.calls.append(("fetch_logs", params.upload_url))
        progress(100)
        return {"size": 10, "sha256": "0" * 64}

    async def run_self_test(self, progress: Callable[[str], None]) -> dict[str, Any]:
        self.calls.append(("run_self_test",))
        return {"passed": True, "checks": []}


class RecordingReporter(Reporter):
    def __init__(self, store: Store, connector_ids: list[int]) -> None:
        super().__init__(store, connector_ids)
        self.reported: list[tuple[str, str, str | None, dict[str, Any] | None]] = []

    def command_status(
        self, command_id: str, status: str, message: str | None = None, details: dict[str, Any] | None = None
    ) -> None:
        self.reported.append((command_id, status, message, details))
        super().command_status(command_id, status, message, details)


def _dev() -> DeviceSection:
    return DeviceSection(driver="fake")


class Charger:
    """Connectors 1 (DC, modules 0 and 1) and 2 (AC) on fakes, wired to the diagnostic handlers."""

    def __init__(self, store: Store, *, module_rating_a: float | None = None) -> None:
        self.store = store
        self.faults = FaultBoard()
        self.reporter = RecordingReporter(store, [1, 2])
        self.vehicles: dict[int, FakeVehicle] = {}
        self.connectors: dict[int, Connector] = {}
        policy = ChargingSection(
            tick_s=0.02, isolation_grace_s=0.0, isolation_readings=2, current_ramp_a_per_s=1000.0,
            meter_loss_grace_s=0.5, ev_ready_timeout_s=2.0,
        )
        for cid in (1, 2):
            dc = cid == 1
            contactor = FakeContactor(cycles=40 + cid)
            modules: FakeModules | None = None
            if dc:
                modules = (
                    RatedModules(contactor=contactor, max_current=module_rating_a)
                    if module_rating_a is not None
                    else FakeModules(contactor=contactor)
                )
            vehicle = FakeVehicle()
            self.vehicles[cid] = vehicle
            cfg = ConnectorConfig(
                id=cid, kind="dc" if dc else "ac", max_power_kw=60 if dc else 22, max_current_a=150 if dc else 32,
                power_modules=_dev() if dc else None, meter=_dev(), contactor=_dev(), vehicle=_dev(),
            )
            hw = ConnectorHardware(
                meter=FakeMeter(modules=modules), contactor=contactor, vehicle=vehicle, modules=modules,
                imd=FakeImd() if dc else None,
            )
            self.connectors[cid] = Connector(cfg, hw, policy, self.faults, self.reporter)
        thermal = FakeThermal()
        self.services = Services(
            self.connectors,
            Calibration(store.kv, thermal=thermal, modules={1: self.connectors[1].hw.modules}),  # type: ignore[dict-item]
            FanRuntime(store.kv, thermal),
        )
        self.dispatcher = Dispatcher(store.ledger, self.reporter, self.connectors, diagnostic_specs(self.services))
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.reporter.start()
        self._tasks = [asyncio.create_task(c.run()) for c in self.connectors.values()]
        await asyncio.sleep(0.05)

    async def stop(self) -> None:
        for task in list(diagnostics._BACKGROUND):
            task.cancel()
        await asyncio.gather(*diagnostics._BACKGROUND, return_exceptions=True)
        for c in self.connectors.values():
            await c.shutdown()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 10)
        await self.reporter.stop()

    # ------------------------------------------------------------------ helpers

    async def deliver(self, command_id: str, command: str, params: dict[str, Any], channel: str = "long_poll:1") -> None:
        connector = int(channel.rpartition(":")[2]) if channel.startswith("long_poll:") else None
        await self.dispatcher.deliver(
            {"command_id": command_id, "command": command, "params": params}, channel, connector
        )
        await asyncio.sleep(0)  # let a handler's background work start
        await self.reporter.drain()

    def reported(self, command_id: str) -> list[tuple[str, str | None, dict[str, Any] | None]]:
        return [(s, m, d) for c, s, m, d in self.reporter.reported if c == command_id]

    def statuses(self, command_id: str) -> list[str]:
        return [s for s, _, _ in self.reported(command_id)]

    async def ended(self, command_id: str) -> list[str]:
        await until(lambda: any(s in ("completed", "failed", "rejected") for s in self.statuses(command_id)))
        await self.reporter.drain()
        return self.statuses(command_id)

    async def rejected_with(self, command_id: str, command: str, params: dict[str, Any]) -> str:
        """Deliver; assert it was rejected once, audited as such and not executed; return the message."""
        calls = list(self.services.calls)
        await self.deliver(command_id, command, params)
        reports = self.reported(command_id)
        assert [s for s, _, _ in reports] == ["rejected"], reports
        message = reports[0][1]
        assert message
        audit = [a for a in await decision_audit(self.store.ledger) if a.command_id == command_id]
        assert [(a.command, a.outcome, a.message) for a in audit] == [(command, "rejected", message)]
        assert self.services.calls == calls, "a rejected command must not run"
        return message

    async def accepted(self, command_id: str, command: str, params: dict[str, Any]) -> list[str]:
        """Deliver; assert it was accepted (audited so) and return its statuses once it ended."""
        await self.deliver(command_id, command, params)
        statuses = await self.ended(command_id) if command != "reboot" else self.statuses(command_id)
        assert statuses[0] == "accepted", self.reported(command_id)
        audit = [a for a in await decision_audit(self.store.ledger) if a.command_id == command_id]
        assert [(a.command, a.outcome) for a in audit] == [(command, "accepted")]
        return statuses

    async def charge(self, cid: int) -> None:
        self.vehicles[cid].plug()
        await until(lambda: self.connectors[cid].state is ConnectorState.VEHICLE_CONNECTED)
        self.connectors[cid].request_start(SessionRequest(transaction_id=f"tx-{cid}"))
        await until(lambda: self.connectors[cid].state is ConnectorState.CHARGING)


@pytest.fixture
async def charger(store: Store) -> AsyncIterator[Charger]:
    c = Charger(store)
    await c.start()
    yield c
    await c.stop()


def test_the_nine_commands_and_their_risk_classes(store: Store) -> None:
    specs = Charger(store).dispatcher.specs
    assert sorted(specs) == sorted(NINE)
    assert {n for n, s in specs.items() if s.risk == "medium"} == {*MEDIUM, "reset_power_module"}
    assert {n for n, s in specs.items() if s.own_session_check} == {"reset_power_module"}
    assert all(s.scope == "device" for s in specs.values())


# ---------------------------------------------------------------------------- risk gating


@pytest.mark.parametrize("command", MEDIUM)
async def test_medium_risk_is_refused_during_a_session_naming_the_connector(charger: Charger, command: str) -> None:
    charger.services.service_mode.on = True
    await charger.charge(2)
    message = await charger.rejected_with("c1", command, VALID[command])
    assert message == f"{command} is a medium-risk command: refused during an active session (connector 2)"


@pytest.mark.parametrize("command", MEDIUM)
async def test_medium_risk_runs_when_no_session_runs(charger: Charger, command: str) -> None:
    charger.services.service_mode.on = True
    charger.vehicles[1].plug()  # a vehicle plugged in without a session is no session
    await until(lambda: charger.connectors[1].state is ConnectorState.VEHICLE_CONNECTED)
    assert await charger.accepted("c1", command, VALID[command]) == ["accepted", "completed"]


async def test_medium_risk_is_refused_while_a_session_is_only_being_prepared(charger: Charger) -> None:
    charger.vehicles[1].plug()
    await until(lambda: charger.connectors[1].state is ConnectorState.VEHICLE_CONNECTED)
    charger.vehicles[1].wants_energy = False  # the vehicle never gets ready: preparation waits
    charger.connectors[1].request_start(SessionRequest())
    await until(lambda: charger.connectors[1].state is ConnectorState.PREPARING)
    message = await charger.rejected_with("c1", "run_self_test", {})
    assert message.endswith("refused during an active session (connector 1)")


@pytest.mark.parametrize("command", LOW)
async def test_low_risk_is_accepted_during_a_session(charger: Charger, command: str) -> None:
    await charger.charge(1)
    await charger.deliver("c1", command, VALID[command])
    assert charger.statuses("c1")[0] == "accepted", charger.reported("c1")
    audit = [a for a in await decision_audit(charger.store.ledger) if a.command_id == "c1"]
    assert [a.outcome for a in audit] == ["accepted"]
    if command != "reboot":
        assert (await charger.ended("c1"))[-1] == "completed"


async def test_reboot_during_a_session_waits_for_it_to_end(charger: Charger) -> None:
    await charger.charge(2)
    await charger.deliver("c1", "reboot", {})
    assert charger.reported("c1") == [("accepted", "reboot deferred until the running sessions end", {"deferred": True})]
    await asyncio.sleep(1.5)
    assert charger.services.calls == [] and charger.connectors[2].state is ConnectorState.CHARGING
    charger.connectors[2].request_stop("remote_stop")
    await asyncio.wait_for(charger.services.rebooted.wait(), 5)
    assert charger.services.calls == [("schedule_reboot", "c1")]
    assert charger.services.sessions_at_reboot is False
    assert charger.statuses("c1") == ["accepted"]  # completed is reported by the restarted agent


async def test_forced_reboot_stops_the_session_cleanly_first(charger: Charger) -> None:
    await charger.charge(1)
    await charger.deliver("c1", "reboot", {"force": True})
    assert charger.reported("c1") == [("accepted", "rebooting", {"forced": True})]
    await asyncio.wait_for(charger.services.rebooted.wait(), 5)
    assert charger.services.sessions_at_reboot is False
    assert charger.connectors[1].session is None and charger.connectors[1].state is ConnectorState.VEHICLE_CONNECTED


async def test_reboot_when_idle_is_immediate(charger: Charger) -> None:
    await charger.deliver("c1", "reboot", {"force": "false"})  # a boolean as text is understood
    assert charger.reported("c1") == [("accepted", "rebooting", {"forced": False})]
    await asyncio.wait_for(charger.services.rebooted.wait(), 2)


# ---------------------------------------------------------------------------- reset_power_module


async def test_reset_power_module_unknown_module_is_rejected_naming_params_module(charger: Charger) -> None:
    message = await charger.rejected_with("c1", "reset_power_module", {"module": 9})
    assert message == "params.module: no power module with address 9 on this charger"
    # connector 2 has no power modules at all
    message = await charger.rejected_with("c2", "reset_power_module", {"module": 0, "connector_id": 2})
    assert message == "params.module: no power module with address 0 on this charger"


async def test_reset_power_module_when_idle_completes(charger: Charger) -> None:
    assert await charger.accepted("c1", "reset_power_module", {"module": 1}) == ["accepted", "completed"]
    assert charger.reported("c1")[-1] == ("completed", "module 1 reset", {"connector_id": 1, "module": 1})


async def test_reset_power_module_during_a_session_elsewhere_is_not_gated(charger: Charger) -> None:
    await charger.charge(2)  # the medium-risk gate would refuse; the module's own rule does not
    assert await charger.accepted("c1", "reset_power_module", {"module": 0}) == ["accepted", "completed"]


async def test_reset_power_module_refused_when_the_others_cannot_carry_the_session(store: Store) -> None:
    charger = Charger(store, module_rating_a=40.0)
    await charger.start()
    try:
        await charger.charge(1)
        modules = charger.connectors[1].hw.modules
        assert modules is not None
        await until(lambda: (modules.measured_current() or 0) > 50)
        flowing = modules.measured_current() or 0
        message = await charger.rejected_with("c1", "reset_power_module", {"module": 1})
        assert message == (
            f"module 1 carries the session on connector 1: the other modules can take 40 A of the {flowing:.0f} A flowing"
        )
    finally:
        await charger.stop()


async def test_reset_power_module_accepted_when_the_others_can_carry_the_session(store: Store) -> None:
    charger = Charger(store, module_rating_a=120.0)
    await charger.start()
    try:
        await charger.charge(1)
        modules = charger.connectors[1].hw.modules
        assert modules is not None
        await until(lambda: (modules.measured_current() or 0) > 50)
        assert await charger.accepted("c1", "reset_power_module", {"module": 1}) == ["accepted", "completed"]
    finally:
        await charger.stop()


# ---------------------------------------------------------------------------- params


@pytest.mark.parametrize("command", NINE)
async def test_unknown_params_keys_are_ignored(charger: Charger, command: str) -> None:
    charger.services.service_mode.on = True
    params = {**VALID[command], "unexpected": 1, "nested": {"deep": [1, 2]}, "upload_url_2": "ftp://x"}
    statuses = await charger.accepted("c1", command, params)
    if command != "reboot":
        assert statuses[-1] == "completed", charger.reported("c1")


@pytest.mark.parametrize(
    ("command", "params", "expected"),
    [
        ("reboot", {"force": "maybe"}, "params.force: "),
        ("reboot", {"force": [True]}, "params.force: "),
        ("soft_reset", {"connector_id": "one"}, "params.connector_id: "),
        ("soft_reset", {"connector_id": 0}, "params.connector_id: "),
        ("force_reconnect", {"connector_id": 1.5}, "params.connector_id: "),
        ("force_reconnect", {"connector_id": 9}, "params.connector_id: unknown connector 9"),
        ("fetch_logs", {}, "params.upload_url: required"),
        ("fetch_logs", {"upload_url": 42}, "params.upload_url: "),
        ("fetch_logs", {"upload_url": ""}, "params.upload_url: "),
        ("fetch_logs", {"upload_url": "ftp://files.example.com/b.tgz"}, "params.upload_url: "),
        ("fetch_logs", {"upload_url": "https:///no-host"}, "params.upload_url: "),
        ("fetch_logs", {"upload_url": UPLOAD, "since": "yesterday"}, "params.since: "),
        ("fetch_logs", {"upload_url": UPLOAD, "since": "2025-03-15T10:00:00"}, "params.since: "),
        ("fetch_logs", {"upload_url": UPLOAD, "until": "2025-03-15T10:00:00"}, "params.until: "),
        (
            "fetch_logs",
            {"upload_url": UPLOAD, "since": "2025-03-15T10:00:00Z", "until": "2025-03-15T09:00:00Z"},
            "params.until: must be after since",
        ),
        ("run_self_test", {"connector_id": "x"}, "params.connector_id: "),
        ("calibrate_sensor", {}, "params.sensor: required"),
        ("calibrate_sensor", {"sensor": "control_board"}, "params.reference_value: required"),
        ("calibrate_sensor", {"sensor": "", "reference_value": 20}, "params.sensor: "),
        ("calibrate_sensor", {"sensor": "x" * 65, "reference_value": 20}, "params.sensor: "),
        ("calibrate_sensor", {"sensor": 7, "reference_value": 20}, "params.sensor: "),
        ("calibrate_sensor", {"sensor": "control_board", "reference_value": "hot"}, "params.reference_value: "),
        ("calibrate_sensor", {"sensor": "control_board", "reference_value": 5000}, "params.reference_value: "),
        ("calibrate_sensor", {"sensor": "control_board", "reference_value": -1001}, "params.reference_value: "),
        ("reset_contactor_counter", {"connector_id": 9}, "params.connector_id: unknown connector 9"),
        ("reset_contactor_counter", {"connector_id": "all"}, "params.connector_id: "),
        ("reset_fan_counter", {"fan": [1]}, "params.fan"),
        ("reset_fan_counter", {"fan": {"name": "cabinet"}}, "params.fan"),
        ("reset_power_module", {}, "params.module: required"),
        ("reset_power_module", {"module": -1}, "params.module: "),
        ("reset_power_module", {"module": 255}, "params.module: "),
        ("reset_power_module", {"module": "zero"}, "params.module: "),
        ("reset_power_module", {"module": 1.5}, "params.module: "),
        ("reset_power_module", {"module": None}, "params.module: "),
    ],
)
async def test_bad_params_are_rejected_naming_the_field(
    charger: Charger, command: str, params: dict[str, Any], expected: str
) -> None:
    charger.services.service_mode.on = True
    message = await charger.rejected_with("c1", command, params)
    assert message.startswith(expected), message


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"fan": "rear"}, "params.fan: unknown fan 'rear'; known fans: cabinet"),
        ({"fan": 2}, "params.fan: fan index 2 out of range 1..1 (cabinet)"),
        ({"fan": 0}, "params.fan: fan index 0 out of range 1..1 (cabinet)"),
    ],
)
async def test_reset_fan_counter_unknown_fan_is_rejected_naming_params_fan(
    charger: Charger, params: dict[str, Any], expected: str
) -> None:
    await charger.deliver("c1", "reset_fan_counter", params)
    assert [(s, m) for s, m, _ in charger.reported("c1")] == [("rejected", expected)]


@pytest.mark.parametrize("fan", [None, "cabinet", 1])
async def test_reset_fan_counter_by_name_index_or_the_only_fan(charger: Charger, fan: Any) -> None:
    params = {} if fan is None else {"fan": fan}
    assert await charger.accepted("c1", "reset_fan_counter", params) == ["accepted", "completed"]
    assert charger.reported("c1")[-1][2] == {"fan": "cabinet", "previous_hours": 0.0}


async def test_reset_contactor_counter_one_or_every_connector(charger: Charger) -> None:
    assert await charger.accepted("c1", "reset_contactor_counter", {"connector_id": 2}) == ["accepted", "completed"]
    assert charger.reported("c1")[-1][2] == {"previous_cycles": {"2": 42}}
    assert await charger.accepted("c2", "reset_contactor_counter", {}) == ["accepted", "completed"]
    assert charger.reported("c2")[-1][2] == {"previous_cycles": {"1": 41, "2": 0}}
    assert all(c.hw.contactor.status().cycles == 0 for c in charger.connectors.values())


@pytest.mark.parametrize(
    "url",
    [
        "http://uploads.example.com/bundles/b.tar.gz?X-Amz-Signature=s3cr3t-sig&X-Amz-Credential=AKIA-s3cr3t",
        "http://10.0.0.5:8080/put?token=s3cr3t-sig",
        "http://user:s3cr3t-sig@uploads.example.com/b.tgz",
    ],
)
async def test_fetch_logs_plain_http_off_loopback_is_rejected_without_echoing_the_url(charger: Charger, url: str) -> None:
    message = await charger.rejected_with("c1", "fetch_logs", {"upload_url": url})
    assert message.startswith("params.upload_url: "), message
    assert "https://" in message and "loopback" in message
    assert url not in message
    assert "s3cr3t" not in message and "?" not in message and "@" not in message
    entry = await charger.store.ledger.seen("c1")
    assert entry is not None and entry.message == message
    outbox = await charger.store.outbox.next_batch(100, ["command_status"])
    assert all("s3cr3t" not in str(item.payload) for item in outbox)


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8080/b.tgz", "http://localhost/b.tgz", "http://[::1]:9000/b", UPLOAD],
)
async def test_fetch_logs_accepts_https_and_loopback_http(charger: Charger, url: str) -> None:
    assert await charger.accepted("c1", "fetch_logs", {"upload_url": url}) == ["accepted", "accepted", "completed"]
    assert charger.services.calls == [("fetch_logs", url)]
    # the upload progress is re-reported as ``accepted`` with details.progress
    assert charger.reported("c1")[1] == ("accepted", "uploading", {"progress": 100})


async def test_progress_re_reports_reach_the_outbox(charger: Charger) -> None:
    await charger.accepted("c1", "fetch_logs", {"upload_url": UPLOAD})
    items = await charger.store.outbox.next_batch(100, ["command_status"])
    sent = [(i.payload["status"], (i.payload.get("details") or {}).get("progress")) for i in items]
    assert sent == [("accepted", None), ("accepted", 100), ("completed", None)]


async def test_calibrate_sensor_without_service_mode_is_rejected(charger: Charger) -> None:
    message = await charger.rejected_with("c1", "calibrate_sensor", VALID["calibrate_sensor"])
    assert "service mode" in message


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"sensor": "control_board", "reference_value": 60.0}, "offset +25.00 degC for sensor 'control_board' is outside"),
        ({"sensor": "meter", "reference_value": 1.0}, "unknown sensor 'meter'; calibratable sensors: control_board"),
        ({"sensor": "dc_voltage:1", "reference_value": 400.0}, "sensor 'dc_voltage:1' measures 0 V"),
    ],
)
async def test_calibrate_sensor_refusals_name_the_problem(charger: Charger, params: dict[str, Any], expected: str) -> None:
    charger.services.service_mode.on = True
    await charger.deliver("c1", "calibrate_sensor", params)
    reports = charger.reported("c1")
    assert [s for s, _, _ in reports] == ["rejected"]
    assert expected in (reports[0][1] or ""), reports
    assert charger.services.hardware.calibration.entries() == {}


async def test_calibrate_sensor_reports_the_offset(charger: Charger) -> None:
    charger.services.service_mode.on = True
    await charger.accepted("c1", "calibrate_sensor", {"sensor": "control_board", "reference_value": 36.5})
    details = charger.reported("c1")[-1][2]
    assert details is not None
    assert (details["sensor"], details["kind"], details["value"], details["measured"]) == ("control_board", "offset", 1.5, 35.0)
