"""End to end with real processes: emulator, a systemd stand-in, real A/B releases.

Runs only once the runtime integration is in (``[firmware]`` in the config model). The
initial release 0.1.0 and the updates are venvs built from this source tree (the wheel
from :mod:`agent.firmware.build`, dependencies copied offline from the test venv). The
supervisor does what the documented unit does: ``ExecStartPre`` = the *stable*
release's ``python -m agent.firmware.boot``, ``ExecStart`` = ``current/bin/charger-agent
run``, ``Restart=always``, a fresh ``INVOCATION_ID`` per start.

Scenarios, in sequence on one charger:

1. 0.2.0 (good): downloaded, installed, restarted into, heartbeat -> ``success``/``completed``;
2. 0.3.0 never goes online (uplink removed): its own gate rolls back after
   ``health_timeout_s``; 0.2.0 reports ``failed``;
3. 0.4.0 crashes at every start: the boot gate rolls back after 3 starts; 0.2.0 reports ``failed``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from agent.config import AgentConfig
from agent.firmware import boot
from agent.firmware.boot import EXIT_UPGRADE_RESTART
from agent.firmware.build import BuildResult, build_bundle
from agent.firmware.bundle import open_bundle

from .helpers import ROOT, make_keys

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif("firmware" not in AgentConfig.model_fields, reason="runtime integration of [firmware] not present"),
]
HEALTH_TIMEOUT_S = 15


@dataclass
class Outcome:
    commands: dict[str, list[tuple[str, str | None]]] = field(default_factory=dict)
    firmware: dict[str, list[tuple[str, int | None, str | None]]] = field(default_factory=dict)
    runs: list[tuple[str | None, int | None]] = field(default_factory=list)
    links: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    releases: list[str] = field(default_factory=list)


def _variant(work: Path, name: str, patch: Callable[[Path], None]) -> Path:
    src = work / f"src-{name}"
    for part in ("agent", "hal"):
        shutil.copytree(ROOT / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", src / "pyproject.toml")
    patch(src)
    return src


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path}: {old!r} not found (update the test's patch)"
    path.write_text(text.replace(old, new, 1))


def _no_uplink(src: Path) -> None:
    _replace(src / "agent" / "runtime.py", "await channel.start()", "pass  # broken release: never online")


def _crash(src: Path) -> None:
    _replace(src / "agent" / "runtime.py", "return await Agent(loaded).run(stop)", "raise SystemExit('broken release')")


async def _scenario(work: Path) -> Outcome:
    from aiohttp import web

    from agent.emulator import Emulator, RequestKind
    from agent.firmware.installers import VenvReleaseBuilder

    root, state = work / "opt", work / "state"
    keys = make_keys(work / "keys")

    def build(version: str, source: Path) -> BuildResult:
        return build_bundle(version=version, key=keys.private_pem, out_dir=work / "dist", source=source)

    first = build("0.1.0", ROOT)
    bundles = {
        "0.2.0": build("0.2.0", ROOT),
        "0.3.0": build("0.3.0", _variant(work, "no-uplink", _no_uplink)),
        "0.4.0": build("0.4.0", _variant(work, "crash", _crash)),
    }
    # the initial install, as the installer lays it out
    await VenvReleaseBuilder()(open_bundle(first.bundle, work / "x", max_bytes=10**9), root / "releases" / "0.1.0")
    boot.switch_link(root, "current", "0.1.0")
    boot.switch_link(root, "stable", "0.1.0")

    config = work / "charger.toml"
    config.write_text(
        (ROOT / "config" / "sim.toml").read_text()
        + f'\n[firmware]\npublic_key = "{keys.public_b64}"\ninstall_root = "{root}"\n'
        f"health_timeout_s = {HEALTH_TIMEOUT_S}\nmax_boot_attempts = 3\n"
    )
    emulator = Emulator()
    await emulator.start(host="127.0.0.1", port=0)
    app = web.Application()
    app.router.add_static("/fw", work / "dist")
    files = web.AppRunner(app)
    await files.setup()
    site = web.TCPSite(files, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/fw"  # type: ignore[union-attr]
    outcome = Outcome()
    stop = asyncio.Event()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}

    async def supervisor() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            run_env = {**env, "INVOCATION_ID": uuid.uuid4().hex, "PYTHONUNBUFFERED": "1"}
            pre = await asyncio.create_subprocess_exec(
                str(root / "stable" / "bin" / "python"), "-m", "agent.firmware.boot",
                "--install-root", str(root), "--state-dir", str(state),
                env=run_env, cwd=str(work), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )
            await pre.wait()  # ExecStartPre=- : its result does not matter
            release = boot.release_of(root)
            with open(work / f"agent-{n}.log", "w") as log:
                proc = await asyncio.create_subprocess_exec(
                    str(root / "current" / "bin" / "charger-agent"), "run", "-c", str(config),
                    "--platform-url", emulator.api_url, "--state-dir", str(state), "--sim-root", str(work / f"sim-{n}"),
                    env=run_env, cwd=str(work), stdout=log, stderr=log,
                )
            done = asyncio.ensure_future(proc.wait())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({done, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not done.done():
                proc.terminate()
                await proc.wait()
            stopped.cancel()
            outcome.runs.append((release, proc.returncode))
            await asyncio.sleep(0.3)

    def statuses(command_id: str) -> list[tuple[str, str | None]]:
        try:
            return [(s.status, s.message) for s in emulator.context.store.command(command_id).view().statuses]
        except Exception:
            return []

    def firmware(version: str) -> list[tuple[str, int | None, str | None]]:
        return [
            (r.body["status"], r.body.get("progress"), r.body.get("message"))
            for r in emulator.received(kind=RequestKind.FIRMWARE_STATUS)
            if r.accepted and isinstance(r.body, dict) and r.body.get("firmware_version") == version
        ]

    async def until(what: str, check: Callable[[], Any], timeout: float) -> None:
        end = time.monotonic() + timeout
        while not check():
            if time.monotonic() > end:
                logs = "\n".join(p.read_text()[-3000:] for p in sorted(work.glob("agent-*.log"))[-2:])
                raise AssertionError(f"timed out waiting for {what}; runs {outcome.runs}\n{logs}")
            await asyncio.sleep(0.2)

    task = asyncio.create_task(supervisor())
    try:
        await until("first heartbeat", lambda: emulator.received(kind=RequestKind.HEARTBEAT), 60)
        for version, result in bundles.items():
            cid = f"fw-{version}"
            emulator.queue_command(command="firmware_upgrade", params=result.params(base), command_id=cid)
            await until(f"{cid} to end", lambda: any(s in ("completed", "failed") for s, _ in statuses(cid)), 180)  # noqa: B023
            outcome.links[version] = (boot.release_of(root), boot.release_of(root, "stable"))
        for version in bundles:  # firmware statuses go out after command statuses (priority)
            await until(
                f"final firmware status of {version}",
                lambda: any(s in ("success", "failed") for s, _, _ in firmware(version)),  # noqa: B023
                120,
            )
            outcome.firmware[version] = firmware(version)
            outcome.commands[version] = statuses(f"fw-{version}")
        outcome.releases = sorted(p.name for p in (root / "releases").iterdir())
    finally:
        stop.set()
        await task
        await files.cleanup()
        await emulator.stop()
    return outcome


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    return asyncio.run(_scenario(tmp_path_factory.mktemp("fw-e2e")))


def test_good_update_installs_restarts_and_reports_success(outcome: Outcome) -> None:
    assert [s for s, _ in outcome.commands["0.2.0"]] == ["accepted", "accepted", "accepted", "completed"]
    assert outcome.commands["0.2.0"][-1][1] == "firmware 0.2.0 installed and running"
    fw = outcome.firmware["0.2.0"]
    assert fw[0] == ("downloading", 0, "Downloading...") and ("downloading", 100, "Downloading...") in fw
    assert [s for s, _, _ in fw][-3:] == ["upgrading", "upgrading", "success"]
    assert outcome.links["0.2.0"] == ("0.2.0", "0.2.0")
    assert ("0.1.0", EXIT_UPGRADE_RESTART) in outcome.runs


def test_update_that_never_gets_online_is_rolled_back(outcome: Outcome) -> None:
    last = outcome.commands["0.3.0"][-1]
    assert last[0] == "failed" and last[1] is not None
    assert f"did not become healthy (no successful heartbeat) within {HEALTH_TIMEOUT_S} s" in last[1]
    assert last[1].endswith("0.2.0 is running")
    assert outcome.firmware["0.3.0"][-1][0] == "failed"
    assert outcome.links["0.3.0"] == ("0.2.0", "0.2.0")
    assert ("0.3.0", EXIT_UPGRADE_RESTART) in outcome.runs  # it restarted itself into 0.2.0


def test_update_that_crashes_at_start_is_rolled_back_by_the_boot_gate(outcome: Outcome) -> None:
    last = outcome.commands["0.4.0"][-1]
    assert last == ("failed", "version 0.4.0 did not become healthy in 3 start(s); 0.2.0 is running")
    assert outcome.firmware["0.4.0"][-1][0] == "failed"
    assert [r for r in outcome.runs if r[0] == "0.4.0"] == [("0.4.0", 1)] * 3
    assert outcome.links["0.4.0"] == ("0.2.0", "0.2.0")
    assert outcome.releases == ["0.1.0", "0.2.0"]  # failed releases removed
