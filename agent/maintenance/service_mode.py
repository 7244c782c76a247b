"""Local service mode: a technician on site, proven by a key switch or by a shell on the controller.

Service-only commands (``calibrate_sensor``) are accepted only while service mode is
ON. It is ON while at least one source holds it:

``local_cli``
    ``{state_dir}/service-mode.json`` = ``{"until": unix, "by": user, "at": unix}``,
    written by ``charger-agent service-mode on [--minutes N]`` (:func:`set_on`,
    default 30 min, at most :data:`MAX_MINUTES`) and removed by ``service-mode off``
    (:func:`set_off`). It holds service mode while ``until`` is in the future; the
    agent never trusts ``until`` beyond ``at + MAX_MINUTES``, so a hand-edited file
    cannot open service mode for longer than the CLI could. A file that is not
    valid is ignored (service mode off) and reported in ``status()["file_error"]``.

``key_switch``
    A GPIO input (``[service.key_switch]``), active while the key is turned. It is
    requested input-only (this module does not use :class:`hal.gpio.lines.LinePair`,
    which always claims an output line too). A chip that is missing or a line that
    cannot be read counts as "key off" (fail closed) and is retried every poll; the
    error is shown in ``status()["key_switch_error"]`` and logged once per distinct
    error. The switch is sampled every poll (0.5 s), far slower than contact bounce,
    so a turn gives one transition.

:class:`ServiceMode` polls both sources every ``poll_interval_s`` and awaits
``on_change(on, source)`` for every transition of each source: ``on`` is that
source's new state, ``source`` is ``"local_cli"`` or ``"key_switch"`` (the audit
log's source), and while the callback runs :attr:`ServiceMode.last_change` describes
the transition (``reason``, ``message``, ``by``, ``until``). A file re-written while
active (``service-mode on`` again) is an ``on`` transition with reason ``extended``.
A failing callback is logged and never stops the polling. Use :func:`audit_hook` to
send transitions to the command audit log.

:meth:`ServiceMode.is_on` uses the key switch and file as of the last poll and the
current clock, so an expiry takes effect at ``until`` exactly (its ``on_change`` comes
with the next poll).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import structlog
from pydantic import Field, model_validator

from agent.service.status import write_json_atomic
from agent.utctime import to_iso
from hal.config import StrictModel
from hal.gpio.lines import BiasName, LineError, resolve_gpiochip, sim_value_path
from hal.tasks import stop_task

if TYPE_CHECKING:
    from gpiod import LineRequest, LineSettings

log = structlog.get_logger(__name__)

SERVICE_MODE_FILE = "service-mode.json"
DEFAULT_MINUTES = 30
MAX_MINUTES = 480
POLL_INTERVAL_S = 0.5
SOURCE_CLI = "local_cli"
SOURCE_KEY = "key_switch"

OnChange = Callable[[bool, str], Awaitable[None]]
AuditFn = Callable[..., Awaitable[Any]]


# ---------------------------------------------------------------------------- config


class KeySwitchConfig(StrictModel):
    """``[service.key_switch]``: the key switch's GPIO input line."""

    backend: Literal["gpiod", "sim"]
    chip: str = Field(..., min_length=1, description="gpiochip path, name or label; sim: chip directory name")
    line: int = Field(..., ge=0, le=1023, description="line offset on the chip")
    active_low: bool = Field(True, description="key turned = electrical low (switch to ground)")
    bias: BiasName = Field("pull_up", description="what the line reads when nothing drives it")
    root: str | None = Field(None, description="sim backend: gpio-sim file root ({sim_root} allowed)")

    @model_validator(mode="after")
    def _root_for_sim_only(self) -> KeySwitchConfig:
        if self.backend == "sim" and not self.root:
            raise ValueError("backend 'sim' needs root (the simulated gpio file root)")
        if self.backend == "gpiod" and self.root is not None:
            raise ValueError("root is only for backend 'sim'")
        return self


class ServiceConfig(StrictModel):
    """``[service]``: how a technician proves presence. No key switch = CLI file only."""

    key_switch: KeySwitchConfig | None = None


# ---------------------------------------------------------------------------- key switch input


class KeySwitch(Protocol):
    """One input line. ``open()``/``read()`` raise :class:`LineError`; ``close()`` never raises."""

    @property
    def location(self) -> str: ...

    def open(self) -> None: ...
    def read(self) -> bool: ...
    def close(self) -> None: ...


