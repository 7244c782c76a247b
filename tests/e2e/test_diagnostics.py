"""The nine remote diagnostic commands (platform-api §14.2) end to end, against the emulator.

Two scenarios, each run once and shared by the tests of this module:

* **In-process** (about 80 s): an :class:`agent.runtime.Agent` on ``config/sim.toml``
  (``send_component_health`` on, a short fan spin-up limit for the self test) runs in
  this process against an :class:`~agent.emulator.Emulator` and a tiny upload server on
  127.0.0.1. In order: ``run_self_test`` idle (plus a ``start_charging`` refused while it
  runs), ``reset_power_module`` idle and for an unknown module, ``fetch_logs`` to the
  upload server and to a closed port, ``calibrate_sensor`` without / with / without
  service mode (the real ``charger-agent service-mode`` CLI as a subprocess),
  ``force_reconnect``, ``reset_fan_counter``; then a session on connector 1 during which
  ``run_self_test`` and ``reset_power_module`` are refused and ``soft_reset`` closes the
  session; then ``reset_contactor_counter`` and a self test with the cabinet fan slowed
  down (simulator fault ``fan_slowdown``).
* **Subprocess** (about 45 s, :mod:`tests.e2e.harness`): ``reboot`` really ends the
  process, so the agent runs as ``charger-agent run`` and is started again on the same
  state directory: reboot while idle, reboot deferred by a session, forced reboot during
  a session.

Everything is judged from outside: what the emulator and the upload server received,
plus the agent's store (audit log, open sessions) and its connectors' states.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import math
import socket
import sys
import tarfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.config import load_config
from agent.emulator import Emulator, RequestKind
from agent.emulator.operator_models import CommandStatusReport
from agent.runtime import Agent
from agent.store.commands import AuditEntry
from tests.e2e.harness import REPO, SIM_CONFIG, Rig, assert_no_secrets_logged, run_scenario

pytestmark = pytest.mark.slow

# ---------------------------------------------------------------------------- §14.1, the project's own list

#: ``component_health`` fields as drafted in platform-api §14.1 -> expected JSON type.
#: "number" = int or float (never bool); tuples are enums.
CORE_FIELDS: dict[str, Any] = {
    "contactor_cycles": "number",
    "contactor_max_cycles": "number",
    "cooling_fan_rpm": "number",
    "cooling_fan_status": ("ok", "warning", "fault"),
    "internal_temps": "object",
    "relay_state": ("closed", "open", "fault"),
    "isolation_test_kohms": "number",
    "last_isolation_test": "datetime",
}
#: V2G-capable connectors only (optional in the draft)
V2G_FIELDS: dict[str, Any] = {
    "bidirectional_inverter_cycles": "number",
    "bidirectional_inverter_max_cycles": "number",
    "harmonic_distortion_v2g_pct": "number",
    "discharge_contactor_cycles": "number",
}
#: ``internal_temps`` keys, all numbers (degC)
INTERNAL_TEMPS = ("power_module", "control_board", "ac_inlet", "dc_outlet")
#: known only after a cable check: the agent omits them until then (and on an AC connector
#: without an insulation monitor), rather than sending invented values
ISOLATION_FIELDS = ("isolation_test_kohms", "last_isolation_test")

TERMINAL = ("completed", "failed", "rejected")
UPLOAD_SIGNATURE = "e2e-presigned-signature-0123456789"
SESSION_TX = "diag-session"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def health_problems(block: Any) -> list[str]:
    """Everything wrong with one ``component_health`` block against the §14.1 list."""
    if not isinstance(block, dict):
        return [f"not an object: {block!r}"]
    problems = []
    spec = {**CORE_FIELDS, **V2G_FIELDS}
    for key, value in block.items():
        kind = spec.get(key)
        if kind is None:
            problems.append(f"{key}: not a §14.1 field")
        elif kind == "number" and not _is_number(value):
            problems.append(f"{key}: expected a number, got {value!r}")
        elif isinstance(kind, tuple) and value not in kind:
            problems.append(f"{key}: expected one of {kind}, got {value!r}")
        elif kind == "datetime":
            try:
                parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
                assert parsed.tzinfo is not None
            except (ValueError, AssertionError):
                problems.append(f"{key}: expected an ISO 8601 date-time with zone, got {value!r}")
        elif kind == "object":
            if not isinstance(value, dict):
                problems.append(f"{key}: expected an object, got {value!r}")
            else:
                for name, temp in value.items():
                    if name not in INTERNAL_TEMPS:
                        problems.append(f"internal_temps.{name}: not a §14.1 sensor")
                    elif not _is_number(temp):
                        problems.append(f"internal_temps.{name}: expected a number, got {temp!r}")
    if ("isolation_test_kohms" in block) != ("last_isolation_test" in block):
        problems.append("isolation_test_kohms and last_isolation_test must come together")
    return problems


# ---------------------------------------------------------------------------- helpers


async def until(what: str, check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Upload:
    method: str
    path: str
    query: dict[str, str]
    content_type: str | None
    content_length: str | None
    body: bytes


class UploadServer:
    """A tiny object-store stand-in on 127.0.0.1: answers 200 to PUT/POST and keeps the body."""

    def __init__(self) -> None:
        self.received: list[Upload] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        async def store(request: web.Request) -> web.Response:
            body = await request.read()
            self.received.append(
                Upload(
                    request.method, request.path, dict(request.query), request.headers.get("Content-Type"),
                    request.headers.get("Content-Length"), body,
                )
            )
            return web.Response(status=200, text="stored")

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/bundles/{name}", store)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


# ---------------------------------------------------------------------------- in-process scenario


@dataclass
class Bench:
    """The in-process run: what was received, plus observations taken while it ran."""

    emulator: Emulator
    agent: Agent
    state_dir: Path
    uploads: UploadServer
    tokens: list[str] = field(default_factory=list)
    obs: dict[str, Any] = field(default_factory=dict)
    audit: list[AuditEntry] = field(default_factory=list)
    exit_code: int | None = None
    cli: list[tuple[list[str], int, str]] = field(default_factory=list)

    def statuses(self, command_id: str) -> list[CommandStatusReport]:
        return list(self.emulator.context.store.command(command_id).statuses)

    def names(self, command_id: str) -> list[str]:
        return [s.status for s in self.statuses(command_id)]

    def last(self, command_id: str) -> CommandStatusReport:
        return self.statuses(command_id)[-1]

    def telemetry(self, connector_id: int | None = None) -> list[dict[str, Any]]:
        return [
            r.body
            for r in self.emulator.received(RequestKind.TELEMETRY)
            if r.accepted and isinstance(r.body, dict) and connector_id in (None, r.body.get("connector_id"))
        ]

    def seq(self) -> int:
        return max((r.seq for r in self.emulator.received()), default=0)

    async def command(
        self, name: str, params: dict[str, Any] | None = None, *, command_id: str, connector_id: int | None = None,
        timeout: float = 30.0,
    ) -> list[CommandStatusReport]:
        """Queue a command and wait for its terminal status."""
        self.emulator.queue_command(command=name, params=params or {}, command_id=command_id, connector_id=connector_id)
        await until(
            f"{name} ({command_id}) to end",
            lambda: any(s.status in TERMINAL for s in self.statuses(command_id)),
            timeout,
        )
        return self.statuses(command_id)

    async def service_mode(self, action: str) -> None:
        """``charger-agent service-mode on|off --state-dir DIR`` as a separate process."""
        argv = [sys.executable, "-m", "agent", "service-mode", action, "--state-dir", str(self.state_dir)]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=str(REPO)
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        self.cli.append((argv[3:5], proc.returncode, out.decode(errors="replace")))
        assert proc.returncode == 0, out
        want = action == "on"
        await until(f"the agent to see service mode {action}", lambda: self.agent.services is not None and self.agent.services.service_mode_on() is want, 10)


async def self_test_watching(bench: Bench, command_id: str, *, try_start: str | None = None) -> dict[str, Any]:
    """Run ``run_self_test``, sampling the connectors' states until it ends."""
    first = bench.seq()
    bench.emulator.queue_command(command="run_self_test", command_id=command_id)
    await until("the self test to be accepted", lambda: "accepted" in bench.names(command_id), 15, 0.05)
    states: dict[int, list[tuple[str, str | None]]] = {1: [], 2: []}
    tried = False
    while not any(s in TERMINAL for s in bench.names(command_id)):
        for cid, connector in bench.agent.connectors.items():
            states[cid].append((connector.state.value, connector.unavailable_reason))
        if try_start and not tried and bench.agent.connectors[1].state.value == "unavailable":
            tried = True
            bench.emulator.queue_command(
                command="start_charging", connector_id=1, params={"transaction_id": "during-self-test"}, command_id=try_start
            )
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.5)  # the state-change telemetry after the test
    return {
        "states": states,
        "first_seq": first,
        "after": {cid: (c.state.value, c.unavailable_reason) for cid, c in bench.agent.connectors.items()},
    }


