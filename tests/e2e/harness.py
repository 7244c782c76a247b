"""Drive ``charger-agent run`` as a subprocess against the in-process platform emulator.

The agent runs on ``config/sim.toml`` (every device simulated in the agent's own process;
a vehicle plugs into connector 1 about 3 s after each start). Everything the tests check
comes from outside the agent: what the emulator received, the agent's logs, and
(read-only) its state directory.

A :class:`Rig` owns one state directory and runs the agent in it any number of times in a
row (``start`` / ``kill9`` / ``sigterm``); each :class:`AgentRun` has its own simulator root
and log file.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from agent.emulator import Emulator, RequestKind
from agent.emulator.operator_models import CommandView, ReceivedRequest

REPO = Path(__file__).resolve().parents[2]
SIM_CONFIG = REPO / "config" / "sim.toml"

T = TypeVar("T")


class AgentDied(AssertionError):
    pass


@dataclass
class AgentRun:
    """One agent process."""

    index: int
    proc: asyncio.subprocess.Process
    log_path: Path
    sim_root: Path
    first_seq: int  # requests with a greater seq were (possibly) sent by this run
    exit_code: int | None = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


@dataclass
class Rig:
    """The emulator plus one agent state directory, run any number of times in sequence."""

    emulator: Emulator
    workdir: Path
    runs: list[AgentRun] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state_dir = self.workdir / "state"
        store = self.emulator.context.store
        issue = store.issue_token

        def capture(request: Any) -> Any:  # remember every access token handed out
            token, device = issue(request)
            self.tokens.append(token)
            return token, device

        store.issue_token = capture  # type: ignore[method-assign]

    # ------------------------------------------------------------------ processes

    @property
    def run(self) -> AgentRun:
        return self.runs[-1]

    async def start(self, config: Path | None = None) -> AgentRun:
        """Start the agent (same state dir, fresh simulator root and log file) on ``config``
        (default ``config/sim.toml``)."""
        assert not self.runs or self.run.proc.returncode is not None, "previous run still alive"
        index = len(self.runs) + 1
        sim_root = self.workdir / f"sim-{index}"
        log_path = self.workdir / f"agent-{index}.log"
        with log_path.open("w") as log_file:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent", "run",
                "--config", str(config or SIM_CONFIG),
                "--platform-url", self.emulator.api_url,
                "--state-dir", str(self.state_dir),
                "--sim-root", str(sim_root),
                stdout=log_file, stderr=log_file, stdin=asyncio.subprocess.DEVNULL,
                cwd=str(self.workdir),
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        run = AgentRun(index, proc, log_path, sim_root, self.last_seq())
        self.runs.append(run)
        return run

    async def kill9(self) -> None:
        run = self.run
        run.proc.kill()
        run.exit_code = await asyncio.wait_for(run.proc.wait(), 10)
        assert run.exit_code == -signal.SIGKILL

    async def sigterm(self, timeout: float = 40.0) -> int:
        run = self.run
        run.proc.send_signal(signal.SIGTERM)
        run.exit_code = await asyncio.wait_for(run.proc.wait(), timeout)
        return run.exit_code

    async def close(self) -> None:
        for run in self.runs:
            if run.proc.returncode is None:
                run.proc.kill()
                await run.proc.wait()

    def logs(self) -> str:
        return "\n".join(r.log_text() for r in self.runs)

    # ------------------------------------------------------------------ waiting

    async def until(self, what: str, check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1) -> Any:
        """Poll ``check`` (sync or async) until it returns something truthy; fail loudly."""
        deadline = time.monotonic() + timeout
        while True:
            if self.runs and self.run.proc.returncode is not None and self.run.exit_code is None:
                raise AgentDied(
                    f"agent run {self.run.index} exited ({self.run.proc.returncode}) while waiting for {what}\n"
                    + self.run.log_tail()
                )
            value = check()
            if isinstance(value, Awaitable):
                value = await value
            if value:
                return value
            if time.monotonic() > deadline:
                tail = self.run.log_tail() if self.runs else ""
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")
            await asyncio.sleep(interval)

    # ------------------------------------------------------------------ the emulator's view

    def last_seq(self) -> int:
        return max((r.seq for r in self.emulator.received()), default=0)

    def received(self, kind: RequestKind | None = None, since: int = 0) -> list[ReceivedRequest]:
        return [r for r in self.emulator.received(kind=kind) if r.seq > since]

    def events(self, since: int = 0, connector_id: int | None = 1) -> list[dict[str, Any]]:
        return [
            r.body
            for r in self.received(RequestKind.EVENTS, since)
            if r.accepted and isinstance(r.body, dict) and (connector_id is None or r.body.get("connector_id") == connector_id)
        ]

    def event_types(self, since: int = 0, connector_id: int | None = 1) -> list[str]:
        return [e["event_type"] for e in self.events(since, connector_id)]

    def command(self, command_id: str) -> CommandView:
        return self.emulator.context.store.command(command_id).view()

    def statuses(self, command_id: str) -> list[str]:
        return [s.status for s in self.command(command_id).statuses]

    def terminal(self, command_id: str) -> list[str]:
        return [s for s in self.statuses(command_id) if s in ("completed", "failed", "rejected")]

    def records(self) -> list[dict[str, Any]]:
        return [r.body for r in self.emulator.context.store.charging_records()]

    def record_with(self, transaction_id: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("transaction_id") == transaction_id]

    def rejected(self, since: int = 0) -> list[ReceivedRequest]:
        return [r for r in self.received(since=since) if not r.accepted]

    async def registered(self) -> None:
        """Wait for the current run's first accepted heartbeat."""
        first = self.run.first_seq
        await self.until(
            f"run {self.run.index} to send a heartbeat",
            lambda: any(r.accepted for r in self.received(RequestKind.HEARTBEAT, first)),
        )

    async def plugged(self, connector_id: int = 1) -> None:
        """Wait for the current run's plug_in event on ``connector_id``."""
        first = self.run.first_seq
        await self.until(
            f"run {self.run.index}: vehicle plugged into connector {connector_id}",
            lambda: "plug_in" in self.event_types(first, connector_id),
        )

    async def charging(self, connector_id: int = 1, since: int | None = None, count: int = 1) -> None:
        """Wait for ``count`` ``start`` events on ``connector_id`` (sent by this run by default)."""
        first = self.run.first_seq if since is None else since
        await self.until(
            f"run {self.run.index}: charging on connector {connector_id}",
            lambda: self.event_types(first, connector_id).count("start") >= count,
            timeout=45.0,
        )

    async def status_reached(self, command_id: str, *statuses: str, timeout: float = 30.0) -> None:
        await self.until(
            f"command {command_id} to reach {'/'.join(statuses)}",
            lambda: any(s in statuses for s in self.statuses(command_id)),
            timeout=timeout,
        )

    # ------------------------------------------------------------------ the agent's state directory (read-only)

    def query_state(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(f"file:{self.state_dir / 'agent.db'}?mode=ro", uri=True, timeout=5.0)
        try:
            return list(conn.execute(sql, args).fetchall())
        finally:
            conn.close()

    def open_session_count(self) -> int:
        try:
            return int(self.query_state("SELECT count(*) FROM open_session")[0][0])
        except sqlite3.Error:
            return -1

    def credentials(self) -> dict[str, Any]:
        return dict(json.loads((self.state_dir / "credentials.json").read_text()))

    def secrets(self) -> list[str]:
        """Every secret this device was given: its device secret and every access token."""
        found = [d.secret for d in self.emulator.context.store.devices()]
        creds = self.credentials()
        found.append(str(creds.get("device_secret")))
        found.extend(self.tokens)
        return sorted({s for s in found if s and s != "None"})


def sim_config_variant(
    workdir: Path, *, replace: dict[str, str] | None = None, append: str = ""
) -> Path:
    """A copy of ``config/sim.toml`` with exact-text replacements (each must match once) and
    extra TOML appended, written into ``workdir``."""
    text = SIM_CONFIG.read_text()
    for old, new in (replace or {}).items():
        assert text.count(old) == 1, f"{old!r} is not in sim.toml exactly once"
        text = text.replace(old, new)
    path = workdir / "sim-variant.toml"
    path.write_text(text + append)
    return path


def agent_status(rig: Rig) -> dict[str, Any]:
    """The agent's own status snapshot (``{state_dir}/status.json``), read-only."""
    return dict(json.loads((rig.state_dir / "status.json").read_text()))


def assert_no_secrets_logged(rig: Rig) -> None:
    secrets = rig.secrets()
    assert secrets and len(rig.tokens) >= 1, "no secret to look for: the scenario did not authenticate"
    for run in rig.runs:
        text = run.log_text()
        assert text, f"run {run.index} wrote no log"
        for secret in secrets:
            assert secret not in text, f"a secret ({secret[:6]}...) appears in {run.log_path}"
            # a secret must not leak in part either (e.g. a truncated header in an error message)
            assert secret[-16:] not in text, f"part of a secret appears in {run.log_path}"


async def with_rig(workdir: Path, scenario: Callable[[Rig], Awaitable[T]], *, token_ttl: float = 3600.0) -> T:
    """Run ``scenario`` with a started emulator and a rig; always stop every process."""
    emulator = Emulator(token_ttl=token_ttl)
    await emulator.start(host="127.0.0.1", port=0)
    rig = Rig(emulator, workdir)
    try:
        return await scenario(rig)
    finally:
        await rig.close()
        await emulator.stop()


def run_scenario(tmp_path_factory: Any, name: str, scenario: Callable[[Rig], Awaitable[Rig]]) -> Rig:
    """Run ``scenario`` to completion in its own event loop and return the finished rig.

    For module-scoped fixtures (which are synchronous): each e2e module runs its scenario
    once and its tests assert on what was recorded, so the slow parts -- start-up and the
    ~8 s DC cable check of every session -- are shared between assertions.
    """
    workdir: Path = tmp_path_factory.mktemp(name)
    return asyncio.run(with_rig(workdir, scenario))
