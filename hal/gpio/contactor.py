"""Main contactor on a GPIO coil output, confirmed by an NC mirror-contact input.

Implements :class:`hal.interfaces.Contactor`. The lines come from a
:class:`hal.gpio.lines.LineBackend`: libgpiod v2 on a real chip
(``backend = "gpiod"``) or gpio-sim-style files written by
:mod:`hal.sim.gpio_files` (``backend = "sim"``); the driver logic is identical.

Logical mirror value: *active* == the NC mirror contact is closed == the main
contacts are open. ``mirror_active_low``/``mirror_bias`` describe how the board
wires that contact to the input (PhyVerso-style defaults: active-low, pull-down).

Behaviour, beyond the interface contract:

* ``close()``/``open()`` are serialised. Both require the mirror to hold the
  expected value continuously for ``debounce_ms`` inside their timeout (so
  ``debounce_ms`` must be shorter than either timeout). On the gpiod backend the
  kernel debounces the input by the same period, so confirmation can take up to
  operate time + 2 x ``debounce_ms``.
* ``close()`` refuses with ``contactor_welded`` when the weld latch is set, when
  the coil is already energised (no latch: a caller error), and when the mirror
  says "main closed" with the coil off (that *is* a weld: the latch is set). It
  refuses with ``contactor_failed_to_close`` when the lines are unavailable or the
  mirror cannot be read.
* A ``close()`` cancelled while waiting for the mirror releases the coil before
  the cancellation propagates.
* ``open()`` when the lines never came up raises ``mirror_mismatch`` (nothing can
  be confirmed; nothing was ever energised). A failed confirmation sets the weld
  latch, as the contract says.
* Background watcher: on every edge event of the mirror input (libgpiod edge
  events; inotify for the simulated lines), every ``poll_interval_ms`` while a
  change settles or a disagreement is pending, and otherwise every
  ``edge_backstop_ms`` (a backend with edge events) or ``idle_poll_interval_ms``
  (one without): outside ``close()``/``open()`` the mirror must agree with the
  coil. After a coil change the mirror is given the matching timeout to follow
  (e.g. after ``release()`` or a failed close). A disagreement that lasts
  ``debounce_ms`` sets ``health`` to ``FAULT``/``mirror_mismatch``.
* ``health`` priority: OFFLINE (not started / lines unavailable, code
  ``transport_error``) > weld latch (``contactor_welded``, until ``clear_weld()``)
  > the last operation fault (``mirror_mismatch`` or
  ``contactor_failed_to_close``; cleared by the next *confirmed* close or open, or
  ``clear_weld()``) > mirror read errors (``transport_error``) > OK.
* ``status().position`` is FAULT while the weld latch is set or while the mirror
  currently disagrees with the coil, else CLOSED/OPEN after the coil.
* The cycle counter lives in ``{state_dir}/contactor-{name}.json``
  (``{"name", "cycles", "rated_cycles", "updated_at"}``), rewritten atomically with
  fsync on every change. A failed write is logged and shown by ``describe()``; it
  never fails an operation.
* If the chip is missing at ``start()`` the driver stays OFFLINE and retries the
  request every second.

Why one module of ~640 lines: the close/open sequences, the mirror watch and the weld
latch are one safety interlock over one pair of lines; its persisted cycle counter and
weld state are written by the same sequences.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import Field, model_validator

from hal.config import StrictModel
from hal.context import BuildContext
from hal.gpio.lines import (
    BiasName,
    GpiodLines,
    LineBackend,
    LineError,
    LinePair,
    SimLines,
    atomic_write_text,
)
from hal.tick import Wakeup, sleep_to_grid
from hal.interfaces import (
    ContactorError,
    ContactorPosition,
    ContactorStatus,
    Health,
    HealthState,
    monotonic,
)
from hal.tasks import stop_task

log = structlog.get_logger(__name__)

WELDED = "contactor_welded"
FAILED_TO_CLOSE = "contactor_failed_to_close"
MIRROR_MISMATCH = "mirror_mismatch"
TRANSPORT_ERROR = "transport_error"

#: how often an OFFLINE driver retries the line request
REQUEST_RETRY_S = 1.0
#: mirror sampling step while close()/open() wait for confirmation
CONFIRM_STEP_S = 0.001


def _safe_file_part(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "contactor"


class GpioContactor:
    """A contactor whose coil is a GPIO output and whose NC mirror contact is a GPIO input."""

    class Options(StrictModel):
        backend: Literal["gpiod", "sim"] = Field(
            default="gpiod",
            description="gpiod = real chip via libgpiod v2; sim = gpio-sim-style files",
        )
        chip: str = Field(
            ...,
            min_length=1,
            description="gpiod: /dev/gpiochipN, gpiochipN or the chip label; sim: chip directory under root",
        )
        root: str | None = Field(
            default=None, description="sim only: directory holding the simulated chips"
        )
        coil_line: int = Field(..., ge=0, description="output line offset driving the coil")
        mirror_line: int = Field(
            ..., ge=0, description="input line offset of the NC mirror contact"
        )
        mirror_active_low: bool = Field(
            default=True, description="mirror contact closed == electrical low"
        )
        mirror_bias: BiasName = Field(
            default="pull_up",
            description=(
                "input bias of the mirror line; with the default active-low wiring, pull_up "
                "makes a broken mirror wire read 'main contacts not confirmed open' (fail-safe)"
            ),
        )
        close_timeout_ms: float = Field(default=150.0, gt=0.0, le=10_000.0)
        open_timeout_ms: float = Field(default=150.0, gt=0.0, le=10_000.0)
        debounce_ms: float = Field(
            default=10.0, ge=0.0, le=1_000.0, description="mirror must be stable this long"
        )
        rated_cycles: int = Field(
            default=100_000, ge=1, description="mechanical rating, for wear reporting"
        )
        poll_interval_ms: float = Field(
            default=5.0, ge=0.5, le=1_000.0,
            description="mirror watcher period while a change is settling or a disagreement is pending",
        )
        idle_poll_interval_ms: float = Field(
            default=50.0, ge=0.5, le=1_000.0,
            description="mirror watcher period in steady state for a backend without edge events",
        )
        edge_backstop_ms: float = Field(
            default=1000.0, ge=10.0, le=10_000.0,
            description="with edge events: steady-state re-read in case an edge was missed",
        )

        @model_validator(mode="after")
        def _consistent(self) -> GpioContactor.Options:
            if self.backend == "sim" and not self.root:
                raise ValueError("backend = 'sim' needs 'root' (the simulated GPIO directory)")
            if self.backend == "gpiod" and self.root is not None:
                raise ValueError("'root' is only used with backend = 'sim'")
            if self.coil_line == self.mirror_line:
                raise ValueError("coil_line and mirror_line must be different lines")
            if self.debounce_ms >= min(self.close_timeout_ms, self.open_timeout_ms):
                raise ValueError(
                    "debounce_ms must be shorter than close_timeout_ms and open_timeout_ms"
                )
            return self

    def __init__(
        self,
        name: str,
        options: Options,
        ctx: BuildContext,
        *,
        lines: LineBackend | None = None,
    ) -> None:
        """Build the driver; ``lines`` overrides the backend chosen by ``options`` (tests)."""
        self.name = name
        self.options = options
        self._log = log.bind(contactor=name)
        if lines is not None:
            self._lines: LineBackend = lines
        elif options.backend == "sim":
            assert options.root is not None  # checked by Options
            self._lines = SimLines(options.root, options.chip)
        else:
            self._lines = GpiodLines(options.chip)
        self._pair = LinePair(
            consumer=f"charger-agent:{name}",
            output_line=options.coil_line,
            input_line=options.mirror_line,
            input_active_low=options.mirror_active_low,
            input_bias=options.mirror_bias,
            input_debounce_ms=options.debounce_ms,
        )
        self._counter_path = Path(ctx.state_dir) / f"contactor-{_safe_file_part(name)}.json"
        self._save_lock = threading.Lock()
        self._persist_error: str | None = None
        self._cycles = self._load_cycles()

        self._started = False
        self._lines_ok = False
        self._lines_error: str | None = None
        self._io_error: str | None = None
        self._coil = False
        self._mirror_active: bool | None = None  # last logical reading (True = main open)
        self._welded = False
        self._fault: Health | None = None  # sticky mismatch / failed_to_close
        self._mismatch_active = False
        self._disagree_since: float | None = None
        self._settle_until = 0.0
        self._busy = False
        self._op_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._reader_fd: int | None = None
        self._edge = Wakeup()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Request the lines (coil released) and start the mirror watcher. Never raises
        for an unavailable chip: the driver then reports OFFLINE and keeps retrying."""
        if self._started:
            return
        self._started = True
        self._try_request()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"contactor-{self.name}"
        )

    async def stop(self) -> None:
        """Release the coil, stop the watcher and give the lines back (idempotent)."""
        if not self._started:
            return
        self.release()
        self._started = False
        task, self._task = self._task, None
        await stop_task(task)
        self._remove_reader()
        self._lines.release()
        self._lines_ok = False
        self._log.info("contactor_stopped")

    # ------------------------------------------------------------------ operations

    async def close(self) -> None:
        """Close the contactor and confirm it through the mirror (see the module docstring)."""
        async with self._op_lock:
            self._busy = True
            try:
                await self._close_locked()
            finally:
                self._busy = False
                self._disagree_since = None

    async def _close_locked(self) -> None:
        if not self._lines_ok:
            raise ContactorError(
                FAILED_TO_CLOSE, f"GPIO lines not available: {self._lines_error or 'not started'}"
            )
        if self._welded:
            raise ContactorError(WELDED, "weld latch is set; clear_weld() after service")
        if self._coil:
            raise ContactorError(WELDED, "refusing to close: the coil is already energised")
        mirror = self._read_mirror()
        if mirror is None:
            raise ContactorError(
                FAILED_TO_CLOSE, f"cannot read the mirror contact: {self._io_error}"
            )
        if not mirror:
            self._latch_weld(
                "mirror reports main contacts closed while the coil is off (pre-close check)"
            )
            raise ContactorError(
                WELDED, "mirror reports main contacts closed while the coil is off"
            )

        started = monotonic()
        try:
            self._drive_coil(True)
        except LineError as exc:
            self.release()
            self._set_fault(FAILED_TO_CLOSE, f"cannot drive the coil: {exc}")
            raise ContactorError(FAILED_TO_CLOSE, f"cannot drive the coil: {exc}") from exc
        try:
            confirmed = await self._await_mirror(
                want_active=False,
                timeout_s=self.options.close_timeout_ms / 1000.0,
                abort_if_released=True,
            )
        except asyncio.CancelledError:
            self.release()  # never leave an unconfirmed coil energised behind a cancelled caller
            raise
        elapsed_ms = (monotonic() - started) * 1000.0
        if confirmed is None:
            detail = "coil released while waiting for the mirror"
            self._set_fault(FAILED_TO_CLOSE, detail)
            raise ContactorError(FAILED_TO_CLOSE, detail)
        if not confirmed:
            self.release()
            detail = (
                f"mirror did not confirm 'closed' for {self.options.debounce_ms:g} ms "
                f"within {self.options.close_timeout_ms:g} ms"
            )
            self._set_fault(FAILED_TO_CLOSE, detail)
            raise ContactorError(FAILED_TO_CLOSE, detail)
        self._fault = None
        self._mismatch_active = False
        self._cycles += 1
        cycles = self._cycles
        await asyncio.to_thread(self._save_cycles)
        self._log.info("contactor_closed", confirm_ms=round(elapsed_ms, 1), cycles=cycles)

    async def open(self) -> None:
        """Release the coil and confirm the open through the mirror; weld latch on failure."""
        async with self._op_lock:
            self._busy = True
            try:
                await self._open_locked()
            finally:
                self._busy = False
                self._disagree_since = None

    async def _open_locked(self) -> None:
        was_energised = self._coil
        self.release()
        if not self._lines_ok:
            raise ContactorError(
                MIRROR_MISMATCH,
                f"GPIO lines not available, cannot confirm open: {self._lines_error or 'not started'}",
            )
        started = monotonic()
        confirmed = await self._await_mirror(
            want_active=True,
            timeout_s=self.options.open_timeout_ms / 1000.0,
            abort_if_released=False,
        )
        if not confirmed:
            detail = (
                f"mirror did not confirm 'open' for {self.options.debounce_ms:g} ms "
                f"within {self.options.open_timeout_ms:g} ms after releasing the coil"
            )
            self._latch_weld(detail)
            raise ContactorError(WELDED, detail)
        self._fault = None
        self._mismatch_active = False
        self._settle_until = 0.0
        if was_energised:
            self._log.info(
                "contactor_opened", confirm_ms=round((monotonic() - started) * 1000.0, 1)
            )

    async def _await_mirror(
        self, *, want_active: bool, timeout_s: float, abort_if_released: bool
    ) -> bool | None:
        """Wait for the logical mirror to equal ``want_active`` for ``debounce_ms``.

        Returns True when confirmed, False on timeout, None when ``abort_if_released``
        and the coil was released meanwhile (emergency ``release()``).
        """
        debounce_s = self.options.debounce_ms / 1000.0
        deadline = monotonic() + timeout_s
        stable_since: float | None = None
        while True:
            if abort_if_released and not self._coil:
                return None
            now = monotonic()
            mirror = self._read_mirror()
            if mirror is not None and mirror == want_active:
                if stable_since is None:
                    stable_since = now
                if now - stable_since >= debounce_s:
                    return True
            else:
                stable_since = None
            if now >= deadline:
                return False
            await asyncio.sleep(min(CONFIRM_STEP_S, max(deadline - now, 0.0)))

    def release(self) -> None:
        """De-energise the coil now, without waiting for the mirror. Never raises."""
        try:
            was = self._coil
            self._coil = False
            self._settle_until = monotonic() + self.options.open_timeout_ms / 1000.0
            self._disagree_since = None
            if self._lines_ok:
                self._lines.set_output(False)
                self._io_error = None
            if was:
                self._log.info("contactor_coil_released")
        except Exception as exc:  # noqa: BLE001 - the emergency path must not raise
            self._io_error = f"cannot release the coil: {exc}"
            with contextlib.suppress(Exception):
                self._log.error("contactor_release_failed", error=str(exc))

    def _drive_coil(self, energise: bool) -> None:
        self._lines.set_output(energise)
        self._coil = energise
        if energise:
            self._settle_until = 0.0

    # ------------------------------------------------------------------ service

    def reset_cycles(self) -> None:
        """Set the cycle counter to 0 and persist it (e.g. after replacing the contactor)."""
        old = self._cycles
        self._cycles = 0
        self._save_cycles()
        self._log.info("contactor_cycles_reset", previous=old)

    def clear_weld(self) -> None:
        """Clear the weld latch and the last operation fault (after service)."""
        if self._welded or self._fault is not None:
            self._log.warning("contactor_weld_cleared", was_welded=self._welded)
        self._welded = False
        self._fault = None

    # ------------------------------------------------------------------ snapshots

    def status(self) -> ContactorStatus:
        if self._welded or self._mismatch_active:
            position = ContactorPosition.FAULT
        else:
            position = ContactorPosition.CLOSED if self._coil else ContactorPosition.OPEN
        return ContactorStatus(
            coil_energised=self._coil,
            mirror_says_open=bool(self._mirror_active),
            position=position,
            welded=self._welded,
            cycles=self._cycles,
            health=self.health(),
        )

    def health(self) -> Health:
        if not self._started:
            return Health(HealthState.OFFLINE, None, "not started")
        if not self._lines_ok:
            return Health(HealthState.OFFLINE, TRANSPORT_ERROR, self._lines_error)
        if self._welded:
            return Health(HealthState.FAULT, WELDED, "weld latched; needs service and clear_weld()")
        if self._fault is not None:
            return self._fault
        if self._io_error is not None:
            return Health(HealthState.FAULT, TRANSPORT_ERROR, self._io_error)
        return Health()

    def describe(self) -> dict[str, Any]:
        """Configuration and live state for ``probe``/``status``."""
        status = self.status()
        return {
            "driver": "gpio",
            "name": self.name,
            "backend": self.options.backend,
            "lines": self._lines.describe(),
            "coil_line": self.options.coil_line,
            "mirror_line": self.options.mirror_line,
            "mirror_active_low": self.options.mirror_active_low,
            "mirror_bias": self.options.mirror_bias,
            "coil_energised": status.coil_energised,
            "mirror_says_open": status.mirror_says_open,
            "position": status.position.value,
            "welded": status.welded,
            "cycles": status.cycles,
            "rated_cycles": self.options.rated_cycles,
            "wear_percent": round(100.0 * status.cycles / self.options.rated_cycles, 2),
            "counter_file": str(self._counter_path),
            "counter_error": self._persist_error,
            "health": {
                "state": status.health.state.value,
                "code": status.health.code,
                "detail": status.health.detail,
            },
        }

    # ------------------------------------------------------------------ internals

    def _try_request(self) -> None:
        try:
            self._lines.request(self._pair)
        except LineError as exc:
            if self._lines_error != str(exc):
                self._log.error("contactor_lines_unavailable", error=str(exc))
            self._lines_error = str(exc)
            self._lines_ok = False
            return
        self._lines_ok = True
        if self._lines_error is not None:
            self._log.info("contactor_lines_available", chip=self._lines.location)
        self._lines_error = None
        self._coil = False
        self._settle_until = monotonic() + self.options.open_timeout_ms / 1000.0
        self._mirror_active = self._read_mirror()
        self._add_reader()

    def _add_reader(self) -> None:
        fd = self._lines.event_fd()
        if fd is None:
            return
        asyncio.get_running_loop().add_reader(fd, self._on_edge)
        self._reader_fd = fd

    def _remove_reader(self) -> None:
        if self._reader_fd is None:
            return
        try:
            asyncio.get_running_loop().remove_reader(self._reader_fd)
        except RuntimeError:  # loop already closed
            pass
        self._reader_fd = None

    def _on_edge(self) -> None:
        self._lines.read_events()
        self._check_mirror()
        self._edge.set()  # the watcher re-plans: a disagreement now needs fast re-reads

    async def _run(self) -> None:
        fast = self.options.poll_interval_ms / 1000.0
        idle = max(self.options.idle_poll_interval_ms / 1000.0, fast)
        backstop = max(self.options.edge_backstop_ms / 1000.0, fast)
        while True:
            if not self._lines_ok:
                await asyncio.sleep(REQUEST_RETRY_S)
                if not self._lines_ok:
                    self._try_request()
                continue
            settling = self._busy or self._disagree_since is not None or monotonic() < self._settle_until
            if settling:
                await asyncio.sleep(fast)
            elif self._reader_fd is not None:
                # steady state with edge events: sleep until an edge (or the backstop)
                self._edge.clear()
                await self._edge.wait_for_tick(backstop)
            else:
                await sleep_to_grid(idle)
            self._check_mirror()

    def _read_mirror(self) -> bool | None:
        try:
            value = self._lines.get_input()
        except LineError as exc:
            if self._io_error != str(exc):
                self._log.error("contactor_mirror_read_failed", error=str(exc))
            self._io_error = str(exc)
            return None
        if self._io_error is not None:
            self._log.info("contactor_mirror_read_recovered")
            self._io_error = None
        self._mirror_active = value
        return value

    def _check_mirror(self) -> None:
        """Watcher step: flag a mirror that disagrees with the coil for ``debounce_ms``."""
        if self._busy or not self._lines_ok:
            return
        mirror = self._read_mirror()
        if mirror is None:
            return
        now = monotonic()
        expected = not self._coil  # mirror active == main open == coil off
        if mirror == expected:
            if self._mismatch_active:
                self._log.info("contactor_mirror_agrees_again", coil=self._coil)
            self._mismatch_active = False
            self._disagree_since = None
            return
        if now < self._settle_until:
            return
        if self._disagree_since is None:
            self._disagree_since = now
        if self._mismatch_active or now - self._disagree_since < self.options.debounce_ms / 1000.0:
            return
        self._mismatch_active = True
        if self._welded:
            return  # already the stronger fault
        what = (
            "main contacts closed while the coil is off"
            if not self._coil
            else "main contacts opened while the coil is on"
        )
        self._set_fault(MIRROR_MISMATCH, f"mirror reports {what}")

    def _set_fault(self, code: str, detail: str) -> None:
        """Record an operation fault; callers call this once per transition, so it logs."""
        self._log.error("contactor_fault", code=code, detail=detail)
        self._fault = Health(HealthState.FAULT, code, detail)

    def _latch_weld(self, detail: str) -> None:
        if not self._welded:
            self._log.error("contactor_weld_latched", detail=detail)
        self._welded = True

    def _load_cycles(self) -> int:
        try:
            data = json.loads(self._counter_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            self._log.error(
                "contactor_counter_unreadable", path=str(self._counter_path), error=str(exc)
            )
            self._persist_error = f"unreadable counter file, restarted from 0: {exc}"
            return 0
        cycles = data.get("cycles") if isinstance(data, dict) else None
        if not isinstance(cycles, int) or isinstance(cycles, bool) or cycles < 0:
            self._log.error(
                "contactor_counter_invalid", path=str(self._counter_path), value=repr(cycles)
            )
            self._persist_error = "invalid counter file, restarted from 0"
            return 0
        return cycles

    def _save_cycles(self) -> None:
        """Write the current counter atomically and durably; log (never raise) on failure."""
        with self._save_lock:
            document = {
                "name": self.name,
                "cycles": self._cycles,
                "rated_cycles": self.options.rated_cycles,
                "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            try:
                atomic_write_text(
                    self._counter_path, json.dumps(document, indent=1) + "\n", durable=True
                )
            except OSError as exc:
                self._persist_error = str(exc)
                self._log.error(
                    "contactor_counter_write_failed", path=str(self._counter_path), error=str(exc)
                )
                return
            self._persist_error = None


__all__ = ["GpioContactor"]