async def in_process_scenario(bench: Bench) -> None:
    emu, agent, obs = bench.emulator, bench.agent, bench.obs
    await until("the first heartbeat", lambda: any(r.accepted for r in emu.received(RequestKind.HEARTBEAT)))
    await until(
        "the vehicle to plug into connector 1",
        lambda: any(
            isinstance(r.body, dict) and r.body.get("event_type") == "plug_in" for r in emu.received(RequestKind.EVENTS)
        ),
    )
    obs["idle_telemetry"] = len(bench.telemetry())

    # -- run_self_test while idle; a start_charging arriving meanwhile is refused
    obs["self_test_idle"] = await self_test_watching(bench, "st-idle", try_start="start-during-self-test")
    await until("the start during the self test to end", lambda: bench.names("start-during-self-test"), 10)

    # -- reset_power_module while idle, and for a module that does not exist
    await bench.command("reset_power_module", {"module": 0}, command_id="rpm-idle")
    await bench.command("reset_power_module", {"module": 7}, command_id="rpm-unknown")

    # -- fetch_logs: to the upload server (pre-signed style URL), then to a closed port
    url = f"http://127.0.0.1:{bench.uploads.port}/bundles/agent-logs.tar.gz?X-Amz-Signature={UPLOAD_SIGNATURE}"
    await bench.command("fetch_logs", {"upload_url": url, "ignored_key": True}, command_id="logs-ok", timeout=60)
    await bench.command(
        "fetch_logs", {"upload_url": f"http://127.0.0.1:{free_port()}/bundles/x.tar.gz"}, command_id="logs-unreachable",
        timeout=60,
    )
    # a second bundle carries the first command's audit row: its pre-signed URL must be redacted
    await bench.command(
        "fetch_logs", {"upload_url": f"http://127.0.0.1:{bench.uploads.port}/bundles/second.tar.gz"},
        command_id="logs-second", timeout=60,
    )
    creds = agent.store.credentials.load() if agent.store is not None else None
    obs["device_secret"] = creds.device_secret if creds is not None else None

    # -- calibrate_sensor: needs service mode; bounds checked
    await bench.command("calibrate_sensor", {"sensor": "control_board", "reference_value": 30.0}, command_id="cal-no-service")
    await bench.service_mode("on")
    assert agent.hardware is not None and agent.hardware.calibration is not None
    calibration = agent.hardware.calibration
    raw = calibration.raw_value("control_board")
    assert raw is not None
    obs["raw_control_board"] = raw
    await bench.command(
        "calibrate_sensor", {"sensor": "control_board", "reference_value": round(raw + 1.5, 1)}, command_id="cal-ok"
    )
    thermal = agent.hardware.thermal
    obs["calibrated_reading"] = thermal.temperatures()["control_board"].celsius if thermal else None
    obs["raw_after"] = calibration.raw_value("control_board")
    await bench.command(
        "calibrate_sensor", {"sensor": "control_board", "reference_value": round(raw + 40.0, 1)}, command_id="cal-out-of-bounds"
    )
    await bench.command("calibrate_sensor", {"sensor": "control_board", "reference_value": 5000}, command_id="cal-bad-param")
    await bench.command("calibrate_sensor", {"sensor": "dc_meter", "reference_value": 1.0}, command_id="cal-unknown-sensor")
    await bench.service_mode("off")
    await bench.command("calibrate_sensor", {"sensor": "control_board", "reference_value": raw}, command_id="cal-service-off")

    # -- force_reconnect
    assert agent.channel is not None
    uplink = agent.channel.uplink
    obs["budget_before"] = uplink.budget.used()
    obs["reconnects_before"] = uplink.stats.reconnects
    obs["tokens_before"] = list(bench.tokens)
    obs["reconnect_first_seq"] = bench.seq()
    await bench.command("force_reconnect", command_id="reconnect")
    obs["budget_after"] = uplink.budget.used()
    obs["reconnects_after"] = uplink.stats.reconnects
    obs["tokens_after"] = list(bench.tokens)
    obs["used_tokens_after_reconnect"] = len(obs["used_tokens"])

    # -- reset_fan_counter (the fan has been running since the start)
    fan_runtime = agent.hardware.fan_runtime
    assert fan_runtime is not None
    await bench.command("reset_fan_counter", {"fan": "no-such-fan"}, command_id="fan-unknown")
    await bench.command("reset_fan_counter", {"fan": 1}, command_id="fan-reset")
    obs["fan_hours_after_reset"] = fan_runtime.hours("cabinet")

    # -- a session on connector 1
    emu.queue_command(command="start_charging", connector_id=1, params={"transaction_id": SESSION_TX}, command_id="session-start")
    await until("charging on connector 1", lambda: agent.connectors[1].state.value == "charging", 45)

    def current() -> float:
        modules = agent.connectors[1].hw.modules
        return abs(modules.measured_current() or 0.0) if modules is not None else 0.0

    await until("more current than one module can carry", lambda: current() > 65.0, 20)
    obs["session_current"] = current()
    await bench.command("run_self_test", command_id="st-session")
    await bench.command("reset_power_module", {"module": 1}, command_id="rpm-session")
    await until(
        "a telemetry sample with the isolation result",
        lambda: any("isolation_test_kohms" in (b.get("component_health") or {}) for b in bench.telemetry(1)),
        15,
    )
    obs["in_session_before_reset"] = agent.any_session()
    await bench.command("soft_reset", command_id="soft-reset")
    await until("the session's start command to end", lambda: any(s in TERMINAL for s in bench.names("session-start")), 15)
    assert agent.store is not None
    obs["open_sessions_after_soft_reset"] = len(await agent.store.sessions.open_sessions())
    obs["after_soft_reset"] = {cid: c.state.value for cid, c in agent.connectors.items()}

    # -- reset_contactor_counter (connector 1's contactor closed once for the session)
    obs["cycles_before"] = agent.connectors[1].hw.contactor.status().cycles
    await bench.command("reset_contactor_counter", {"connector_id": 1}, command_id="contactor-reset")
    obs["cycles_after"] = agent.connectors[1].hw.contactor.status().cycles

    # -- run_self_test with the cabinet fan too slow
    assert agent.simulator is not None
    agent.simulator.inject("fan_slowdown", value=0.2)
    obs["self_test_fan"] = await self_test_watching(bench, "st-fan")
    agent.simulator.clear("fan_slowdown")

    bench.audit = await agent.store.ledger.audit_entries()


