"""Status snapshot (agent side), its reading and rendering, and ``charger-agent status``."""

from __future__ import annotations

import asyncio
import io
import json
import os
import select
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from agent.cli import status as status_cli
from agent.service.status import (
    STALE_AFTER_S,
    StatusWriter,
    boot_id,
    build_status,
    fault_entry,
    is_stale,
    read_status,
    render_table,
    status_path,
    write_json_atomic,
)

ROOT = Path(__file__).resolve().parents[3]
TAKEN_AT = 1_735_726_350.0  # 2025-01-01T10:12:30Z
RECORD_ID = "3f2a0c4e-1111-2222-3333-444455556666"


def sample_status(taken_at: float = TAKEN_AT, **overrides: Any) -> dict[str, Any]:
    inputs: dict[str, Any] = {
        "agent_version": "0.1.0",
        "serial_number": "SIM-0000001",
        "started_at": taken_at - 7_500.0,
        "connectors": [
            {"id": 2, "kind": "ac", "state": "idle", "plugged": False, "power_kw": None, "soc": None, "session": None},
            {
                "id": 1,
                "kind": "dc",
                "state": "charging",
                "plugged": True,
                "power_kw": 45.2,
                "soc": 63,
                "session": {
                    "record_id": RECORD_ID,
                    "mode": "charge",
                    "started_at": "2025-01-01T10:00:00Z",
                    "energy_kwh": 8.412,
                },
            },
        ],
        "faults": [
            {"fault_id": "F-0601", "connector_id": None, "since": "2025-01-01T10:05:00Z", "details": {"fan": "cabinet"}},
            {"fault_id": "F-0411", "connector_id": 1, "since": "2025-01-01T10:12:00Z", "details": {}},
        ],
        "component_health": {
            1: {  # the §14.1 block as agent.maintenance.health.ComponentHealth.build returns it
                "contactor_cycles": 12034,
                "contactor_max_cycles": 100000,
                "cooling_fan_rpm": 2100,
                "cooling_fan_status": "warning",
                "internal_temps": {"power_module": 55.0, "dc_outlet": 41.2, "ac_inlet": float("nan")},
                "relay_state": "closed",
                "isolation_test_kohms": 1250.0,
                "last_isolation_test": "2025-01-01T10:00:30Z",
                "bidirectional_inverter_cycles": 120,
                "bidirectional_inverter_max_cycles": 10000,
                "harmonic_distortion_v2g_pct": 2.1,
                "discharge_contactor_cycles": 40,
            },
            2: {"contactor_cycles": 17, "contactor_max_cycles": 60000, "internal_temps": {}, "relay_state": "open"},
        },
        "uplink": {
            "enabled": True,
            "online": True,
            "last_heartbeat_at": "2025-01-01T10:12:00Z",
            "reconnects_10min": 1,
            "reconnect_limit": 5,
            "reconnects_total": 3,
            "last_error": None,
        },
        "outbox": {"depth": {"command_status": 0, "telemetry": 3, "event": 1}, "dead_letters": 2, "storage_alarm": False},
        "service_mode": {
            "on": True,
            "source": "local_cli",
            "key_switch": False,
            "file_active": True,
            "until_iso": "2025-01-01T10:40:00Z",
            "remaining_s": 1650.0,
            "by": "alice",
        },
        "taken_at": taken_at,
    }
    inputs.update(overrides)
    return build_status(**inputs)


