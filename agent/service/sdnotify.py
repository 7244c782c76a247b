"""systemd service notifications (``sd_notify``) and a progress-gated watchdog.

The notification protocol is small and documented (``sd_notify(3)``): the service
manager puts the path of an ``AF_UNIX`` datagram socket in ``$NOTIFY_SOCKET``
(a leading ``@`` means Linux's abstract namespace) and the service sends it
newline-separated ``KEY=VALUE`` assignments, one datagram per message:

* ``READY=1`` -- start-up finished (``Type=notify``): config, state store and HAL are up;
* ``STATUS=...`` -- one line a person reads in ``systemctl status``;
* ``STOPPING=1`` -- the service began its shutdown;
* ``WATCHDOG=1`` -- keep-alive; without one every ``WatchdogSec=`` the manager kills and
  (``Restart=always``) restarts the service.

Without ``$NOTIFY_SOCKET`` (run from a shell, under tests) every call is a no-op.

:class:`Watchdog` sends ``WATCHDOG=1`` only while the process is making progress, not
merely while its event loop turns: every critical task (the connectors' control loops,
the HAL pollers, the uplink loops, the outbox writer) is registered with its own
allowed staleness and reports progress with :meth:`Watchdog.beat` (or is observed
through a probe). When one starves, the pings stop -- the task is logged once -- and
systemd restarts the service after ``WatchdogSec=``; when it recovers in time, they resume.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from hal.tasks import stop_task

log = structlog.get_logger(__name__)

Clock = Callable[[], float]


def _socket_address(value: str) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` -> an ``AF_UNIX`` address; None when unusable (not a path or ``@name``)."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # e.g. "vsock:..." (systemd >= 254 in VMs): not supported, stay silent


class Notifier:
    """An ``sd_notify`` client. ``socket_path`` defaults to ``$NOTIFY_SOCKET``.

    Sends never block the event loop (non-blocking datagrams; a full receive queue drops
    the message) and never raise: they return whether the datagram went out.
    """

    def __init__(self, socket_path: str | None = None, *, env: Mapping[str, str] | None = None) -> None:
        environ = os.environ if env is None else env
        raw = socket_path if socket_path is not None else environ.get("NOTIFY_SOCKET", "")
        self.address = _socket_address(raw) if raw else None
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram (no-op without a socket)."""
        if self.address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(payload, self.address)
            return True
        except OSError as exc:
            if not self._warned or exc.errno not in (errno.EAGAIN, errno.ECONNREFUSED, errno.ENOENT):
                log.warning("sd_notify_failed", error=f"{type(exc).__name__}: {exc}")
                self._warned = True
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- the messages -----------------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={_one_line(text)}")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more start/stop time (``EXTEND_TIMEOUT_USEC``), e.g. while sessions close."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def _one_line(text: str) -> str:
    """A newline would start a new assignment: STATUS= is one line, bounded in length."""
    return " ".join(str(text).split())[:400]


_default: Notifier | None = None


def default_notifier() -> Notifier:
    """The process-wide notifier on ``$NOTIFY_SOCKET`` (created on first use)."""
    global _default
    if _default is None:
        _default = Notifier()
    return _default


def notify_ready(status: str | None = None) -> bool:
    """``READY=1`` (+ ``STATUS=``): send once config, state store and HAL are up."""
    return default_notifier().ready(status)


def notify_status(text: str) -> bool:
    """``STATUS=text``: what ``systemctl status charger-agent`` shows."""
    return default_notifier().status(text)


def notify_stopping(status: str | None = None) -> bool:
    """``STOPPING=1``: the shutdown began (sessions are being closed)."""
    return default_notifier().stopping(status)


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """``WatchdogSec=`` in seconds from ``$WATCHDOG_USEC``; None when the watchdog is off.

    ``$WATCHDOG_PID``, when set, names the process that must ping: another process
    (a child that inherited the environment) gets None.
    """
    environ = os.environ if env is None else env
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    wanted = environ.get("WATCHDOG_PID", "")
    if wanted:
        try:
            if int(wanted) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 1_000_000


_FAILED: Any = object()

#: a probe's answer for "waiting by design" (e.g. the uplink while offline): counts as progress
IDLE: Any = object()


@dataclass
class _Entry:
    max_age_s: float
    last: float
    probe: Callable[[], Hashable] | None = None
    probe_value: Any = None
    task: asyncio.Task[Any] | None = None