async def run_in_process(workdir: Path) -> Bench:
    emulator = Emulator()
    await emulator.start(host="127.0.0.1", port=0)
    uploads = UploadServer()
    await uploads.start()
    loaded = load_config(SIM_CONFIG, sim_root=workdir / "sim")
    cfg = loaded.model
    cfg.charger.state_dir = workdir / "state"
    cfg.platform.url = emulator.api_url
    cfg.platform.send_component_health = True
    cfg.self_test.fan_spinup_timeout_s = 3.0  # a slowed fan fails in 3 s instead of 15
    agent = Agent(loaded)
    bench = Bench(emulator, agent, workdir / "state", uploads)

    store = emulator.context.store
    issue, authenticate = store.issue_token, store.authenticate
    used: list[str] = []
    bench.obs["used_tokens"] = used

    def capture_issue(request: Any) -> Any:
        token, device = issue(request)
        bench.tokens.append(token)
        return token, device

    def capture_auth(token: str | None) -> Any:
        used.append(str(token))
        return authenticate(token)

    store.issue_token = capture_issue  # type: ignore[method-assign]
    store.authenticate = capture_auth  # type: ignore[method-assign]

    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop), name="agent")
    try:
        scenario = asyncio.create_task(in_process_scenario(bench))
        done, _ = await asyncio.wait([scenario, task], return_when=asyncio.FIRST_COMPLETED)
        if scenario not in done:
            scenario.cancel()
            raise AssertionError(f"the agent stopped during the scenario (exit {task.result()})")
        scenario.result()
    finally:
        stop.set()
        try:
            bench.exit_code = await asyncio.wait_for(task, 60)
        finally:
            await uploads.stop()
            await emulator.stop()
    return bench


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Bench:
    workdir = tmp_path_factory.mktemp("e2e-diag")
    return asyncio.run(run_in_process(workdir))


