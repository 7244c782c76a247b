"""FirmwareManager: the statuses of both channels, deferral, install_at, rollback, restarts.

Each test is one charger: the "old" manager (running 0.1.0) downloads from a real HTTP
server on 127.0.0.1, verifies and installs; a "restart" is a new manager over the same
KV store/outbox with the version the ``current`` link now runs. Releases are tiny
stand-ins (a script printing the version); the real venv build is in test_real_bundle.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.firmware import boot
from agent.firmware.manager import PENDING_KEY, FirmwareRejected

from .helpers import FakeBuilder, FileServer, Rig, fake_bundle, layout, make_keys, params, run_current


@pytest.fixture
async def server():  # type: ignore[no-untyped-def]
    srv = await FileServer().start()
    yield srv
    await srv.stop()


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    r = Rig(tmp_path, make_keys(tmp_path / "keys"))
    layout(r.root, "0.1.0")
    return r


def _progress(rig: Rig) -> list[int]:
    return [s["progress"] for s in rig.outbox.firmware() if s["status"] == "downloading" and "verified" not in s.get("message", "")]


def _fw_statuses(rig: Rig) -> list[str]:
    out: list[str] = []
    for s in rig.outbox.firmware():
        if not out or out[-1] != s["status"]:
            out.append(s["status"])
    return out


def _restart(rig: Rig, running: str, builder: FakeBuilder) -> tuple[object, str]:
    """What systemd does: the launcher's boot check, then the agent of ``current``."""
    decision = boot.check_boot(rig.root, rig.state, now=rig.time.now, invocation=f"inv-{rig.time.now}")
    return rig.manager(running, builder), decision.action


async def test_signed_update_installs_and_runs(rig: Rig, server: FileServer) -> None:
    result = fake_bundle(rig.tmp, rig.keys)
    url = server.add(result.bundle.name, result.bundle.read_bytes())
    builder = FakeBuilder()
    old = rig.manager("0.1.0", builder)
    await old.run(params(result, url), "cmd-1")
    assert rig.restarts == ["agent"]
    assert run_current(rig.root) == (0, "charger-agent 0.2.0")
    assert _fw_statuses(rig) == ["downloading", "upgrading"]
    assert rig.statuses.statuses() == ["accepted", "accepted", "accepted"]
    record = await rig.kv.get(PENDING_KEY)
    assert record["stage"] == "restarting" and record["previous"] == "0.1.0"
    assert old.alive_command_ids() == {"cmd-1"}

    new, action = _restart(rig, "0.2.0", builder)
    assert action == "counted"
    assert await new.load() is not None and new.alive_command_ids() == {"cmd-1"}  # spared by the runtime
    heartbeats = iter([False, False, True])
    await new.after_start(lambda: next(heartbeats))  # type: ignore[attr-defined]

    fw = rig.outbox.firmware()
    assert all(s["firmware_version"] == "0.2.0" for s in fw)
    assert _progress(rig) == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert _fw_statuses(rig) == ["downloading", "upgrading", "success"]
    assert fw[-1] == {"firmware_version": "0.2.0", "status": "success", "progress": 100, "message": "version 0.2.0 running and online"}
    cid, status, message, details = rig.statuses.last()
    assert (cid, status) == ("cmd-1", "completed") and message == "firmware 0.2.0 installed and running"
    assert details == {"version": "0.2.0", "previous_version": "0.1.0", "installer": "app_ab"}
    assert [c[2] for c in rig.statuses.calls[:3]] == ["downloading firmware 0.2.0", "installing 0.2.0", "restarting into 0.2.0"]
    assert await rig.kv.get(PENDING_KEY) is None
    assert boot.release_of(rig.root, "stable") == "0.2.0" and boot.read_state(rig.state) is None
    assert run_current(rig.root) == (0, "charger-agent 0.2.0")
    assert list((rig.state / "firmware").iterdir()) == []  # downloads cleaned up


async def _expect_failed(rig: Rig, reason: str, restarts: tuple[str, ...] = ()) -> None:
    assert rig.restarts == list(restarts)
    assert rig.outbox.firmware()[-1]["status"] == "failed"
    assert reason in rig.outbox.firmware()[-1]["message"]
    cid, status, message, _ = rig.statuses.last()
    assert status == "failed" and message is not None and reason in message
    assert await rig.kv.get(PENDING_KEY) is None
    assert run_current(rig.root) == (0, "charger-agent 0.1.0")  # the old version still runs
    assert not (rig.root / "releases" / "0.2.0").exists()
    assert boot.read_state(rig.state) is None