@dataclass(frozen=True)
class Starving:
    name: str
    age_s: float
    max_age_s: float
    reason: str  # "stale" or "task ended"

    def describe(self) -> str:
        if self.reason == "task ended":
            return f"{self.name}: task ended"
        return f"{self.name}: no progress for {self.age_s:.0f} s (allowed {self.max_age_s:.0f} s)"


@dataclass
class Watchdog:
    """Pings ``WATCHDOG=1`` every ``interval_s / 2`` while every registered task is fresh.

    ``interval_s`` is ``WatchdogSec=`` (None: no systemd watchdog; the registry still
    runs, logs starvation and reports it through ``on_starving``). ``clock`` is monotonic
    seconds; inject a fake one in tests and call :meth:`check` directly.
    """

    notifier: Notifier = field(default_factory=default_notifier)
    interval_s: float | None = None
    clock: Clock = time.monotonic
    #: period of the checks when there is no systemd watchdog
    check_period_s: float = 5.0
    #: called with the starving list when pinging stops, and with [] when it resumes
    on_change: Callable[[list[Starving]], None] | None = None
    _entries: dict[str, _Entry] = field(default_factory=dict, init=False)
    _starving: tuple[str, ...] = field(default=(), init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    pings: int = field(default=0, init=False)

    @classmethod
    def from_env(cls, notifier: Notifier | None = None, *, env: Mapping[str, str] | None = None, **kw: Any) -> Watchdog:
        return cls(notifier=notifier or default_notifier(), interval_s=watchdog_interval(env), **kw)

    @property
    def enabled(self) -> bool:
        return self.interval_s is not None

    @property
    def period_s(self) -> float:
        return self.interval_s / 2.0 if self.interval_s is not None else self.check_period_s

    # -- the registry -----------------------------------------------------------------

    def register(
        self,
        name: str,
        max_age_s: float,
        *,
        probe: Callable[[], Hashable] | None = None,
        task: asyncio.Task[Any] | None = None,
    ) -> None:
        """Watch ``name``: it must :meth:`beat` at least every ``max_age_s`` seconds.

        Registering counts as a beat (a task gets ``max_age_s`` to start). ``probe``:
        polled on every check; a changed value counts as a beat and :data:`IDLE` means
        "waiting by design". ``task``: a task that ended starves at once.
        """
        if max_age_s <= 0:
            raise ValueError("max_age_s must be positive")
        entry = _Entry(max_age_s, self.clock(), probe, None, task)
        if probe is not None:
            entry.probe_value = self._read(name, probe)
        self._entries[name] = entry

    def unregister(self, name: str) -> None:
        """Stop watching ``name`` (a task that ends on purpose, e.g. at a soft reset)."""
        self._entries.pop(name, None)

    def unregister_prefix(self, prefix: str) -> None:
        for name in [n for n in self._entries if n.startswith(prefix)]:
            del self._entries[name]

    def beat(self, name: str) -> None:
        """``name`` made progress now. Unknown names are ignored (not watched)."""
        entry = self._entries.get(name)
        if entry is not None:
            entry.last = self.clock()

    def names(self) -> list[str]:
        return sorted(self._entries)

    @property
    def stalled(self) -> tuple[str, ...]:
        """The tasks found starving by the last :meth:`check` (pings are off while non-empty)."""
        return self._starving

    def _read(self, name: str, probe: Callable[[], Hashable]) -> Any:
        try:
            return probe()
        except Exception as exc:  # a broken probe is a bug, not progress
            log.warning("watchdog_probe_failed", task=name, error=f"{type(exc).__name__}: {exc}")
            return _FAILED

    def starving(self) -> list[Starving]:
        """Every watched task that has not made progress within its allowed age."""
        now = self.clock()
        out: list[Starving] = []
        for name, entry in self._entries.items():
            if entry.probe is not None:
                value = self._read(name, entry.probe)
                if value is not _FAILED:
                    if value is IDLE or value != entry.probe_value:
                        entry.last = now
                    entry.probe_value = value
            if entry.task is not None and entry.task.done():
                out.append(Starving(name, now - entry.last, entry.max_age_s, "task ended"))
                continue
            age = now - entry.last
            if age > entry.max_age_s:
                out.append(Starving(name, age, entry.max_age_s, "stale"))
        return out

    # -- the pinger -------------------------------------------------------------------

    def check(self) -> bool:
        """One round: ping when every task is fresh; returns whether it did."""
        starving = self.starving()
        names = tuple(s.name for s in starving)
        if names != self._starving:
            if starving:
                new = [s for s in starving if s.name not in self._starving]
                for s in new:  # logged once per starvation episode and task
                    log.error(
                        "watchdog_task_starving",
                        task=s.name,
                        age_s=round(s.age_s, 1),
                        max_age_s=s.max_age_s,
                        reason=s.reason,
                        action="watchdog pings stopped" if self.enabled else "no systemd watchdog",
                    )
                self.notifier.status("watchdog: " + "; ".join(s.describe() for s in starving))
            else:
                log.warning("watchdog_recovered", tasks=list(self._starving))
            self._starving = names
            if self.on_change is not None:
                self.on_change(starving)
        if starving:
            return False
        if self.enabled:
            self.notifier.watchdog()
            self.pings += 1
        return True

    async def run(self) -> None:
        """Check (and ping) every :attr:`period_s` until cancelled."""
        while True:
            self.check()
            await asyncio.sleep(self.period_s)

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name="sd-watchdog")
        return self._task

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)