def write_fresh(state_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A snapshot as the agent's writer would leave it, taken now."""
    snap = sample_status(time.time(), **overrides)
    snap.update(written_mono=time.monotonic(), boot_id=boot_id(), pid=os.getpid())
    state_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(status_path(state_dir), snap)
    return snap


def write_stale(state_dir: Path, age_s: float = 60.0) -> None:
    snap = sample_status(time.time() - age_s)
    snap.update(written_mono=time.monotonic() - age_s, boot_id=boot_id(), pid=1)
    state_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(status_path(state_dir), snap)


# ---------------------------------------------------------------------------- build_status


def test_build_status_derives_fields_and_is_plain_json() -> None:
    s = sample_status()
    text = json.dumps(s, allow_nan=False)  # NaN became null, int keys became strings
    assert json.loads(text) == s
    assert [c["id"] for c in s["connectors"]] == [1, 2]
    assert s["connectors"][0]["session"]["duration_s"] == 750.0
    assert s["uptime_s"] == 7_500.0
    assert s["taken_at_iso"] == "2025-01-01T10:12:30Z"
    assert s["uplink"]["last_heartbeat_age_s"] == 30.0
    assert list(s["component_health"]) == ["1", "2"]
    assert s["component_health"]["1"]["internal_temps"]["ac_inlet"] is None
    assert s["component_health"]["1"]["isolation_age_s"] == 720.0
    assert "isolation_age_s" not in s["component_health"]["2"]
    # errors before warnings; title and severity from the fault dictionary
    assert [(f["fault_id"], f["severity"]) for f in s["faults"]] == [("F-0411", "error"), ("F-0601", "warning")]
    assert s["faults"][0]["title"] == "Power module communication timeout"
    assert s["faults"][0]["age_s"] == 30.0


def test_build_status_does_not_modify_inputs() -> None:
    connectors = [{"id": 1, "kind": "dc", "state": "charging", "session": {"record_id": "r", "started_at": "2025-01-01T10:00:00Z"}}]
    sample_status(connectors=connectors)
    assert "duration_s" not in connectors[0]["session"]  # type: ignore[operator]


def test_unknown_fault_id_is_shown_as_error() -> None:
    entry = fault_entry("F-9999", None)
    assert entry["title"] == "F-9999" and entry["severity"] == "error"


# ---------------------------------------------------------------------------- writing and reading


def test_writer_writes_atomically_with_mode_0640(tmp_path: Path) -> None:
    path = status_path(tmp_path)
    writer = StatusWriter(path, 1.0, lambda: sample_status(time.time()))
    assert writer.write_once()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == ["status.json"]  # no temp file left behind
    snapshot, age = read_status(tmp_path)
    assert snapshot is not None and snapshot["pid"] == os.getpid()
    assert snapshot["connectors"][0]["session"]["record_id"] == RECORD_ID
    assert age is not None and age < 1.0 and not is_stale(age)


def test_a_failing_collect_still_shows_a_live_agent(tmp_path: Path) -> None:
    path = status_path(tmp_path)
    calls = {"n": 0}

    def collect() -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        if calls["n"] == 3:
            return {"bad": float("nan")}  # not JSON
        return sample_status(time.time())

    writer = StatusWriter(path, 1.0, collect)
    assert writer.write_once()
    assert not writer.write_once()
    snapshot, age = read_status(tmp_path)
    assert snapshot is not None and snapshot["snapshot_error"] == "RuntimeError: boom" and not is_stale(age)
    assert "STATUS INCOMPLETE: the agent could not build its snapshot: RuntimeError: boom" in render_table(snapshot)
    assert not writer.write_once()
    snapshot, _ = read_status(tmp_path)
    assert snapshot is not None and "snapshot_error" in snapshot and "bad" not in snapshot
    assert writer.write_once() and writer.writes == 2
    snapshot, _ = read_status(tmp_path)
    assert snapshot is not None and "snapshot_error" not in snapshot
    assert os.listdir(tmp_path) == ["status.json"]


def test_a_failed_write_is_reported_not_raised(tmp_path: Path) -> None:
    writer = StatusWriter(status_path(tmp_path / "missing-dir"), 1.0, lambda: sample_status(time.time()))
    assert not writer.write_once() and writer.writes == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_root_writes_files_owned_like_the_directory(tmp_path: Path) -> None:
    os.chown(tmp_path, 12345, 12346)
    write_json_atomic(tmp_path / "x.json", {"a": 1})
    st = (tmp_path / "x.json").stat()
    assert (st.st_uid, st.st_gid) == (12345, 12346)


async def test_writer_task_refreshes_until_stopped(tmp_path: Path) -> None:
    writer = StatusWriter(status_path(tmp_path), 0.02, lambda: sample_status(time.time()))
    await writer.start()
    for _ in range(200):
        if writer.writes >= 3:
            break
        await asyncio.sleep(0.01)
    assert writer.writes >= 3
    await writer.stop()
    count = writer.writes
    await asyncio.sleep(0.06)
    assert writer.writes == count
    await writer.stop()  # idempotent


def test_read_status_missing_and_garbage(tmp_path: Path) -> None:
    assert read_status(tmp_path) == (None, None)
    status_path(tmp_path).write_text("{not json")
    os.utime(status_path(tmp_path), (time.time() - 30, time.time() - 30))
    snapshot, age = read_status(tmp_path)
    assert snapshot is None and age is not None and 29 < age < 40


def test_staleness_by_wall_clock_without_monotonic_stamp(tmp_path: Path) -> None:
    write_json_atomic(status_path(tmp_path), sample_status())
    _, age = read_status(tmp_path, now=TAKEN_AT + STALE_AFTER_S - 1)
    assert not is_stale(age)
    _, age = read_status(tmp_path, now=TAKEN_AT + STALE_AFTER_S + 1)
    assert is_stale(age)
    assert is_stale(None)


@pytest.mark.skipif(boot_id() is None, reason="needs /proc boot_id")
def test_staleness_uses_the_monotonic_clock_in_the_same_boot(tmp_path: Path) -> None:
    # the wall clock says "just now" (stepped back), the monotonic stamp says 60 s ago
    snap = sample_status(time.time())
    snap.update(written_mono=time.monotonic() - 60.0, boot_id=boot_id())
    write_json_atomic(status_path(tmp_path), snap)
    _, age = read_status(tmp_path)
    assert age is not None and 59 < age < 65 and is_stale(age)
    # another boot: the monotonic stamp means nothing, the wall clock is used
    snap.update(boot_id="another-boot")
    write_json_atomic(status_path(tmp_path), snap)
    _, age = read_status(tmp_path)
    assert age is not None and age < 5


# ---------------------------------------------------------------------------- rendering


def test_table_shows_the_key_fields() -> None:
    text = render_table(sample_status(), age_s=0.4)
    for expected in (
        "charger-agent 0.1.0",
        "SIM-0000001",
        "up 2 h 05 min",
        "0.4 s old",
        "service mode: ON",
        "by alice",
        RECORD_ID,
        "0:12:30",
        "8.412",
        "45.20",
        "63%",
        "F-0411",
        "Power module communication timeout",
        "2025-01-01T10:12:00Z (30 s ago)",
        "warning",
        "contactor  12,034 / 100,000 cycles (12.0%), relay closed",
        "isolation  1250.0 kOhm at 2025-01-01T10:00:30Z (12 min 00 s ago)",
        "fan        2100 rpm, warning",
        "temps      power_module 55.0, dc_outlet 41.2, ac_inlet - degC",
        "V2G stage  inverter 120 / 10,000 cycles (1.2%), discharge contactor 40 cycles, THD 2.10%",
        "contactor  17 / 60,000 cycles (0.0%), relay open",
        "isolation  not tested yet",
        "online: yes",
        "last heartbeat: 30 s ago",
        "reconnects (last 10 min): 1 (limit 5)",
        "outbox: 4 queued (telemetry 3, event 1)",
        "dead letters: 2",
    ):
        assert expected in text, expected
    lines = text.splitlines()
    row = next(line for line in lines if RECORD_ID in line)
    assert row.split()[:3] == ["1", "dc", "charging"]


def test_table_flags_alarms_and_offline() -> None:
    text = render_table(
        sample_status(
            uplink={"enabled": True, "online": False, "last_heartbeat_at": None, "reconnects_10min": 6, "last_error": "timeout"},
            outbox={"depth": {}, "dead_letters": 0, "storage_alarm": True},
            service_mode={"on": True, "key_switch": True, "file_active": False, "key_switch_error": None},
            component_health={1: {"contactor_cycles": 5, "contactor_max_cycles": 100, "relay_state": "fault", "cooling_fan_status": "fault"}},
            faults=[],
        )
    )
    assert "online: NO" in text and "last heartbeat: never" in text and "last error: timeout" in text
    assert "STORAGE ALARM" in text and "outbox: 0 queued (empty)" in text
    assert "service mode: ON (key switch)" in text
    assert "relay FAULT" in text and "fan        -, FAULT" in text
    assert "ACTIVE FAULTS\n  (none)" in text


def test_table_tolerates_missing_and_malformed_sections() -> None:
    text = render_table({"connectors": "nonsense", "faults": [1, 2], "component_health": {"1": "x"}, "uplink": None})
    assert "CONNECTORS\n  (none)" in text and "service mode: -" in text


# ---------------------------------------------------------------------------- CLI


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = status_cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_status_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_fresh(tmp_path)
    code, out, _ = run_cli(["status", "--state-dir", str(tmp_path)], capsys)
    assert code == 0 and RECORD_ID in out and "ACTIVE FAULTS" in out
    code, out, _ = run_cli(["status", "--state-dir", str(tmp_path), "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["running"] is True and doc["age_s"] < STALE_AFTER_S
    assert doc["connectors"][0]["session"]["record_id"] == RECORD_ID


def test_cli_status_not_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["status", "--state-dir", str(tmp_path)], capsys)
    assert code == 1 and out == "" and "agent not running (no status snapshot" in err
    write_stale(tmp_path, 60.0)
    code, out, err = run_cli(["status", "--state-dir", str(tmp_path)], capsys)
    assert code == 1 and "agent not running (last seen " in err and "1 min 00 s ago" in err
    code, out, _ = run_cli(["status", "--state-dir", str(tmp_path), "--json"], capsys)
    doc = json.loads(out)
    assert code == 1 and doc["running"] is False and doc["age_s"] >= 60 and "last seen" in doc["error"]
    assert doc["connectors"]  # the last snapshot is still there for diagnosis


def test_cli_status_finds_the_state_dir_from_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    write_fresh(state)
    text = (ROOT / "config" / "sim.toml").read_text()
    config = tmp_path / "agent.toml"
    config.write_text(text.replace('state_dir = "state/sim"', f'state_dir = "{state}"'))
    temp = Path(tempfile.gettempdir())
    before = set(temp.glob("charger-sim-*"))
    code, out, _ = run_cli(["status", "--config", str(config)], capsys)
    assert code == 0 and RECORD_ID in out
    assert set(temp.glob("charger-sim-*")) == before  # {sim_root} did not make a temp dir


def test_cli_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[charger]\nserial_number = 1\n")
    code, _, err = run_cli(["status", "--config", str(bad)], capsys)
    assert code == 2 and "bad.toml" in err
    for argv in (
        ["status", "--watch", "0"],
        ["status", "--state-dir", str(tmp_path), "--config", str(bad)],
        ["status", "--bogus"],
    ):
        with pytest.raises(SystemExit) as exc:
            status_cli.main(argv)
        assert exc.value.code == 2, argv


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_watch_redraws_in_place_on_a_tty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fresh(tmp_path)
    sleeps: list[float] = []

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:
            write_stale(tmp_path)  # the agent died between refreshes
        if len(sleeps) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(status_cli.time, "sleep", fake_sleep)
    out = FakeTty()
    assert status_cli.watch(tmp_path, 0.5, as_json=False, out=out) == 0
    frames = out.getvalue().split(status_cli.CLEAR_SCREEN)[1:]
    assert len(frames) == 3 and sleeps == [0.5, 0.5, 0.5]
    assert RECORD_ID in frames[0] and RECORD_ID in frames[1]
    assert "agent not running (last seen" in frames[2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored


def read_until(proc: subprocess.Popen[bytes], done: Any, timeout: float = 15.0) -> bytes:
    """Read the child's stdout until ``done(data)`` or the timeout."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while not done(data) and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    return data


def start_watch(state_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli.status", "status", "--state-dir", str(state_dir), "--watch", "0.2", *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
def test_watch_appends_into_a_pipe_until_terminated(tmp_path: Path) -> None:
    write_fresh(tmp_path)
    proc = start_watch(tmp_path)
    try:
        data = read_until(proc, lambda d: d.count(b"CONNECTORS") >= 2)
        assert data.count(b"CONNECTORS") >= 2 and b"\x1b[" not in data
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()


@pytest.mark.slow
def test_watch_json_lines_until_ctrl_c(tmp_path: Path) -> None:
    write_fresh(tmp_path)
    proc = start_watch(tmp_path, "--json")
    try:
        data = read_until(proc, lambda d: d.count(b"\n") >= 2)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    lines = (data + rest).decode().splitlines()
    assert len(lines) >= 2 and proc.returncode == 0, err.decode()
    for line in lines:
        doc = json.loads(line)
        assert doc["running"] is True and doc["connectors"][0]["id"] == 1


def test_snapshot_goes_to_the_runtime_directory(tmp_path: Path) -> None:
    from agent.service.status import find_status

    state, run = tmp_path / "state", tmp_path / "run"
    # a shell or test run: the state directory; under systemd: $RUNTIME_DIRECTORY; config wins
    assert status_path(state, env={}) == state / "status.json"
    assert status_path(state, env={"RUNTIME_DIRECTORY": f"{run}:/other"}) == run / "status.json"
    assert status_path(state, runtime_dir=tmp_path / "cfg", env={"RUNTIME_DIRECTORY": str(run)}) == tmp_path / "cfg" / "status.json"
    # the reader takes the freshest snapshot it can find
    state.mkdir()
    run.mkdir()
    write_json_atomic(state / "status.json", {"old": True})
    os.utime(state / "status.json", (1, 1))
    write_json_atomic(run / "status.json", sample_status(time.time()))
    assert find_status(state, runtime_dir=run) == run / "status.json"
    assert find_status(state) == state / "status.json"