# ---------------------------------------------------------------------------- run_self_test


def _check(details: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in details["checks"] if c["name"] == name]
    assert len(found) == 1, [c["name"] for c in details["checks"]]
    return found[0]


def test_self_test_idle_completes_with_a_report(bench: Bench) -> None:
    assert bench.names("st-idle") == ["accepted", "completed"]
    details = bench.last("st-idle").details
    assert details is not None and details["passed"] is True
    assert details["summary"]["fail"] == 0 and details["summary"]["pass"] >= 8
    names = [c["name"] for c in details["checks"]]
    for expected in (
        "temperature_sensors", "connector1.meter", "connector1.power_modules.communication",
        "connector1.power_modules.output", "connector1.imd", "connector2.meter", "fan.cabinet",
    ):
        assert expected in names
    for check in details["checks"]:
        assert check["result"] in ("pass", "skipped"), check
        assert set(check) >= {"name", "result", "value", "limit", "detail"}
    # the vehicle plugged into connector 1 keeps its contactor out of the test
    assert _check(details, "connector1.contactor")["result"] == "skipped"


def test_connectors_are_unavailable_while_the_self_test_runs(bench: Bench) -> None:
    watched = bench.obs["self_test_idle"]
    for cid in (1, 2):
        seen = watched["states"][cid]
        assert ("unavailable", "self_test") in seen, seen
        assert set(seen) <= {("unavailable", "self_test"), ("vehicle_connected", None), ("idle", None)}, seen
    # back in service afterwards (the vehicle is still plugged into connector 1)
    assert watched["after"] == {1: ("vehicle_connected", None), 2: ("idle", None)}
    # the platform saw both connectors leave service ("fault": the only non-idle of the four telemetry
    # states) and come back
    received = [
        r.body for r in bench.emulator.received(RequestKind.TELEMETRY)
        if r.accepted and r.seq > watched["first_seq"]
    ]
    for cid in (1, 2):
        states = [b["state"] for b in received if b["connector_id"] == cid]
        assert "fault" in states, states
        assert states[states.index("fault"):].count("idle") >= 1, states
    # and a start_charging arriving meanwhile was refused
    start = bench.statuses("start-during-self-test")
    assert [s.status for s in start] == ["rejected"]
    assert start[0].message == "connector 1 is unavailable (self_test)"


def test_self_test_refused_during_a_session(bench: Bench) -> None:
    assert bench.names("st-session") == ["rejected"]
    assert bench.last("st-session").message == (
        "run_self_test is a medium-risk command: refused during an active session (connector 1)"
    )


def test_self_test_with_a_slow_fan_fails_naming_the_check(bench: Bench) -> None:
    assert bench.names("st-fan") == ["accepted", "failed"]
    last = bench.last("st-fan")
    assert last.message == "self test found problems"
    details = last.details
    assert details is not None and details["passed"] is False
    failed = [c for c in details["checks"] if c["result"] == "fail"]
    assert [c["name"] for c in failed] == ["fan.cabinet"]
    fan = failed[0]
    assert "rpm" in fan["detail"] and fan["value"]["rpm"] < 0.7 * 1800
    assert details["summary"]["fail"] == 1
    # the connectors came back into service after the failed test too
    assert bench.obs["self_test_fan"]["after"] == {1: ("vehicle_connected", None), 2: ("idle", None)}


# ---------------------------------------------------------------------------- calibrate_sensor


def test_calibrate_sensor_needs_service_mode(bench: Bench) -> None:
    for command_id in ("cal-no-service", "cal-service-off"):
        assert bench.names(command_id) == ["rejected"]
        assert "service mode" in (bench.last(command_id).message or ""), bench.last(command_id)
    assert [(argv, code) for argv, code, _ in bench.cli] == [(["service-mode", "on"], 0), (["service-mode", "off"], 0)]


def test_calibrate_sensor_in_service_mode_completes_with_the_offset(bench: Bench) -> None:
    assert bench.names("cal-ok") == ["accepted", "completed"]
    details = bench.last("cal-ok").details
    assert details is not None
    assert details["sensor"] == "control_board" and details["kind"] == "offset"
    assert details["value"] == pytest.approx(details["reference"] - details["measured"], abs=1e-9)
    assert details["reference"] == round(bench.obs["raw_control_board"] + 1.5, 1)
    assert abs(details["value"]) <= 10.0
    datetime.fromisoformat(details["calibrated_at"].replace("Z", "+00:00"))
    # the agent reads the sensor with the offset from now on
    assert bench.obs["calibrated_reading"] == pytest.approx(bench.obs["raw_after"] + details["value"], abs=1e-6)


