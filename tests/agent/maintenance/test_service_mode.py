"""Local service mode: the CLI file, the key switch (gpio-sim files), expiry, audit, CLI."""

from __future__ import annotations

import asyncio
import json
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent.cli import status as status_cli
from agent.maintenance.key_switch import KeySwitchConfig
from agent.maintenance.service_mode import (
    MAX_MINUTES,
    ServiceConfig,
    ServiceMode,
    audit_hook,
    read_file,
    service_mode_path,
    set_off,
    set_on,
)
from agent.service.status import boot_id, status_path, write_json_atomic
from agent.store import Store, StoreConfig
from hal.gpio.lines import sim_value_path

T0 = 1_735_726_350.0  # 2025-01-01T10:12:30Z


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Recorder:
    """An ``on_change`` that remembers each call with the monitor's ``last_change``."""

    def __init__(self) -> None:
        self.mode: ServiceMode | None = None
        self.calls: list[tuple[bool, str, str]] = []

    async def __call__(self, on: bool, source: str) -> None:
        assert self.mode is not None and self.mode.last_change is not None
        self.calls.append((on, source, self.mode.last_change["reason"]))


def monitor(state_dir: Path, config: ServiceConfig | None = None, clock: Clock | None = None) -> tuple[ServiceMode, Recorder]:
    rec = Recorder()
    mode = ServiceMode(state_dir, config, rec, clock=clock or Clock())
    rec.mode = mode
    return mode, rec


# ---------------------------------------------------------------------------- the file


def test_set_on_writes_the_file_and_set_off_removes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUDO_USER", "alice")
    content = set_on(tmp_path, 30, now=T0)
    path = service_mode_path(tmp_path)
    assert json.loads(path.read_text()) == {"until": T0 + 1800, "by": "alice", "at": T0}
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert read_file(tmp_path) == (content, None)
    assert set_off(tmp_path) is True and not path.exists()
    assert set_off(tmp_path) is False


@pytest.mark.parametrize("minutes", [0, -5, MAX_MINUTES + 1, True, 2.5])
def test_set_on_rejects_minutes_out_of_range(tmp_path: Path, minutes: Any) -> None:
    with pytest.raises(ValueError):
        set_on(tmp_path, minutes, "bob", now=T0)
    assert not service_mode_path(tmp_path).exists()


@pytest.mark.parametrize(
    "text, problem",
    [
        ("{nope", "is not JSON"),
        ("[1]", "not a JSON object"),
        ('{"until": "soon", "by": "x", "at": 1}', "needs numbers"),
        ('{"until": 1e20, "at": 1}', "needs numbers"),
    ],
)
def test_unusable_file_is_reported(tmp_path: Path, text: str, problem: str) -> None:
    service_mode_path(tmp_path).write_text(text)
    content, error = read_file(tmp_path)
    assert content is None and error is not None and problem in error


# ---------------------------------------------------------------------------- the monitor: file


async def test_cli_file_on_then_expires_by_itself(tmp_path: Path) -> None:
    clock = Clock()
    mode, rec = monitor(tmp_path, clock=clock)
    await mode.poll()
    assert not mode.is_on() and rec.calls == []

    set_on(tmp_path, 10, "alice", now=clock.now)
    await mode.poll()
    assert mode.is_on() and rec.calls == [(True, "local_cli", "set")]
    s = mode.status()
    assert s["on"] and s["source"] == "local_cli" and s["by"] == "alice"
    assert s["until"] == T0 + 600 and s["until_iso"] == "2025-01-01T10:22:30Z" and s["remaining_s"] == 600

    clock.now += 599
    await mode.poll()
    assert mode.is_on() and len(rec.calls) == 1
    clock.now += 1
    assert not mode.is_on()  # at `until` exactly, before the next poll
    await mode.poll()
    assert rec.calls[-1] == (False, "local_cli", "expired")
    assert mode.status()["on"] is False and mode.status()["until"] is None
    await mode.poll()
    assert len(rec.calls) == 2  # reported once