class GpiodKeySwitch:
    """The key switch on a real GPIO chip: one line requested as INPUT through libgpiod v2."""

    def __init__(self, chip: str, line: int, *, active_low: bool, bias: BiasName, consumer: str = "charger-agent-service-key") -> None:
        self._chip = chip
        self._line = line
        self._active_low = active_low
        self._bias = bias
        self._consumer = consumer
        self._path: str | None = None
        self._request: LineRequest | None = None

    @property
    def location(self) -> str:
        return f"{self._path or self._chip} line {self._line}"

    def _settings(self) -> LineSettings:
        from gpiod import LineSettings
        from gpiod.line import Bias, Direction

        bias = {
            "as_is": Bias.AS_IS,
            "pull_up": Bias.PULL_UP,
            "pull_down": Bias.PULL_DOWN,
            "disabled": Bias.DISABLED,
        }[self._bias]
        return LineSettings(direction=Direction.INPUT, bias=bias, active_low=self._active_low)

    def open(self) -> None:
        import gpiod

        self.close()
        path = resolve_gpiochip(self._chip)
        config: dict[Iterable[int | str] | int | str, LineSettings | None] = {self._line: self._settings()}
        try:
            self._request = gpiod.request_lines(path, config=config, consumer=self._consumer)
        except PermissionError as exc:
            raise LineError(f"GPIO chip {path}: permission denied (run as root or grant access with a udev rule)") from exc
        except (OSError, ValueError) as exc:
            raise LineError(f"GPIO chip {path}: cannot request input line {self._line}: {exc}") from exc
        self._path = path

    def read(self) -> bool:
        from gpiod.line import Value

        if self._request is None:
            raise LineError(f"GPIO chip {self.location}: line is not requested")
        try:
            return self._request.get_value(self._line) == Value.ACTIVE
        except (OSError, ValueError) as exc:
            raise LineError(f"GPIO chip {self.location}: read: {exc}") from exc

    def close(self) -> None:
        request, self._request = self._request, None
        if request is not None:
            with contextlib.suppress(Exception):
                request.release()


class SimKeySwitch:
    """The key switch on gpio-sim style files (``{root}/{chip}/sim_gpio{line}/value``).

    Same electrical rules as :class:`hal.gpio.lines.SimLines`' input: a missing or
    empty value file reads the bias level (``pull_up`` -> 1, else 0), then
    ``active_low`` turns the level into "key turned".
    """

    def __init__(self, root: str | os.PathLike[str], chip: str, line: int, *, active_low: bool, bias: BiasName) -> None:
        self._root = Path(root)
        self._chip = chip
        self._line = line
        self._active_low = active_low
        self._bias = bias
        self._open = False

    @property
    def location(self) -> str:
        return f"{self._root / self._chip} line {self._line}"

    def open(self) -> None:
        chip_dir = self._root / self._chip
        if not chip_dir.is_dir():
            raise LineError(f"simulated GPIO chip {chip_dir} does not exist (is the simulator running?)")
        self._open = True

    def read(self) -> bool:
        if not self._open:
            raise LineError(f"simulated GPIO chip {self.location}: line is not requested")
        path = sim_value_path(self._root, self._chip, self._line)
        try:
            text = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            text = ""
        except (OSError, UnicodeDecodeError) as exc:
            raise LineError(f"simulated GPIO chip {self.location}: read: {exc}") from exc
        if text == "":
            level = self._bias == "pull_up"
        elif text in ("0", "1"):
            level = text == "1"
        else:
            raise LineError(f"simulated GPIO chip {self.location}: holds {text[:16]!r}, not 0/1")
        return level != self._active_low

    def close(self) -> None:
        self._open = False


def make_key_switch(config: KeySwitchConfig) -> KeySwitch:
    """The backend named by ``config`` (nothing is opened yet)."""
    if config.backend == "sim":
        assert config.root is not None  # validated
        return SimKeySwitch(config.root, config.chip, config.line, active_low=config.active_low, bias=config.bias)
    return GpiodKeySwitch(config.chip, config.line, active_low=config.active_low, bias=config.bias)


# ---------------------------------------------------------------------------- the file


@dataclass(frozen=True, slots=True)
class ServiceFile:
    """Content of ``service-mode.json``: ``until``/``at`` unix seconds, ``by`` a user name."""

    until: float
    by: str
    at: float

    @property
    def effective_until(self) -> float:
        """``until``, but never more than :data:`MAX_MINUTES` after ``at``."""
        return min(self.until, self.at + MAX_MINUTES * 60.0)

    def to_json(self) -> dict[str, Any]:
        return {"until": self.until, "by": self.by, "at": self.at}


def service_mode_path(state_dir: str | os.PathLike[str]) -> Path:
    """``{state_dir}/service-mode.json``."""
    return Path(state_dir) / SERVICE_MODE_FILE