def test_calibrate_sensor_out_of_bounds_is_rejected_naming_the_problem(bench: Bench) -> None:
    assert bench.names("cal-out-of-bounds") == ["rejected"]
    message = bench.last("cal-out-of-bounds").message or ""
    assert "control_board" in message and "outside +/-10 degC" in message, message
    assert bench.names("cal-bad-param") == ["rejected"]
    assert (bench.last("cal-bad-param").message or "").startswith("params.reference_value: "), bench.last("cal-bad-param")
    assert bench.names("cal-unknown-sensor") == ["rejected"]
    message = bench.last("cal-unknown-sensor").message or ""
    assert "unknown sensor 'dc_meter'" in message and "energy meter is never calibrated" in message


# ---------------------------------------------------------------------------- counters and modules


def test_reset_contactor_counter_reports_the_previous_cycles(bench: Bench) -> None:
    assert bench.names("contactor-reset") == ["accepted", "completed"]
    details = bench.last("contactor-reset").details
    # connector 1 has the V2G stage: its discharge contactor count is reset too (no discharge ran)
    assert details == {
        "previous_cycles": {"1": bench.obs["cycles_before"]},
        "previous_discharge_contactor_cycles": {"1": 0},
    }
    assert bench.obs["cycles_before"] >= 1  # the session closed it
    assert bench.obs["cycles_after"] == 0


def test_reset_fan_counter(bench: Bench) -> None:
    assert bench.names("fan-reset") == ["accepted", "completed"]
    details = bench.last("fan-reset").details
    assert details is not None and details["fan"] == "cabinet"
    assert details["previous_hours"] > 0  # the fan ran since the start
    assert bench.obs["fan_hours_after_reset"] < 0.001
    assert bench.names("fan-unknown") == ["rejected"]
    assert (bench.last("fan-unknown").message or "").startswith("params.fan: unknown fan 'no-such-fan'")


def test_reset_power_module_when_idle(bench: Bench) -> None:
    assert bench.names("rpm-idle") == ["accepted", "completed"]
    assert bench.last("rpm-idle").details == {"connector_id": 1, "module": 0}
    assert bench.names("rpm-unknown") == ["rejected"]
    assert bench.last("rpm-unknown").message == "params.module: no power module with address 7 on this charger"


def test_reset_power_module_refused_when_the_other_module_cannot_carry_the_session(bench: Bench) -> None:
    assert bench.obs["session_current"] > 60.0  # one simulated module carries at most 60 A
    assert bench.names("rpm-session") == ["rejected"]
    message = bench.last("rpm-session").message or ""
    assert message.startswith("module 1 carries the session on connector 1: the other modules can take 60 A of the "), message
    assert message.endswith(" A flowing")


# ---------------------------------------------------------------------------- fetch_logs


def test_fetch_logs_uploads_the_bundle_its_details_describe(bench: Bench) -> None:
    statuses = bench.statuses("logs-ok")
    names = [s.status for s in statuses]
    assert names[0] == "accepted" and names[-1] == "completed" and set(names) == {"accepted", "completed"}
    progress = [s.details["progress"] for s in statuses if s.status == "accepted" and s.details]
    assert progress and progress[-1] == 100 and progress == sorted(progress), progress
    details = statuses[-1].details
    assert details is not None
    # the unreachable one never arrived anywhere
    assert [u.path for u in bench.uploads.received] == ["/bundles/agent-logs.tar.gz", "/bundles/second.tar.gz"]
    upload = bench.uploads.received[0]
    assert upload.method == "PUT" and upload.path == "/bundles/agent-logs.tar.gz"
    assert upload.query == {"X-Amz-Signature": UPLOAD_SIGNATURE}
    assert upload.content_type == "application/gzip"
    assert upload.content_length == str(len(upload.body))
    assert details["size"] == len(upload.body)
    assert details["sha256"] == hashlib.sha256(upload.body).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(upload.body), mode="r:gz") as tar:
        members = tar.getnames()
        content = b"".join(tar.extractfile(m).read() for m in tar.getmembers() if m.isfile())  # type: ignore[union-attr]
    assert members == details["files"] and "MANIFEST.txt" in members
    secret = bench.obs["device_secret"]
    assert secret and secret.encode() not in content and secret.encode() not in gzip.decompress(upload.body)
    # the URL's signature never comes back in a report
    for s in statuses:
        assert UPLOAD_SIGNATURE not in f"{s.message} {s.details}"