async def test_cli_off_renew_and_restart(tmp_path: Path) -> None:
    clock = Clock()
    set_on(tmp_path, 30, "alice", now=clock.now)
    mode, rec = monitor(tmp_path, clock=clock)
    await mode.start()  # found on when the agent starts: polled at once
    try:
        assert mode.is_on() and rec.calls == [(True, "local_cli", "active_at_start")]
        clock.now += 60
        set_on(tmp_path, 60, "bob", now=clock.now)
        await mode.poll()
        assert rec.calls[-1] == (True, "local_cli", "extended") and mode.status()["by"] == "bob"
        set_off(tmp_path)
        await mode.poll()
        assert not mode.is_on() and rec.calls[-1] == (False, "local_cli", "removed")
    finally:
        await mode.stop()


async def test_a_hand_written_file_cannot_exceed_the_maximum(tmp_path: Path) -> None:
    clock = Clock()
    write_json_atomic(service_mode_path(tmp_path), {"until": T0 + 10 * 86400, "by": "eve", "at": T0})
    mode, _ = monitor(tmp_path, clock=clock)
    await mode.poll()
    assert mode.is_on() and mode.status()["until"] == T0 + MAX_MINUTES * 60
    clock.now += MAX_MINUTES * 60
    assert not mode.is_on()


async def test_a_corrupted_file_turns_service_mode_off(tmp_path: Path) -> None:
    mode, rec = monitor(tmp_path)
    set_on(tmp_path, 30, "alice", now=T0)
    await mode.poll()
    service_mode_path(tmp_path).write_text("garbage")
    await mode.poll()
    assert not mode.is_on() and rec.calls[-1] == (False, "local_cli", "invalid")
    assert "not JSON" in mode.status()["file_error"]


# ---------------------------------------------------------------------------- the monitor: key switch


def key_config(root: Path, **kw: Any) -> ServiceConfig:
    return ServiceConfig(key_switch=KeySwitchConfig(backend="sim", chip="gpiochipK", line=3, root=str(root), **kw))