def current_user() -> str:
    """Who runs the CLI: the invoking user under sudo (``SUDO_USER``), else the login name."""
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user:
        return sudo_user
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def read_file(state_dir: str | os.PathLike[str]) -> tuple[ServiceFile | None, str | None]:
    """``(content, None)``, ``(None, None)`` when there is no file, ``(None, why)`` when it is
    unusable (unreadable, not JSON, wrong fields). Never raises."""
    path = service_mode_path(state_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"cannot read {path}: {exc}"
    try:
        doc = json.loads(text)
    except ValueError:
        return None, f"{path} is not JSON"
    if not isinstance(doc, dict):
        return None, f"{path} is not a JSON object"
    until, at, by = _number(doc.get("until")), _number(doc.get("at")), doc.get("by")
    if until is None or at is None or not isinstance(by, str):
        return None, f"{path} needs numbers 'until' and 'at' and a string 'by'"
    return ServiceFile(until=until, by=by, at=at), None


def set_on(
    state_dir: str | os.PathLike[str], minutes: int = DEFAULT_MINUTES, by: str | None = None, *, now: float | None = None
) -> ServiceFile:
    """Write the file: service mode on from ``now`` for ``minutes`` (1..MAX_MINUTES), by
    ``by`` (default :func:`current_user`). Replaces an existing file (extends or shortens).
    Atomic, mode 0640. Raises ``ValueError`` for minutes out of range, ``OSError`` if the
    state directory is not writable (or does not exist)."""
    if isinstance(minutes, bool) or not isinstance(minutes, int) or not 1 <= minutes <= MAX_MINUTES:
        raise ValueError(f"minutes must be a whole number from 1 to {MAX_MINUTES} (got {minutes!r})")
    at = time.time() if now is None else now
    content = ServiceFile(until=at + minutes * 60.0, by=by or current_user(), at=at)
    write_json_atomic(service_mode_path(state_dir), content.to_json())
    return content


def set_off(state_dir: str | os.PathLike[str]) -> bool:
    """Remove the file; True if there was one. Raises ``OSError`` other than "not found"."""
    try:
        service_mode_path(state_dir).unlink()
    except FileNotFoundError:
        return False
    return True


# ---------------------------------------------------------------------------- the monitor


class ServiceMode:
    """Service-mode state of the running agent (see the module docstring for the rules).

    ``config`` None or without ``key_switch`` = file only. ``key_switch`` overrides the
    backend built from the config (tests); ``clock`` is the wall clock (unix seconds).
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        config: ServiceConfig | None = None,
        on_change: OnChange | None = None,
        *,
        clock: Callable[[], float] = time.time,
        poll_interval_s: float = POLL_INTERVAL_S,
        key_switch: KeySwitch | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.config = config or ServiceConfig()
        self.on_change = on_change
        self.clock = clock
        self.poll_interval_s = poll_interval_s
        if key_switch is None and self.config.key_switch is not None:
            key_switch = make_key_switch(self.config.key_switch)
        self._key = key_switch
        self._key_open = False
        self._key_on = False
        self._key_error: str | None = None
        self._file: ServiceFile | None = None
        self._file_error: str | None = None
        self._file_active: ServiceFile | None = None  # the content that last held service mode
        self._polled = False
        self._task: asyncio.Task[None] | None = None
        #: the transition being reported (set before each ``on_change``), else the last one
        self.last_change: dict[str, Any] | None = None

    # ---------------------------------------------------------------- queries

    def _file_holds(self, now: float) -> bool:
        return self._file is not None and self._file.effective_until > now

    def is_on(self) -> bool:
        """True while the key switch is on or the file's ``until`` is in the future."""
        return self._key_on or self._file_holds(self.clock())

    def status(self) -> dict[str, Any]:
        """Plain-data view for ``charger-agent status`` and the audit log::

            {"on": bool, "source": "key_switch" | "local_cli" | None,
             "key_switch": bool | None,          # None = no key switch configured
             "key_switch_location": str | None, "key_switch_error": str | None,
             "file_active": bool, "until": float | None, "until_iso": str | None,
             "remaining_s": float | None, "by": str | None, "at": float | None,
             "file_error": str | None, "last_change": dict | None}

        ``until``/``by``/``at`` describe the file while it holds service mode.
        """
        now = self.clock()
        holds = self._file_holds(now)
        f = self._file if holds else None
        source = SOURCE_KEY if self._key_on else SOURCE_CLI if holds else None
        return {
            "on": self._key_on or holds,
            "source": source,
            "key_switch": self._key_on if self._key is not None else None,
            "key_switch_location": self._key.location if self._key is not None else None,
            "key_switch_error": self._key_error,
            "file_active": holds,
            "until": f.effective_until if f else None,
            "until_iso": to_iso(f.effective_until) if f else None,
            "remaining_s": max(0.0, f.effective_until - now) if f else None,
            "by": f.by if f else None,
            "at": f.at if f else None,
            "file_error": self._file_error,
            "last_change": dict(self.last_change) if self.last_change else None,
        }

    # ---------------------------------------------------------------- polling

    def _read_key(self) -> bool:
        assert self._key is not None
        try:
            if not self._key_open:
                self._key.open()
                self._key_open = True
            value = self._key.read()
        except LineError as exc:
            self._key.close()
            self._key_open = False
            if str(exc) != self._key_error:
                log.warning("service_key_switch_unreadable", location=self._key.location, error=str(exc))
            self._key_error = str(exc)
            return False
        if self._key_error is not None:
            log.info("service_key_switch_readable", location=self._key.location)
            self._key_error = None
        return value

    def _refresh(self) -> list[dict[str, Any]]:
        """Sample both sources; return the transitions (each a ``last_change`` dict)."""
        now = self.clock()
        first = not self._polled
        self._polled = True
        changes: list[dict[str, Any]] = []

        if self._key is not None:
            key_on = self._read_key()
            if key_on != self._key_on:
                self._key_on = key_on
                word = "on" if key_on else "off"
                message = f"key switch turned {word}"
                if first and key_on:
                    message += " (found on at agent start)"
                changes.append({"source": SOURCE_KEY, "on": key_on, "reason": f"key_{word}", "message": message})

        content, error = read_file(self.state_dir)
        if error != self._file_error and error is not None:
            log.warning("service_mode_file_ignored", error=error)
        self._file, self._file_error = content, error
        holding = content if content is not None and content.effective_until > now else None
        previous = self._file_active
        if holding is not None and holding != previous:
            until = to_iso(holding.effective_until)
            if previous is None:
                reason = "active_at_start" if first else "set"
                message = f"service mode on until {until} by {holding.by}"
                if first:
                    message += " (found on at agent start)"
            else:
                reason = "extended"
                message = f"service mode renewed until {until} by {holding.by}"
            changes.append(
                {"source": SOURCE_CLI, "on": True, "reason": reason, "message": message,
                 "by": holding.by, "until": holding.effective_until, "at": holding.at}
            )
        elif holding is None and previous is not None:
            if content is not None:
                reason, message = "expired", f"service mode timed out (until {to_iso(previous.effective_until)})"
            elif error is not None:
                reason, message = "invalid", f"service-mode file unusable, treated as off: {error}"
            else:
                reason, message = "removed", "service mode turned off (service-mode file removed)"
            changes.append(
                {"source": SOURCE_CLI, "on": False, "reason": reason, "message": message,
                 "by": previous.by, "until": previous.effective_until, "at": previous.at}
            )
        self._file_active = holding
        for change in changes:
            change["at_change"] = now
            change["service_mode_on"] = self._key_on or holding is not None
        return changes

    async def poll(self) -> None:
        """Sample the key switch and the file once; report each transition (in order)."""
        for change in self._refresh():
            self.last_change = change
            log.info(
                "service_mode_changed",
                source=change["source"],
                on=change["on"],
                reason=change["reason"],
                service_mode_on=change["service_mode_on"],
                message=change["message"],
            )
            if self.on_change is None:
                continue
            try:
                await self.on_change(change["on"], change["source"])
            except Exception as exc:  # noqa: BLE001 - an audit failure must not stop tracking
                log.error("service_mode_on_change_failed", error=f"{type(exc).__name__}: {exc}")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.poll()
            except Exception as exc:  # noqa: BLE001 - a bug here must not end service-mode tracking
                log.error("service_mode_poll_failed", error=f"{type(exc).__name__}: {exc}")

    async def start(self) -> None:
        """Poll once now (so ``is_on`` is right at once), then every ``poll_interval_s``."""
        if self._task is not None:
            return
        await self.poll()
        self._task = asyncio.create_task(self._run(), name="service-mode")

    async def stop(self) -> None:
        """Stop polling and release the key-switch line. Not a service-mode transition."""
        task, self._task = self._task, None
        await stop_task(task)
        if self._key is not None:
            self._key.close()
            self._key_open = False


def audit_hook(audit: AuditFn, mode: ServiceMode) -> OnChange:
    """An ``on_change`` that appends each transition to the command audit log::

        await audit(source, command_id=None, command="service_mode",
                    params={"reason", "by", "until", "at", "service_mode_on"},
                    outcome="on" | "off", message=...)

    ``audit`` is ``store.ledger.audit``. Wire it after creating the monitor:
    ``mode.on_change = audit_hook(store.ledger.audit, mode)``.
    """

    async def hook(on: bool, source: str) -> None:
        change = mode.last_change or {}
        params = {k: change.get(k) for k in ("reason", "by", "until", "at", "service_mode_on")}
        await audit(
            source,
            command_id=None,
            command="service_mode",
            params=params,
            outcome="on" if on else "off",
            message=change.get("message"),
        )

    return hook