async def test_progress_reports_are_rate_limited(rig: Rig, server: FileServer) -> None:
    """A download faster than progress_interval_s reports 0 and 100 only (shared 60/min budget)."""
    result = fake_bundle(rig.tmp, rig.keys)
    url = server.add(result.bundle.name, result.bundle.read_bytes())
    await rig.manager("0.1.0", FakeBuilder(), progress_interval_s=3600).run(params(result, url), "cmd-1")
    assert _progress(rig) == [0, 100]


async def test_tampered_update_fails_with_the_old_version_running(rig: Rig, server: FileServer) -> None:
    result = fake_bundle(rig.tmp, rig.keys)
    data = bytearray(result.bundle.read_bytes())
    data[len(data) // 3] ^= 0xFF
    url = server.add(result.bundle.name, bytes(data))
    builder = FakeBuilder()
    await rig.manager("0.1.0", builder).run(params(result, url), "cmd-1")
    await _expect_failed(rig, "checksum mismatch")
    assert builder.calls == []
    assert _fw_statuses(rig) == ["downloading", "failed"]
    assert not list((rig.state / "firmware").glob("*.bundle"))  # the bad download is not kept


async def test_tampered_update_without_checksum_fails_the_signature(rig: Rig, server: FileServer) -> None:
    result = fake_bundle(rig.tmp, rig.keys)
    data = bytearray(result.bundle.read_bytes())
    data[-100] ^= 0x01
    url = server.add(result.bundle.name, bytes(data))
    await rig.manager("0.1.0", FakeBuilder()).run(params(result, url, checksum=None), "cmd-1")
    await _expect_failed(rig, "signature verification failed")


async def test_wrong_signature_fails_with_the_old_version_running(rig: Rig, server: FileServer) -> None:
    other = make_keys(rig.tmp / "attacker", "attacker")
    result = fake_bundle(rig.tmp / "evil", other)  # correct checksum, signed with another key
    url = server.add(result.bundle.name, result.bundle.read_bytes())
    builder = FakeBuilder()
    await rig.manager("0.1.0", builder).run(params(result, url), "cmd-1")
    await _expect_failed(rig, "not signed by the configured key")
    assert builder.calls == []


async def test_signature_fetched_next_to_the_bundle_when_not_in_params(rig: Rig, server: FileServer) -> None:
    result = fake_bundle(rig.tmp, rig.keys, size=10_000)
    url = server.add(result.bundle.name, result.bundle.read_bytes())
    server.add(result.bundle.name + ".sig", result.signature_file.read_bytes())
    await rig.manager("0.1.0", FakeBuilder()).run(params(result, url, signature=None, checksum=None), "cmd-1")
    assert rig.restarts == ["agent"]
    # and without a .sig anywhere the upgrade fails
    rig2 = Rig(rig.tmp / "second", rig.keys)
    layout(rig2.root)
    server.files.pop(result.bundle.name + ".sig")
    await rig2.manager("0.1.0", FakeBuilder()).run(params(result, url, signature=None), "cmd-2")
    await _expect_failed(rig2, "no signature")


async def test_bundle_of_another_version_fails(rig: Rig, server: FileServer) -> None:
    result = fake_bundle(rig.tmp, rig.keys, version="0.3.0", size=1000)
    url = server.add(result.bundle.name, result.bundle.read_bytes())
    await rig.manager("0.1.0", FakeBuilder()).run(params(result, url, version="0.2.0"), "cmd-1")
    await _expect_failed(rig, "bundle is version 0.3.0, the command asked for 0.2.0")


async def test_download_failure_and_install_failure_are_reported(rig: Rig, server: FileServer) -> None:
    result = fake_bundle(rig.tmp, rig.keys, size=1000)
    await rig.manager("0.1.0", FakeBuilder()).run(params(result, server.base + "/fw/missing"), "cmd-1")
    await _expect_failed(rig, "download failed: HTTP 404")
    url = server.add(result.bundle.name, result.bundle.read_bytes())
    await rig.manager("0.1.0", FakeBuilder(fail="smoke test (charger-agent --version) failed")).run(params(result, url), "cmd-2")
    await _expect_failed(rig, "smoke test")
    assert rig.holds == ["firmware_upgrade", None]  # charging was held for the install and released


async def test_failure_after_the_switch_switches_back(rig: Rig, server: FileServer) -> None:
    result = fake_bundle(rig.tmp, rig.keys, size=10_000)
    url = server.add(result.bundle.name, result.bundle.read_bytes())
    rig.restart_error = RuntimeError("stop event gone")
    await rig.manager("0.1.0", FakeBuilder()).run(params(result, url), "cmd-1")
    await _expect_failed(rig, "after installing: RuntimeError: stop event gone")


async def test_new_version_that_never_becomes_healthy_is_rolled_back(rig: Rig, server: FileServer) -> None:
    result = fake_bundle(rig.tmp, rig.keys, size=10_000)
    url = server.add(result.bundle.name, result.bundle.read_bytes())
    builder = FakeBuilder()
    await rig.manager("0.1.0", builder, health_timeout_s=300).run(params(result, url), "cmd-1")
    assert run_current(rig.root) == (0, "charger-agent 0.2.0")

    new, _ = _restart(rig, "0.2.0", builder)
    start = rig.time.now
    await new.after_start(lambda: False)  # type: ignore[attr-defined]  # never online
    assert rig.time.now - start >= 299
    assert rig.restarts == ["agent", "agent"]  # the rollback restarts into the old version
    assert run_current(rig.root) == (0, "charger-agent 0.1.0")
    assert rig.statuses.statuses()[-1] == "accepted"  # the old version reports, not the broken one

    old, action = _restart(rig, "0.1.0", builder)
    assert action == "none"
    await old.after_start(lambda: True)  # type: ignore[attr-defined]
    await _expect_failed(
        rig, "did not become healthy (no successful heartbeat) within 300 s; rolled back to 0.1.0", ("agent", "agent")
    )
    assert _fw_statuses(rig) == ["downloading", "upgrading", "failed"]
    assert rig.statuses.last()[3] == {"version": "0.2.0", "running_version": "0.1.0"}


async def test_new_version_that_cannot_start_is_rolled_back_by_the_boot_gate(rig: Rig, server: FileServer) -> None:
    result = fake_bundle(rig.tmp, rig.keys, size=10_000)
    url = server.add(result.bundle.name, result.bundle.read_bytes())
    builder = FakeBuilder(exit_code=1)
    await rig.manager("0.1.0", builder).run(params(result, url), "cmd-1")
    actions = []
    for attempt in range(6):  # systemd Restart=always, ExecStartPre = the boot check
        decision = boot.check_boot(rig.root, rig.state, now=rig.time.now, invocation=f"start-{attempt}")
        actions.append(decision.action)
        rc, _ = run_current(rig.root)
        if rc == 0:
            break
        rig.time.now += 5
    assert actions == ["counted", "counted", "counted", "rolled_back"]
    old = rig.manager("0.1.0", builder)
    await old.after_start(lambda: True)
    await _expect_failed(rig, "version 0.2.0 did not become healthy in 3 start(s); 0.1.0 is running", ("agent",))


async def test_update_during_a_session_is_deferred(rig: Rig, server: FileServer) -> None:
    result = fake_bundle(rig.tmp, rig.keys, size=10_000)
    url = server.add(result.bundle.name, result.bundle.read_bytes())
    builder = FakeBuilder()
    rig.session = True
    manager = rig.manager("0.1.0", builder)
    task = manager.submit("cmd-1", params(result, url))
    for _ in range(2000):
        await asyncio.sleep(0)
        if any(c[3] and c[3].get("deferred") for c in rig.statuses.calls) and rig.time.now > 1_800_000_100:
            break
    assert not task.done()
    assert builder.calls == [] and rig.restarts == [] and run_current(rig.root) == (0, "charger-agent 0.1.0")
    deferred = [c for c in rig.statuses.calls if c[3] and c[3].get("deferred")]
    assert len(deferred) == 1 and deferred[0][1] == "accepted"
    assert deferred[0][2] == "installation deferred: a charging session is active"
    assert rig.outbox.firmware()[-1]["message"] == "verified; installation deferred until no charging session is active"
    assert (await rig.kv.get(PENDING_KEY))["stage"] == "deferred"
    with pytest.raises(FirmwareRejected, match="already in progress"):
        manager.submit("cmd-2", params(result, url))
    rig.session = False
    await asyncio.wait_for(task, 5)
    assert len(builder.calls) == 1 and rig.restarts == ["agent"]
    assert rig.holds == ["firmware_upgrade"]  # connectors held off for the install and the restart
    assert run_current(rig.root) == (0, "charger-agent 0.2.0")


async def test_session_starting_at_the_last_moment_defers_again(rig: Rig, server: FileServer) -> None:
    result = fake_bundle(rig.tmp, rig.keys, size=10_000)
    url = server.add(result.bundle.name, result.bundle.read_bytes())
    builder = FakeBuilder()
    calls = iter([False, True, True, False, False])  # idle, then a session starts before the hold
    manager = rig.manager("0.1.0", builder)
    manager.any_session = lambda: next(calls, False)
    await manager.run(params(result, url), "cmd-1")
    assert [c for c in rig.statuses.calls if c[3] and c[3].get("deferred")]
    assert len(builder.calls) == 1 and rig.restarts == ["agent"]
    assert rig.holds == ["firmware_upgrade", None, "firmware_upgrade"]


async def test_install_at_is_honoured(rig: Rig, server: FileServer) -> None:
    from datetime import datetime, timezone

    result = fake_bundle(rig.tmp, rig.keys, size=10_000)
    url = server.add(result.bundle.name, result.bundle.read_bytes())
    builder = FakeBuilder()
    at = rig.time.now + 3600
    installed_at: list[float] = []

    async def build(bundle, target):  # type: ignore[no-untyped-def]
        installed_at.append(rig.time.now)
        await builder(bundle, target)

    when = datetime.fromtimestamp(at, timezone.utc)
    await rig.manager("0.1.0", build).run(params(result, url, install_at=when.isoformat()), "cmd-1")
    assert installed_at and installed_at[0] >= at
    scheduled = [c for c in rig.statuses.calls if c[2] and "scheduled" in c[2]]
    assert scheduled and scheduled[0][3] == {"install_at": when.strftime("%Y-%m-%dT%H:%M:%SZ")}
    assert any("scheduled" in s.get("message", "") for s in rig.outbox.firmware())


async def test_restart_before_install_fails_the_command(rig: Rig, server: FileServer) -> None:
    await rig.kv.set(PENDING_KEY, {"command_id": "cmd-9", "version": "0.2.0", "stage": "deferred", "from_version": "0.1.0"})
    manager = rig.manager("0.1.0", FakeBuilder())
    await manager.load()
    assert manager.alive_command_ids() == {"cmd-9"}
    await manager.after_start(lambda: True)
    assert rig.statuses.last()[:2] == ("cmd-9", "failed")
    assert "interrupted by an agent restart while deferred" in (rig.statuses.last()[2] or "")
    assert rig.outbox.firmware()[-1]["status"] == "failed"
    assert await rig.kv.get(PENDING_KEY) is None


async def test_restart_during_install_fails_the_command(rig: Rig, server: FileServer) -> None:
    await rig.kv.set(
        PENDING_KEY,
        {"command_id": "cmd-8", "version": "0.2.0", "stage": "installing", "from_version": "0.1.0", "installer": "app_ab"},
    )
    (rig.root / "releases" / "0.2.0").mkdir()  # half-built release
    await rig.manager("0.1.0", FakeBuilder()).after_start(lambda: True)
    assert rig.statuses.last()[:3] == ("cmd-8", "failed", "installation interrupted by an agent restart; 0.1.0 is running")
    assert not (rig.root / "releases" / "0.2.0").exists()


async def test_rejections_and_same_version(rig: Rig, server: FileServer) -> None:
    result = fake_bundle(rig.tmp, rig.keys, version="0.1.0", size=1000)
    url = server.add(result.bundle.name, result.bundle.read_bytes())
    no_key = rig.manager("0.1.0", FakeBuilder(), public_key=None)
    with pytest.raises(FirmwareRejected, match="public_key"):
        no_key.submit("cmd-0", params(result, url))
    manager = rig.manager("0.1.0", FakeBuilder())
    await manager.submit("cmd-1", params(result, url))
    assert rig.statuses.statuses() == ["accepted", "completed"]
    assert rig.statuses.last()[2] == "version 0.1.0 is already running"
    assert rig.outbox.firmware() == [
        {"firmware_version": "0.1.0", "status": "success", "progress": 100, "message": "version 0.1.0 is already running"}
    ]


async def test_rauc_path_reboots_and_marks_good(rig: Rig, server: FileServer) -> None:
    from agent.firmware.installers import RaucInstaller

    from .helpers import write_script

    log = rig.tmp / "rauc.log"
    rauc = rig.tmp / "bin" / "rauc"
    write_script(rauc, f'echo "$@" >> {log}')
    result = fake_bundle(rig.tmp, rig.keys, size=10_000, suffix=".raucb")
    url = server.add(result.bundle.name, result.bundle.read_bytes())
    installers = {"rauc": RaucInstaller(rauc=str(rauc))}
    await rig.manager("0.1.0", installers=installers).run(params(result, url), "cmd-1")  # type: ignore[arg-type]
    assert rig.restarts == ["system"]
    assert any(line.startswith("install ") for line in log.read_text().splitlines())
    await rig.manager("0.2.0", installers=installers).after_start(lambda: True)  # type: ignore[arg-type]
    assert rig.statuses.last()[1] == "completed" and rig.outbox.firmware()[-1]["status"] == "success"
    assert log.read_text().splitlines()[-1] == "status mark-good booted"


async def test_works_with_the_real_state_store(tmp_path: Path, server: FileServer) -> None:
    """KV and outbox signatures of agent.store are what the manager uses."""
    from agent.store import Store

    rig = Rig(tmp_path, make_keys(tmp_path / "keys"))
    layout(rig.root)
    store = await Store.open(tmp_path / "db")
    try:
        rig.kv = store.kv  # type: ignore[assignment]
        rig.outbox = store.outbox  # type: ignore[assignment]
        result = fake_bundle(rig.tmp, rig.keys, size=300_000)
        url = server.add(result.bundle.name, result.bundle.read_bytes())
        await rig.manager("0.1.0", FakeBuilder()).run(params(result, url), "cmd-1")
        assert (await store.kv.get(PENDING_KEY))["stage"] == "restarting"
        await rig.manager("0.2.0", FakeBuilder()).after_start(lambda: True)
        items = await store.outbox.next_batch(100, kinds=["firmware_status"])
        statuses = [i.payload["status"] for i in items]
        assert statuses[0] == "downloading" and statuses[-1] == "success" and "upgrading" in statuses
        assert await store.kv.get(PENDING_KEY) is None
    finally:
        await store.close()


async def test_expiry_is_checked_again_when_a_deferred_install_would_start(rig: Rig, server: FileServer) -> None:
    result = fake_bundle(rig.tmp, rig.keys, size=10_000)
    url = server.add(result.bundle.name, result.bundle.read_bytes())
    builder = FakeBuilder()
    rig.session = True
    manager = rig.manager("0.1.0", builder)
    task = manager.submit("cmd-1", params(result, url), expiry=rig.time.now + 60)
    for _ in range(2000):
        await asyncio.sleep(0)
        if any(c[3] and c[3].get("deferred") for c in rig.statuses.calls) and rig.time.now > 1_800_000_120:
            break
    rig.session = False  # the session ends after the command's expiry
    await asyncio.wait_for(task, 5)
    cid, status, message, _ = rig.statuses.last()
    assert (cid, status, message) == ("cmd-1", "rejected", "expired")
    assert builder.calls == [] and rig.restarts == [] and run_current(rig.root) == (0, "charger-agent 0.1.0")
    assert rig.outbox.firmware()[-1]["status"] == "failed"
    assert await rig.kv.get(PENDING_KEY) is None


async def test_a_successful_upgrade_records_the_installed_version(rig: Rig, server: FileServer) -> None:
    result = fake_bundle(rig.tmp, rig.keys)
    url = server.add(result.bundle.name, result.bundle.read_bytes())
    builder = FakeBuilder()
    await rig.manager("0.1.0", builder).run(params(result, url), "cmd-1")
    new, _ = _restart(rig, "0.2.0", builder)
    await new.load()
    assert new.installed_version is None
    await new.after_start(lambda: True)  # type: ignore[attr-defined]
    assert new.installed_version == "0.2.0" and await rig.kv.get("firmware_installed_version") == "0.2.0"
    later = rig.manager("0.2.0", builder)
    await later.load()
    assert later.installed_version == "0.2.0"  # registration sends this from now on
