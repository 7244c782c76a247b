"""agent.service.sdnotify against a real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.service.sdnotify import IDLE, Notifier, Watchdog, watchdog_interval


class FakeSystemd:
    """The receiving end of ``$NOTIFY_SOCKET``."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)

    def messages(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[tuple[FakeSystemd, str]]:
    path = str(tmp_path / "notify.sock")
    fake = FakeSystemd(path)
    yield fake, path
    fake.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------- Notifier


def test_no_socket_is_a_silent_no_op() -> None:
    n = Notifier(env={})
    assert not n.enabled
    assert n.ready("up") is False
    assert n.status("x") is False and n.watchdog() is False and n.stopping() is False


def test_ready_status_stopping_watchdog_arrive(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    n = Notifier(env={"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("2 connectors, uplink connecting")
    assert n.status("charging on 1\nfault F-0204")  # a newline would start a new assignment
    assert n.watchdog()
    assert n.stopping("closing sessions")
    assert n.extend_timeout(30)
    assert fake.messages() == [
        "READY=1\nSTATUS=2 connectors, uplink connecting",
        "STATUS=charging on 1 fault F-0204",
        "WATCHDOG=1",
        "STOPPING=1\nSTATUS=closing sessions",
        "EXTEND_TIMEOUT_USEC=30000000",
    ]
    n.close()


def test_abstract_namespace_socket() -> None:
    name = f"charger-agent-test-{uuid.uuid4().hex}"
    fake = FakeSystemd(b"\0" + name.encode())
    try:
        n = Notifier(env={"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert fake.messages() == ["READY=1"]
    finally:
        fake.close()


def test_send_failure_does_not_raise(tmp_path: Path) -> None:
    n = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.enabled
    assert n.watchdog() is False  # nobody listening: reported, not raised
    assert Notifier(env={"NOTIFY_SOCKET": "vsock:2:1234"}).enabled is False


def test_module_helpers_use_notify_socket(systemd: tuple[FakeSystemd, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.service import sdnotify

    fake, path = systemd
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setattr(sdnotify, "_default", None)
    assert sdnotify.notify_ready("up")
    assert sdnotify.notify_status("idle")
    assert sdnotify.notify_stopping()
    assert fake.messages() == ["READY=1\nSTATUS=up", "STATUS=idle", "STOPPING=1"]
    sdnotify.default_notifier().close()


def test_watchdog_interval_from_environment() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    pid = os.getpid()
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(pid)}) == 2.0
    # another process inherited the variables: not ours to feed
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(pid + 1)}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "x"}) is None


# ---------------------------------------------------------------------------- Watchdog (fake clock)


def make_watchdog(path: str, clock: FakeClock, interval: float = 10.0) -> Watchdog:
    return Watchdog(notifier=Notifier(env={"NOTIFY_SOCKET": path}), interval_s=interval, clock=clock)


def test_pings_only_while_every_task_progresses(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    clock = FakeClock()
    wd = make_watchdog(path, clock)
    assert wd.period_s == 5.0  # WATCHDOG_USEC / 2
    wd.register("control", max_age_s=3.0)
    wd.register("uplink", max_age_s=60.0)
    wd.register("outbox", max_age_s=30.0)

    assert wd.check() is True
    assert fake.messages() == ["WATCHDOG=1"]

    with capture_logs() as logs:
        # the control loop hangs; the others keep going
        for _ in range(4):
            clock.now += 2.0
            wd.beat("uplink")
            wd.beat("outbox")
            wd.check()
    # t+2 still fresh (ping); from t+4 the control loop is 4 s old > 3 s: pings stop
    assert fake.messages() == ["WATCHDOG=1", "STATUS=watchdog: control: no progress for 4 s (allowed 3 s)"]
    starving = [e for e in logs if e["event"] == "watchdog_task_starving"]
    assert len(starving) == 1, "the starving task is logged once, not on every check"
    assert starving[0]["task"] == "control" and starving[0]["log_level"] == "error"
    assert [s.name for s in wd.starving()] == ["control"]
    assert wd.stalled == ("control",)

    # recovery: the loop beats again, pings resume
    with capture_logs() as logs:
        wd.beat("control")
        assert wd.check() is True
    assert fake.messages() == ["WATCHDOG=1"]
    assert [e["event"] for e in logs] == ["watchdog_recovered"]
    assert wd.pings == 3


def test_second_task_starving_is_logged_too(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    clock = FakeClock()
    wd = make_watchdog(path, clock)
    wd.register("a", 5.0)
    wd.register("b", 10.0)
    with capture_logs() as logs:
        clock.now += 6.0
        wd.check()
        clock.now += 6.0
        wd.check()
        wd.check()
    assert [e["task"] for e in logs if e["event"] == "watchdog_task_starving"] == ["a", "b"]
    assert not [m for m in fake.messages() if m == "WATCHDOG=1"]


def test_unregister_and_unknown_beats(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    clock = FakeClock()
    wd = make_watchdog(path, clock)
    wd.register("connector-1", 1.0)
    wd.register("connector-2", 1.0)
    wd.beat("not-registered")  # ignored
    clock.now += 5.0
    assert wd.check() is False
    wd.unregister_prefix("connector-")  # e.g. a soft reset stops the connector loops on purpose
    assert wd.names() == []
    assert wd.check() is True
    with pytest.raises(ValueError):
        wd.register("x", 0)


def test_probe_progress_idle_and_ended_task(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    clock = FakeClock()
    wd = make_watchdog(path, clock)
    polls = {"n": 0}
    state: dict[str, object] = {"uplink": 0}
    wd.register("meter-poller", 5.0, probe=lambda: polls["n"])
    wd.register("uplink", 5.0, probe=lambda: state["uplink"])

    clock.now += 4.0
    polls["n"] += 1
    assert wd.check() is True
    clock.now += 4.0  # the poller counted again, the uplink did not: 8 s > 5 s
    polls["n"] += 1
    assert wd.check() is False
    state["uplink"] = IDLE  # offline and waiting on purpose: counts as progress
    assert wd.check() is True

    def broken() -> int:
        raise RuntimeError("probe bug")

    wd.register("broken", 5.0, probe=broken)
    clock.now += 6.0
    polls["n"] += 1
    with capture_logs() as logs:
        assert wd.check() is False
    assert any(e["event"] == "watchdog_probe_failed" for e in logs)


async def test_ended_task_starves_at_once(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    clock = FakeClock()
    wd = make_watchdog(path, clock)

    async def crashes() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(crashes())
    wd.register("outbox", 60.0, task=task)
    await asyncio.gather(task, return_exceptions=True)
    starving = wd.starving()
    assert [(s.name, s.reason) for s in starving] == [("outbox", "task ended")]
    assert wd.check() is False


def test_without_systemd_watchdog_nothing_is_sent(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    clock = FakeClock()
    wd = Watchdog.from_env(Notifier(env={"NOTIFY_SOCKET": path}), env={}, clock=clock)
    assert not wd.enabled and wd.period_s == wd.check_period_s
    wd.register("a", 1.0)
    assert wd.check() is True
    assert fake.messages() == []  # no WatchdogSec=: no pings, only the bookkeeping


# ---------------------------------------------------------------------------- Watchdog (real loop)


async def test_pinger_task_stops_and_resumes(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    changes: list[list[str]] = []
    wd = Watchdog.from_env(
        Notifier(env={"NOTIFY_SOCKET": path}),
        env={"WATCHDOG_USEC": "100000"},  # 0.1 s: a ping every 50 ms
        on_change=lambda starving: changes.append([s.name for s in starving]),
    )
    assert wd.interval_s == 0.1
    wd.register("control", 0.3)
    wd.register("uplink", 0.3)
    hung = asyncio.Event()

    async def loop(name: str, stop_when: asyncio.Event | None) -> None:
        while True:
            if stop_when is None or not stop_when.is_set():
                wd.beat(name)
            await asyncio.sleep(0.02)

    workers = [asyncio.create_task(loop("control", hung)), asyncio.create_task(loop("uplink", None))]
    wd.start()
    try:
        await asyncio.sleep(0.3)
        first = fake.messages()
        assert first.count("WATCHDOG=1") >= 3

        hung.set()  # the control loop stops making progress
        await asyncio.sleep(0.8)
        stalled = fake.messages()
        await asyncio.sleep(0.3)
        assert [m for m in fake.messages() if m == "WATCHDOG=1"] == [], "pings go on while a task starves"
        assert any(m.startswith("STATUS=watchdog: control") for m in stalled)
        assert changes == [["control"]]

        hung.clear()  # it recovers
        await asyncio.sleep(0.3)
        assert fake.messages().count("WATCHDOG=1") >= 2
        assert changes == [["control"], []]
    finally:
        await wd.stop()
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


# ---------------------------------------------------------------------------- helpers for the agent


def test_status_line() -> None:
    from agent.service.sdnotify import status_line

    snapshot = {
        "connectors": [
            {"id": 1, "state": "charging", "power_kw": 22.04},
            {"id": 2, "state": "unavailable", "power_kw": 0.0, "unavailable_reason": "self_test"},
        ],
        "uplink": {"enabled": True, "online": False},
        "faults": [{"fault_id": "F-0204"}, {"fault_id": "F-0302"}, {"fault_id": "F-0204"}],
        "service_mode": {"on": True},
    }
    assert status_line(snapshot) == (
        "1: charging 22.0 kW | 2: unavailable (self_test) | uplink offline | SERVICE MODE | faults: F-0204,F-0302"
    )
    assert status_line({"connectors": [{"id": 1, "state": "idle"}], "uplink": {"enabled": False}}) == (
        "1: idle | uplink disabled"
    )
    assert status_line({}) == "uplink offline"


def test_hal_progress_counts_attempts() -> None:
    from agent.service.sdnotify import hal_progress

    assert hal_progress({"counters": {"polls": 7, "answers": 0, "failures": 7}}) == 7  # Modbus poller
    assert hal_progress({"driver": "hwmon", "polls": 3}) == 3
    assert hal_progress({"counters": {"tx": 10, "rx": 0, "tx_errors": 2, "tx_dropped": 1, "tx_cancelled": 0}}) == 13
    assert hal_progress({"driver": "iec61851", "cp_volts": 12.0}) is None
    # a device that failed to start is not watched
    assert hal_progress({"running": False, "counters": {"polls": 0}}) is None
    assert hal_progress({"open": False, "counters": {"tx": 0, "rx": 0}}) is None