# ---------------------------------------------------------------------------- agent helpers


def status_line(snapshot: Mapping[str, Any]) -> str:
    """One ``STATUS=`` line from a status snapshot (:func:`agent.service.status.build_status`), e.g.
    ``1: charging 22.0 kW | 2: idle | uplink online | faults: F-0204`` -- what
    ``systemctl status charger-agent`` shows next to "Status:"."""
    parts: list[str] = []
    for conn in snapshot.get("connectors") or []:
        state = str(conn.get("state", "?"))
        text = f"{conn.get('id', '?')}: {state}"
        power = conn.get("power_kw")
        if state in ("charging", "discharging") and isinstance(power, (int, float)):
            text += f" {abs(power):.1f} kW"
        if conn.get("unavailable_reason"):
            text += f" ({conn['unavailable_reason']})"
        parts.append(text)
    uplink = snapshot.get("uplink") or {}
    if not uplink.get("enabled", True):
        parts.append("uplink disabled")
    else:
        parts.append("uplink online" if uplink.get("online") else "uplink offline")
    mode = snapshot.get("service_mode") or {}
    if isinstance(mode, Mapping) and mode.get("on"):
        parts.append("SERVICE MODE")
    faults = sorted({str(f.get("fault_id")) for f in snapshot.get("faults") or [] if f.get("fault_id")})
    if faults:
        parts.append("faults: " + ",".join(faults[:6]) + (" ..." if len(faults) > 6 else ""))
    return _one_line(" | ".join(parts))


def hal_progress(describe: Mapping[str, Any]) -> Hashable | None:
    """A HAL device's progress marker from its ``describe()``: a counter of *attempts*
    (a poll tried, a frame sent), never of successes -- a device that stopped answering is
    a fault for the fault board, not a hang for the watchdog. None: no counter exposed.

    Modbus pollers: ``counters.polls``; hwmon: ``polls``; a CAN port: frames sent or
    failed (``counters.tx`` + ``tx_errors`` + ``tx_dropped`` + ``tx_cancelled``). A poller
    that is not running (``running: false``) or a closed port (``open: false``) -- a device
    that failed to start -- has none: it must not get the service restarted over and over.
    """
    if describe.get("running") is False or describe.get("open") is False:
        return None
    counters = describe.get("counters")
    if isinstance(counters, Mapping):
        if isinstance(counters.get("polls"), int):
            return int(counters["polls"])
        tx = [counters.get(k) for k in ("tx", "tx_errors", "tx_dropped", "tx_cancelled")]
        if isinstance(tx[0], int):
            return sum(v for v in tx if isinstance(v, int))
    if isinstance(describe.get("polls"), int):
        return int(describe["polls"])
    return None


def hal_probe(device: Any) -> Callable[[], Hashable] | None:
    """A :meth:`Watchdog.register` probe for a HAL device or CAN port (its ``describe()``
    attempt counter, see :func:`hal_progress`); None when it exposes none right now."""
    try:
        if hal_progress(device.describe()) is None:
            return None
    except Exception:  # describe() must never break start-up
        return None

    def probe() -> Hashable:
        marker = hal_progress(device.describe())
        return IDLE if marker is None else marker  # stopped on purpose since: not a hang

    return probe