def _members(body: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_fetch_logs_bundle_never_carries_a_presigned_url(bench: Bench) -> None:
    names = bench.names("logs-second")
    assert names[0] == "accepted" and names[-1] == "completed" and set(names) == {"accepted", "completed"}
    second = bench.uploads.received[1]
    assert bench.last("logs-second").details["sha256"] == hashlib.sha256(second.body).hexdigest()  # type: ignore[index]
    members = _members(second.body)
    audit = members["audit/commands.jsonl"].decode()
    # the earlier fetch_logs is in the audit rows, its signature is not
    assert '"command_id": "logs-ok"' in audit or '"command_id":"logs-ok"' in audit, audit[:2000]
    for name, content in members.items():
        assert UPLOAD_SIGNATURE.encode() not in content, name


def test_fetch_logs_to_an_unreachable_target_fails(bench: Bench) -> None:
    statuses = bench.statuses("logs-unreachable")
    assert statuses[0].status == "accepted" and statuses[-1].status == "failed"
    assert [s.status for s in statuses].count("failed") == 1
    last = statuses[-1]
    assert (last.message or "").startswith("upload failed: cannot connect to 127.0.0.1:"), last.message
    assert last.details is not None and last.details["size"] > 0 and len(last.details["sha256"]) == 64


# ---------------------------------------------------------------------------- force_reconnect


def test_force_reconnect_gets_a_new_token_and_counts_against_the_budget(bench: Bench) -> None:
    assert bench.names("reconnect") == ["accepted", "completed"]
    assert bench.last("reconnect").message == "reconnected with a new token"
    before, after = bench.obs["tokens_before"], bench.obs["tokens_after"]
    assert len(after) == len(before) + 1, (before, after)
    new = after[-1]
    assert new not in before
    # every request after the reconnect completed carries the new token
    used_after = bench.obs["used_tokens"][bench.obs["used_tokens_after_reconnect"]:]
    assert used_after and set(used_after) == {new}
    assert bench.obs["budget_after"] == bench.obs["budget_before"] + 1
    assert bench.obs["reconnects_after"] == bench.obs["reconnects_before"] + 1


# ---------------------------------------------------------------------------- soft_reset


def test_soft_reset_closes_the_open_session_cleanly_with_its_record(bench: Bench) -> None:
    assert bench.obs["in_session_before_reset"] is True
    assert bench.names("soft-reset") == ["accepted", "completed"]
    details = bench.last("soft-reset").details
    assert details is not None and details["connectors"] == [1, 2] and details["devices"] > 0
    records = [r.body for r in bench.emulator.context.store.charging_records() if r.body.get("transaction_id") == SESSION_TX]
    assert len(records) == 1, records
    record = records[0]
    assert record["stop_reason"] == "remote_stop"
    assert record["energy"] > 0 and record["energy"] == round(record["meter_end"] - record["meter_start"], 3)
    assert bench.names("session-start") == ["accepted", "completed"]
    start = bench.last("session-start").details
    assert start is not None and start["energy_delivered"] == record["energy"] and start["stop_reason"] == "remote_stop"
    assert bench.obs["open_sessions_after_soft_reset"] == 0
    # rebuilt state machines see the vehicle that is still plugged in
    assert bench.obs["after_soft_reset"] == {1: "vehicle_connected", 2: "idle"}


# ---------------------------------------------------------------------------- component_health


def test_telemetry_carries_a_complete_component_health_block(bench: Bench) -> None:
    telemetry = bench.telemetry()
    assert telemetry and all("component_health" in b for b in telemetry)
    for body in telemetry:
        assert health_problems(body["component_health"]) == [], body
    dc, ac = bench.telemetry(1), bench.telemetry(2)
    # connector 1 (DC, IMD, V2G stage): every §14.1 field from the very first sample (before
    # the first cable check the isolation fields are the IMD's current reading)
    complete = [b["component_health"] for b in dc]
    assert complete
    for block in complete:
        assert set(block) == set(CORE_FIELDS) | set(V2G_FIELDS), block
        assert set(block["internal_temps"]) == set(INTERNAL_TEMPS)
        assert block["isolation_test_kohms"] > 1000  # the simulated insulation is healthy
    for body in dc:
        assert set(CORE_FIELDS) - set(ISOLATION_FIELDS) <= set(body["component_health"]), body
        assert set(V2G_FIELDS) <= set(body["component_health"]), body
    # connector 2 (AC, no insulation monitor, no V2G stage): every mandatory field whose value exists
    for body in ac:
        block = body["component_health"]
        assert set(block) == set(CORE_FIELDS) - set(ISOLATION_FIELDS), block
        assert set(block["internal_temps"]) == set(INTERNAL_TEMPS)
    # what the block says is what the hardware says
    charging = [b for b in dc if b["state"] == "charging"]
    assert charging and all(b["component_health"]["relay_state"] == "closed" for b in charging)


# ---------------------------------------------------------------------------- audit and protocol


IN_PROCESS_OUTCOMES = {
    "st-idle": ("run_self_test", "accepted"),
    "st-session": ("run_self_test", "rejected"),
    "st-fan": ("run_self_test", "accepted"),
    "rpm-idle": ("reset_power_module", "accepted"),
    "rpm-unknown": ("reset_power_module", "rejected"),
    "rpm-session": ("reset_power_module", "rejected"),
    "logs-ok": ("fetch_logs", "accepted"),
    "logs-unreachable": ("fetch_logs", "accepted"),
    "logs-second": ("fetch_logs", "accepted"),
    "cal-no-service": ("calibrate_sensor", "rejected"),
    "cal-ok": ("calibrate_sensor", "accepted"),
    "cal-out-of-bounds": ("calibrate_sensor", "rejected"),
    "cal-bad-param": ("calibrate_sensor", "rejected"),
    "cal-unknown-sensor": ("calibrate_sensor", "rejected"),
    "cal-service-off": ("calibrate_sensor", "rejected"),
    "reconnect": ("force_reconnect", "accepted"),
    "fan-unknown": ("reset_fan_counter", "rejected"),
    "fan-reset": ("reset_fan_counter", "accepted"),
    "soft-reset": ("soft_reset", "accepted"),
    "contactor-reset": ("reset_contactor_counter", "accepted"),
}


def test_every_diagnostic_command_is_audited_with_its_outcome(bench: Bench) -> None:
    by_id: dict[str, list[AuditEntry]] = {}
    for entry in bench.audit:
        if entry.command_id is not None:
            by_id.setdefault(entry.command_id, []).append(entry)
    for command_id, (command, outcome) in IN_PROCESS_OUTCOMES.items():
        rows = by_id.get(command_id, [])
        decisions = [r for r in rows if r.source != "agent"]
        finals = [(r.command, r.outcome) for r in rows if r.source == "agent"]
        assert [(r.command, r.outcome) for r in decisions] == [(command, outcome)], (command_id, rows)
        last = bench.last(command_id).status
        if outcome == "accepted" and last in ("completed", "failed"):  # the final outcome is audited too
            assert finals == [(command, last)], (command_id, rows)
        else:
            assert finals == [], (command_id, rows)
        row = decisions[0]
        assert row.source.startswith("long_poll:")
        if outcome == "rejected":  # the audit says why, as the platform was told
            assert row.message == bench.last(command_id).message
    # the params are kept as received, except that nothing secret is in them here
    assert by_id["cal-ok"][0].params == {"sensor": "control_board", "reference_value": round(bench.obs["raw_control_board"] + 1.5, 1)}
    # service mode transitions are audited too
    service = [(e.source, e.outcome) for e in bench.audit if e.command == "service_mode"]
    assert service == [("local_cli", "on"), ("local_cli", "off")]


def test_every_request_was_valid_and_the_agent_stopped_cleanly(bench: Bench) -> None:
    rejected = [
        (r.kind.value, r.http_status, r.code, r.response)
        for r in bench.emulator.received()
        if not r.accepted and not (r.kind is RequestKind.COMMANDS and r.http_status == 0)
    ]
    assert rejected == []
    assert bench.exit_code == 0
    statuses = [r.body for r in bench.emulator.received(RequestKind.COMMAND_STATUS) if r.accepted]
    # one terminal status per command, never two
    terminal = [(s["command_id"], s["status"]) for s in statuses if s["status"] in TERMINAL]
    assert len(terminal) == len({c for c, _ in terminal}), terminal


# ---------------------------------------------------------------------------- reboot (agent subprocess)


@dataclass
class RebootRun:
    rig: Rig
    marks: dict[str, int] = field(default_factory=dict)
    alive_while_deferred: bool | None = None
    charging_while_deferred: bool | None = None


async def _exit(rig: Rig, timeout: float = 45.0) -> int:
    rig.run.exit_code = await asyncio.wait_for(rig.run.proc.wait(), timeout)
    return rig.run.exit_code


async def reboot_scenario(rig: Rig) -> RebootRun:
    emu = rig.emulator
    out = RebootRun(rig)

    # run 1: reboot while idle
    await rig.start()
    await rig.registered()
    emu.queue_command(command="reboot", command_id="reboot-idle")
    await _exit(rig)

    # run 2: back; then a session defers the next reboot
    await rig.start()
    await rig.registered()
    await rig.status_reached("reboot-idle", "completed")
    await rig.plugged()
    emu.queue_command(command="start_charging", connector_id=1, params={"transaction_id": "tx-deferred"}, command_id="start-deferred")
    await rig.charging()
    await asyncio.sleep(1.0)
    emu.queue_command(command="reboot", command_id="reboot-deferred")
    await rig.status_reached("reboot-deferred", "accepted")
    await asyncio.sleep(4.0)
    out.alive_while_deferred = rig.run.proc.returncode is None
    out.charging_while_deferred = "stop" not in rig.event_types(rig.run.first_seq)
    out.marks["stop_queued"] = rig.last_seq()
    emu.queue_command(command="stop_charging", connector_id=1, command_id="stop-deferred")
    await _exit(rig)

    # run 3: back; a forced reboot during a session
    await rig.start()
    await rig.registered()
    await rig.status_reached("reboot-deferred", "completed")
    await rig.plugged()
    emu.queue_command(command="start_charging", connector_id=1, params={"transaction_id": "tx-forced"}, command_id="start-forced")
    await rig.charging()
    await asyncio.sleep(2.0)
    emu.queue_command(command="reboot", params={"force": True}, command_id="reboot-forced")
    await _exit(rig)

    # run 4: back, then stopped
    await rig.start()
    await rig.registered()
    await rig.status_reached("reboot-forced", "completed")
    await asyncio.sleep(1.0)
    assert await rig.sigterm() == 0
    return out


@pytest.fixture(scope="module")
def reboots(tmp_path_factory: pytest.TempPathFactory) -> RebootRun:
    result: list[RebootRun] = []

    async def scenario(rig: Rig) -> Rig:
        result.append(await reboot_scenario(rig))
        return rig

    run_scenario(tmp_path_factory, "e2e-reboot", scenario)
    return result[0]


def _run_requests(rig: Rig, index: int, kind: RequestKind | None = None) -> list[Any]:
    """Accepted requests sent by run ``index`` (1-based): after its start, before the next's."""
    lo = rig.runs[index - 1].first_seq
    hi = rig.runs[index].first_seq if index < len(rig.runs) else 1 << 62
    return [r for r in rig.received(kind) if r.accepted and lo < r.seq <= hi]


def _assert_rebooted_once(rig: Rig, command_id: str, run: int) -> None:
    """Run ``run`` exited 0 after a final heartbeat ``offline``; the next run reported
    ``completed`` exactly once, after its first heartbeat."""
    assert rig.runs[run - 1].exit_code == 0, rig.runs[run - 1].log_tail()
    heartbeats = _run_requests(rig, run, RequestKind.HEARTBEAT)
    assert heartbeats[-1].body["status"] == "offline"
    assert [h.body["status"] for h in heartbeats].count("offline") == 1
    reports = [
        r for r in rig.received(RequestKind.COMMAND_STATUS)
        if r.accepted and r.body["command_id"] == command_id and r.body["status"] == "completed"
    ]
    assert len(reports) == 1, reports
    back = _run_requests(rig, run + 1, RequestKind.HEARTBEAT)[0]
    assert reports[0].seq > back.seq
    assert rig.statuses(command_id) == ["accepted", "completed"]
    done = rig.command(command_id).statuses[-1]
    assert done.message == "agent restarted" and done.details is not None and done.details["downtime_s"] >= 0
    assert "reboot_requested" in rig.runs[run - 1].log_text()


def test_reboot_when_idle(reboots: RebootRun) -> None:
    rig = reboots.rig
    _assert_rebooted_once(rig, "reboot-idle", 1)
    accepted = rig.command("reboot-idle").statuses[0]
    assert accepted.message == "rebooting" and accepted.details == {"forced": False}
    # the accepted report went out before the goodbye
    offline = _run_requests(rig, 1, RequestKind.HEARTBEAT)[-1]
    sent = [r for r in _run_requests(rig, 1, RequestKind.COMMAND_STATUS) if r.body["command_id"] == "reboot-idle"]
    assert [r.body["status"] for r in sent] == ["accepted"] and sent[0].seq < offline.seq


def test_reboot_during_a_session_is_deferred_until_it_ends(reboots: RebootRun) -> None:
    rig = reboots.rig
    accepted = rig.command("reboot-deferred").statuses[0]
    assert accepted.status == "accepted" and accepted.details == {"deferred": True}
    assert "deferred" in (accepted.message or "")
    assert reboots.alive_while_deferred is True and reboots.charging_while_deferred is True
    _assert_rebooted_once(rig, "reboot-deferred", 2)
    # the session ended by the stop command, not by the reboot; the agent went only after that
    records = rig.record_with("tx-deferred")
    assert len(records) == 1 and records[0]["stop_reason"] == "remote_stop", records
    assert rig.statuses("stop-deferred") == ["accepted", "completed"]
    offline = _run_requests(rig, 2, RequestKind.HEARTBEAT)[-1]
    assert offline.seq > reboots.marks["stop_queued"]
    record_seq = [r.seq for r in _run_requests(rig, 2, RequestKind.CHARGING_RECORDS)]
    assert record_seq and max(record_seq) < offline.seq


def test_forced_reboot_closes_the_session_record_first(reboots: RebootRun) -> None:
    rig = reboots.rig
    accepted = rig.command("reboot-forced").statuses[0]
    assert accepted.status == "accepted" and accepted.details == {"forced": True}
    _assert_rebooted_once(rig, "reboot-forced", 3)
    records = rig.record_with("tx-forced")
    assert len(records) == 1, records
    record = records[0]
    assert record["stop_reason"] == "remote_stop"
    assert record["energy"] > 0 and record["energy"] == round(record["meter_end"] - record["meter_start"], 3)
    assert rig.statuses("start-forced") == ["accepted", "completed"]
    start = rig.command("start-forced").statuses[-1]
    assert start.details is not None and start.details["energy_delivered"] == record["energy"]
    # record, stop event and start command's status all went out before the final heartbeat
    offline = _run_requests(rig, 3, RequestKind.HEARTBEAT)[-1]
    uploads = [r for r in _run_requests(rig, 3, RequestKind.CHARGING_RECORDS) if r.body.get("transaction_id") == "tx-forced"]
    assert len(uploads) == 1 and uploads[0].seq < offline.seq
    events = [r for r in _run_requests(rig, 3, RequestKind.EVENTS) if r.body.get("event_type") == "stop"]
    assert events and events[-1].seq < offline.seq
    # nothing was left for the next run to close as a power loss
    assert all(r["stop_reason"] != "power_loss" for r in rig.records())
    assert rig.open_session_count() == 0


def test_reboots_are_audited_and_nothing_else_was_wrong(reboots: RebootRun) -> None:
    rig = reboots.rig
    audit = rig.query_state(
        "SELECT command_id, command, outcome FROM command_audit WHERE command = 'reboot' ORDER BY id"
    )
    # each reboot: the decision, then its completion reported by the agent once it was back
    for command_id in ("reboot-idle", "reboot-deferred", "reboot-forced"):
        assert [o for c, _cmd, o in audit if c == command_id] == ["accepted", "completed"], audit
    assert [r.exit_code for r in rig.runs] == [0, 0, 0, 0]
    rejected = [
        (r.kind.value, r.http_status, r.code)
        for r in rig.received()
        if not r.accepted and not (r.kind is RequestKind.COMMANDS and r.http_status == 0)
    ]
    assert rejected == []
    # config/sim.toml turns [platform] send_component_health on: every sample has the block,
    # and the strict emulator accepted every one of them (nothing was rejected above)
    telemetry = [r.body for r in rig.received(RequestKind.TELEMETRY) if r.accepted]
    assert telemetry and all("component_health" in b for b in telemetry)
    assert_no_secrets_logged(rig)


def test_all_nine_commands_were_exercised(bench: Bench, reboots: RebootRun) -> None:
    commands = {c for c, _ in IN_PROCESS_OUTCOMES.values()}
    commands |= {row[0] for row in reboots.rig.query_state("SELECT DISTINCT command FROM command_audit")}
    nine = {
        "reboot", "soft_reset", "force_reconnect", "fetch_logs", "run_self_test", "calibrate_sensor",
        "reset_contactor_counter", "reset_fan_counter", "reset_power_module",
    }
    assert nine <= commands