def set_level(root: Path, level: str) -> None:
    path = sim_value_path(root, "gpiochipK", 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(level)


async def test_sim_key_switch_active_low(tmp_path: Path) -> None:
    root = tmp_path / "gpio"
    (root / "gpiochipK").mkdir(parents=True)
    mode, rec = monitor(tmp_path, key_config(root))
    await mode.poll()  # no value file: the pull-up reads high = key off
    assert not mode.is_on() and mode.status()["key_switch"] is False
    set_level(root, "0\n")  # switch to ground: key turned
    await mode.poll()
    assert mode.is_on() and rec.calls == [(True, "key_switch", "key_on")]
    assert mode.status()["source"] == "key_switch"
    set_level(root, "1\n")
    await mode.poll()
    assert not mode.is_on() and rec.calls[-1] == (False, "key_switch", "key_off")


async def test_key_switch_and_file_are_independent_sources(tmp_path: Path) -> None:
    root = tmp_path / "gpio"
    (root / "gpiochipK").mkdir(parents=True)
    mode, rec = monitor(tmp_path, key_config(root, active_low=False, bias="pull_down"))
    await mode.poll()
    set_level(root, "1")
    set_on(tmp_path, 5, "alice", now=T0)
    await mode.poll()
    assert rec.calls == [(True, "key_switch", "key_on"), (True, "local_cli", "set")]
    set_level(root, "0")
    await mode.poll()
    assert mode.is_on()  # the file still holds it
    assert mode.last_change is not None and mode.last_change["service_mode_on"] is True
    assert rec.calls[-1] == (False, "key_switch", "key_off")


async def test_unreadable_key_switch_fails_closed_and_recovers(tmp_path: Path) -> None:
    root = tmp_path / "gpio"  # the chip directory does not exist yet
    mode, rec = monitor(tmp_path, key_config(root))
    await mode.poll()
    s = mode.status()
    assert not s["on"] and "does not exist" in s["key_switch_error"]
    set_level(root, "0")  # creates the chip directory and turns the key
    await mode.poll()
    assert mode.is_on() and mode.status()["key_switch_error"] is None
    set_level(root, "x")  # garbage on the line: off, with the reason
    await mode.poll()
    assert not mode.is_on() and "not 0/1" in mode.status()["key_switch_error"]
    assert [c[0] for c in rec.calls] == [True, False]


async def test_gpiod_key_switch_on_a_missing_chip_fails_closed(tmp_path: Path) -> None:
    config = ServiceConfig(key_switch=KeySwitchConfig(backend="gpiod", chip="/dev/gpiochip-does-not-exist", line=4))
    mode, _ = monitor(tmp_path, config)
    await mode.poll()
    s = mode.status()
    assert s["on"] is False and s["key_switch"] is False
    assert "/dev/gpiochip-does-not-exist" in s["key_switch_error"]
    await mode.stop()


@pytest.mark.parametrize(
    "table",
    [
        {"backend": "sim", "chip": "c", "line": 1},  # sim needs root
        {"backend": "gpiod", "chip": "c", "line": 1, "root": "/tmp"},  # root is sim-only
        {"backend": "gpiod", "chip": "c", "line": -1},
        {"backend": "gpiod", "chip": "c", "line": 1, "activ_low": True},  # typo
        {"backend": "sysfs", "chip": "c", "line": 1},
    ],
)
def test_key_switch_config_is_strict(table: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ServiceConfig.model_validate({"key_switch": table})


# ---------------------------------------------------------------------------- polling task and audit


async def test_polling_task_reports_a_cli_change(tmp_path: Path) -> None:
    seen: asyncio.Queue[tuple[bool, str]] = asyncio.Queue()

    async def on_change(on: bool, source: str) -> None:
        await seen.put((on, source))

    mode = ServiceMode(tmp_path, None, on_change, poll_interval_s=0.02)
    await mode.start()
    try:
        set_on(tmp_path, 1, "alice")
        assert await asyncio.wait_for(seen.get(), 2.0) == (True, "local_cli")
        set_off(tmp_path)
        assert await asyncio.wait_for(seen.get(), 2.0) == (False, "local_cli")
    finally:
        await mode.stop()


async def test_a_failing_hook_does_not_stop_tracking(tmp_path: Path) -> None:
    async def broken(on: bool, source: str) -> None:
        raise RuntimeError("audit log unavailable")

    mode = ServiceMode(tmp_path, None, broken, clock=Clock())
    set_on(tmp_path, 5, "alice", now=T0)
    await mode.poll()
    assert mode.is_on()
    set_off(tmp_path)
    await mode.poll()
    assert not mode.is_on()


async def test_audit_hook_writes_the_command_audit_log(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "state", StoreConfig())
    try:
        clock = Clock()
        root = tmp_path / "gpio"
        (root / "gpiochipK").mkdir(parents=True)
        mode = ServiceMode(tmp_path, key_config(root), clock=clock)
        mode.on_change = audit_hook(store.ledger.audit, mode)
        await mode.poll()
        set_on(tmp_path, 15, "alice", now=T0)
        await mode.poll()
        set_level(root, "0")
        await mode.poll()
        clock.now += 15 * 60
        set_level(root, "1")
        await mode.poll()
        rows = await store.ledger.audit_entries()
    finally:
        await store.close()
    assert [(r.source, r.command, r.outcome) for r in rows] == [
        ("local_cli", "service_mode", "on"),
        ("key_switch", "service_mode", "on"),
        ("key_switch", "service_mode", "off"),
        ("local_cli", "service_mode", "off"),
    ]
    assert rows[0].command_id is None
    assert rows[0].params == {"reason": "set", "by": "alice", "until": T0 + 900, "at": T0, "service_mode_on": True}
    assert rows[0].message == "service mode on until 2025-01-01T10:27:30Z by alice"
    assert rows[3].params is not None and rows[3].params["reason"] == "expired"
    assert rows[3].params["service_mode_on"] is False
    assert rows[3].message is not None and "timed out" in rows[3].message


# ---------------------------------------------------------------------------- CLI


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = status_cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def agent_snapshot(state_dir: Path, service_mode: dict[str, Any], age_s: float = 0.0) -> None:
    """What a running (or, with an age, a dead) agent leaves in status.json."""
    write_json_atomic(
        status_path(state_dir),
        {
            "taken_at": time.time() - age_s,
            "taken_at_iso": "x",
            "written_mono": time.monotonic() - age_s,
            "boot_id": boot_id(),
            "service_mode": service_mode,
        },
    )


def test_cli_on_off_status(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUDO_USER", "alice")
    d = str(tmp_path)
    code, out, err = run_cli(["service-mode", "on", "--minutes", "45", "--state-dir", d], capsys)
    assert code == 0 and "service mode ON until" in out and "(45 min), by alice" in out
    assert "agent not running" in err  # told that nothing applies it yet
    content, _ = read_file(tmp_path)
    assert content is not None and content.until - content.at == 45 * 60 and content.by == "alice"

    # agent not running: the file's view, exit 1
    code, out, _ = run_cli(["service-mode", "status", "--state-dir", d], capsys)
    assert code == 1 and "service mode: ON (from the file only" in out and "by alice" in out
    code, out, _ = run_cli(["service-mode", "status", "--state-dir", d, "--json"], capsys)
    doc = json.loads(out)
    assert code == 1 and doc["on"] is True and doc["agent_running"] is False and doc["file"]["by"] == "alice"

    # agent running: its view wins (key switch included)
    agent_snapshot(tmp_path, {"on": True, "key_switch": True, "file_active": True})
    code, out, _ = run_cli(["service-mode", "status", "--state-dir", d], capsys)
    assert code == 0 and "service mode: ON\n" in out and "key switch: ON" in out

    code, out, err = run_cli(["service-mode", "off", "--state-dir", d], capsys)
    assert code == 0 and out.strip() == "service mode OFF" and "key switch is on" in err
    assert not service_mode_path(tmp_path).exists()
    code, out, _ = run_cli(["service-mode", "off", "--state-dir", d], capsys)
    assert code == 0 and "was not on" in out

    agent_snapshot(tmp_path, {"on": False, "key_switch": None, "file_active": False})
    code, out, _ = run_cli(["service-mode", "status", "--state-dir", d], capsys)
    assert code == 0 and "service mode: OFF" in out and "file: none" in out and "key switch: not configured" in out


def test_cli_default_is_thirty_minutes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    agent_snapshot(tmp_path, {"on": False}, age_s=0.0)
    code, _, err = run_cli(["service-mode", "on", "--state-dir", str(tmp_path)], capsys)
    content, _ = read_file(tmp_path)
    assert code == 0 and err == "" and content is not None and content.until - content.at == 30 * 60


def test_cli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path)
    for argv in (
        ["service-mode", "on", "--minutes", "0", "--state-dir", d],
        ["service-mode", "on", "--minutes", str(MAX_MINUTES + 1), "--state-dir", d],
        ["service-mode", "on", "--minutes", "ten", "--state-dir", d],
        ["service-mode", "maybe", "--state-dir", d],
    ):
        with pytest.raises(SystemExit) as exc:
            status_cli.main(argv)
        assert exc.value.code == 2, argv
    assert run_cli(["service-mode", "off", "--minutes", "5", "--state-dir", d], capsys)[0] == 2
    assert run_cli(["service-mode", "on", "--json", "--state-dir", d], capsys)[0] == 2
    assert not service_mode_path(tmp_path).exists()


def test_cli_cannot_write_the_state_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a directory where the file must go: unwritable for every user, root included
    service_mode_path(tmp_path).mkdir()
    code, _, err = run_cli(["service-mode", "on", "--state-dir", str(tmp_path)], capsys)
    assert code == 1 and "cannot write service mode" in err
    assert service_mode_path(tmp_path).is_dir()


def test_cli_missing_state_dir_is_a_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["service-mode", "on", "--state-dir", str(tmp_path / "nope")], capsys)
    assert code == 1 and "cannot write service mode" in err
