"""GPIO line backends: one output line (a coil) and one input line (a mirror contact).

The contactor driver (:mod:`hal.gpio.contactor`) speaks *logical* values only:
``set_output(True)`` energises the coil, ``get_input()`` is ``True`` while the
input is *active* (for a mirror contact: the NC mirror contact is closed, i.e. the
main contacts are open). Each backend turns logical values into electrical levels
the same way the Linux GPIO character device does:

* the output line is active-high and requested with value INACTIVE;
* the input line honours ``input_active_low`` (active == electrical low) and
  ``input_bias`` (what the line reads when nothing drives it).

Two backends implement :class:`LineBackend`:

:class:`GpiodLines`
    The real path: libgpiod v2 through the ``gpiod`` package (imported lazily, so a
    machine without it can still load this module). Needs ``/dev/gpiochipN``.

:class:`SimLines`
    File-backed lines laid out like the kernel gpio-sim sysfs attributes::

        {root}/{chip}/sim_gpio{offset}/value     "0" or "1", the electrical level

    The backend writes the output line's ``value``; a simulator
    (:mod:`hal.sim.gpio_files`) writes the input line's ``value``. A missing or
    empty input ``value`` means nothing drives the line: it reads the bias level
    (``pull_up`` -> 1, otherwise 0, like gpio-sim's default pull-down). Every write
    replaces the file atomically (temp file + rename), so a reader in another
    process never sees a half-written value. Edge events come from inotify on the
    input line's directory (:mod:`hal.gpio.inotify`), so the driver waits for
    changes exactly as on a real chip.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from hal.gpio.inotify import DirectoryWatch
from hal.sysfs import read_attr

if TYPE_CHECKING:
    from gpiod import LineRequest, LineSettings

BiasName = Literal["as_is", "pull_up", "pull_down", "disabled"]


class LineError(Exception):
    """A line request or line I/O failed. The message names the chip (path or directory)."""


@dataclass(frozen=True, slots=True)
class LinePair:
    """What to request: one output line and one input line on the same chip."""

    consumer: str
    output_line: int
    input_line: int
    input_active_low: bool = True
    input_bias: BiasName = "pull_down"
    input_debounce_ms: float = 0.0


@runtime_checkable
class LineBackend(Protocol):
    """One output and one input line on one GPIO chip.

    Contract:

    * ``request(pair)`` claims both lines, output driven INACTIVE; raises
      :class:`LineError` (naming the chip) when the chip does not exist or the lines
      cannot be claimed. Calling it again after ``release()`` re-requests.
    * ``set_output(active)`` / ``get_input()`` use logical values and raise
      :class:`LineError` on I/O failure or when nothing is requested.
    * ``event_fd()`` is a file descriptor that becomes readable when the input line
      has an edge event pending, or ``None`` when the backend has no edge events
      (the caller then polls). ``read_events()`` drains pending events and returns
      how many there were (0 without blocking when there are none).
    * ``release()`` drives the output INACTIVE, then gives both lines back; it never
      raises and is idempotent.
    """

    @property
    def location(self) -> str:
        """Human-readable chip location for messages (device path or directory)."""
        ...

    def request(self, pair: LinePair) -> None: ...
    def release(self) -> None: ...
    def set_output(self, active: bool) -> None: ...
    def get_input(self) -> bool: ...
    def event_fd(self) -> int | None: ...
    def read_events(self) -> int: ...
    def describe(self) -> dict[str, Any]: ...


# ---------------------------------------------------------------------------
# small file helper shared with the file-backed simulators


def atomic_write_text(path: str | os.PathLike[str], text: str, *, durable: bool = False) -> None:
    """Replace ``path`` with ``text`` atomically (temp file in the same directory + rename).

    A concurrent reader sees either the old or the new content, never a partial
    file. With ``durable=True`` the data and the directory entry are fsync'ed, so
    the new content survives a power cut once this returns. Creates missing parent
    directories. Raises :class:`OSError` on failure (the old content is kept).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# ---------------------------------------------------------------------------
# libgpiod v2


def gpiod_line_config(pair: LinePair) -> dict[int, LineSettings]:
    """The ``config`` mapping handed to ``gpiod.request_lines`` for ``pair``.

    Output: direction OUTPUT, initial value INACTIVE (the coil starts released).
    Input: direction INPUT, the configured bias and active-low, kernel debounce of
    ``input_debounce_ms`` and edge detection on both edges (the driver waits on the
    request's file descriptor for mirror changes).
    """
    from gpiod import LineSettings
    from gpiod.line import Bias, Direction, Edge, Value

    bias = {
        "as_is": Bias.AS_IS,
        "pull_up": Bias.PULL_UP,
        "pull_down": Bias.PULL_DOWN,
        "disabled": Bias.DISABLED,
    }[pair.input_bias]
    return {
        pair.output_line: LineSettings(direction=Direction.OUTPUT, output_value=Value.INACTIVE),
        pair.input_line: LineSettings(
            direction=Direction.INPUT,
            bias=bias,
            active_low=pair.input_active_low,
            debounce_period=timedelta(milliseconds=pair.input_debounce_ms),
            edge_detection=Edge.BOTH,
        ),
    }


def _natural_key(path: str) -> tuple[str, int]:
    match = re.search(r"(\d+)$", path)
    return (path[: match.start()] if match else path, int(match.group(1)) if match else -1)


def resolve_gpiochip(chip: str, *, dev_dir: str = "/dev") -> str:
    """Turn ``chip`` (``/dev/gpiochipN``, ``gpiochipN`` or a chip label) into a device path.

    Raises :class:`LineError` naming what was looked for when no such chip exists,
    when the path is not a GPIO character device, or when ``gpiod`` is missing.
    """
    try:
        import gpiod
    except ImportError as exc:  # pragma: no cover - gpiod is a hard dependency
        raise LineError(
            f"GPIO chip {chip}: the 'gpiod' package (libgpiod v2) is not installed"
        ) from exc

    if chip.startswith("/"):
        if not os.path.exists(chip):
            raise LineError(
                f"GPIO chip {chip} does not exist (wrong path, GPIO driver not loaded, "
                "or no GPIO hardware on this machine)"
            )
        if not gpiod.is_gpiochip_device(chip):
            raise LineError(f"GPIO chip {chip} is not a GPIO character device")
        return chip
    direct = os.path.join(dev_dir, chip)
    if os.path.exists(direct):
        return resolve_gpiochip(direct, dev_dir=dev_dir)
    found: list[str] = []
    for path in sorted(glob.glob(os.path.join(dev_dir, "gpiochip*")), key=_natural_key):
        if not gpiod.is_gpiochip_device(path):
            continue
        try:
            with gpiod.Chip(path) as handle:
                info = handle.get_info()
        except OSError:
            continue
        found.append(f"{path} ({info.label})")
        if chip in (info.label, info.name):
            return path
    listing = ", ".join(found) if found else f"no GPIO chips under {dev_dir}"
    raise LineError(f"no GPIO chip named or labelled {chip!r} ({listing})")


class GpiodLines:
    """:class:`LineBackend` on a real GPIO chip through libgpiod v2.

    ``chip`` is a device path (``/dev/gpiochip0``), a chip name (``gpiochip0``) or a
    chip label (``pinctrl-bcm2711``). Requests are held until ``release()``; if the
    process dies the kernel frees the lines and the board's pull-down on the coil
    driver input de-energises the coil. gpiod objects are not thread-safe: call
    every method from the event-loop thread.
    """

    def __init__(self, chip: str) -> None:
        self._chip = chip
        self._path: str | None = None
        self._pair: LinePair | None = None
        self._request: LineRequest | None = None

    @property
    def location(self) -> str:
        return self._path or self._chip

    def request(self, pair: LinePair) -> None:
        import gpiod

        self.release()
        path = resolve_gpiochip(self._chip)
        config: dict[Iterable[int | str] | int | str, LineSettings | None] = {}
        config.update(gpiod_line_config(pair).items())
        try:
            self._request = gpiod.request_lines(path, config=config, consumer=pair.consumer)
        except PermissionError as exc:
            raise LineError(
                f"GPIO chip {path}: permission denied (run as root or grant access with a udev rule)"
            ) from exc
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise LineError(
                    f"GPIO chip {path}: line {pair.output_line} or {pair.input_line} is busy "
                    "(requested by another consumer)"
                ) from exc
            raise LineError(
                f"GPIO chip {path}: cannot request lines {pair.output_line}/{pair.input_line}: {exc}"
            ) from exc
        except ValueError as exc:  # offset out of range for this chip
            raise LineError(
                f"GPIO chip {path}: invalid line offset {pair.output_line}/{pair.input_line}: {exc}"
            ) from exc
        self._path = path
        self._pair = pair

    def _require(self) -> tuple[LineRequest, LinePair]:
        if self._request is None or self._pair is None:
            raise LineError(f"GPIO chip {self.location}: lines are not requested")
        return self._request, self._pair

    def set_output(self, active: bool) -> None:
        from gpiod.line import Value

        request, pair = self._require()
        try:
            request.set_value(pair.output_line, Value.ACTIVE if active else Value.INACTIVE)
        except (OSError, ValueError) as exc:
            raise LineError(
                f"GPIO chip {self.location}: set line {pair.output_line}: {exc}"
            ) from exc

    def get_input(self) -> bool:
        from gpiod.line import Value

        request, pair = self._require()
        try:
            return request.get_value(pair.input_line) == Value.ACTIVE
        except (OSError, ValueError) as exc:
            raise LineError(
                f"GPIO chip {self.location}: read line {pair.input_line}: {exc}"
            ) from exc

    def event_fd(self) -> int | None:
        return self._request.fileno() if self._request is not None else None

    def read_events(self) -> int:
        if self._request is None:
            return 0
        try:
            if not self._request.wait_edge_events(timedelta(0)):
                return 0
            return len(self._request.read_edge_events())
        except (OSError, ValueError):
            return 0

    def release(self) -> None:
        request, pair = self._request, self._pair
        self._request = None
        if request is None or pair is None:
            return
        from gpiod.line import Value

        with contextlib.suppress(Exception):  # release must never raise
            request.set_value(pair.output_line, Value.INACTIVE)
        with contextlib.suppress(Exception):
            request.release()

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "gpiod",
            "chip": self._chip,
            "path": self._path,
            "requested": self._request is not None,
        }


# ---------------------------------------------------------------------------
# file-backed lines (gpio-sim layout)


def sim_value_path(root: str | os.PathLike[str], chip: str, offset: int) -> Path:
    """``{root}/{chip}/sim_gpio{offset}/value``: the file that holds one line's level."""
    return Path(root) / chip / f"sim_gpio{offset}" / "value"


class SimLines:
    """:class:`LineBackend` on files laid out like gpio-sim's sysfs attributes.

    ``{root}/{chip}`` must exist (the simulator creates it, as the kernel creates a
    chip), otherwise ``request()`` raises :class:`LineError` naming the directory.
    The output file holds the electrical level the driver drives ("1" = coil
    energised); ``release()`` writes "0", standing in for the board's pull-down on
    a released line. The input file holds the electrical level the simulator
    drives; the backend applies bias and active-low to produce the logical value.
    """

    def __init__(self, root: str | os.PathLike[str], chip: str) -> None:
        self._root = Path(root)
        self._chip = chip
        self._pair: LinePair | None = None
        self._watch: DirectoryWatch | None = None

    @property
    def location(self) -> str:
        return str(self._root / self._chip)

    def request(self, pair: LinePair) -> None:
        chip_dir = self._root / self._chip
        if not chip_dir.is_dir():
            raise LineError(
                f"simulated GPIO chip {chip_dir} does not exist (is the simulator running?)"
            )
        try:
            atomic_write_text(sim_value_path(self._root, self._chip, pair.output_line), "0\n")
        except OSError as exc:
            raise LineError(
                f"simulated GPIO chip {chip_dir}: cannot drive line {pair.output_line}: {exc}"
            ) from exc
        self._pair = pair
        self._close_watch()
        line_dir = sim_value_path(self._root, self._chip, pair.input_line).parent
        try:
            line_dir.mkdir(parents=True, exist_ok=True)  # gpio-sim has a directory per line
            self._watch = DirectoryWatch(line_dir)
        except OSError:
            self._watch = None  # no inotify: the driver polls, as for a backend without edges

    def _require(self) -> LinePair:
        if self._pair is None:
            raise LineError(f"simulated GPIO chip {self.location}: lines are not requested")
        return self._pair

    def set_output(self, active: bool) -> None:
        pair = self._require()
        try:
            atomic_write_text(
                sim_value_path(self._root, self._chip, pair.output_line), "1\n" if active else "0\n"
            )
        except OSError as exc:
            raise LineError(
                f"simulated GPIO chip {self.location}: set line {pair.output_line}: {exc}"
            ) from exc

    def get_input(self) -> bool:
        pair = self._require()
        path = sim_value_path(self._root, self._chip, pair.input_line)
        try:
            text = read_attr(path)
        except FileNotFoundError:
            text = ""
        except OSError as exc:
            raise LineError(
                f"simulated GPIO chip {self.location}: read line {pair.input_line}: {exc}"
            ) from exc
        if text == "":
            level = pair.input_bias == "pull_up"
        elif text in ("0", "1"):
            level = text == "1"
        else:
            raise LineError(
                f"simulated GPIO chip {self.location}: line {pair.input_line} holds {text[:16]!r}, not 0/1"
            )
        return level != pair.input_active_low

    def event_fd(self) -> int | None:
        return self._watch.fd if self._watch is not None and self._pair is not None else None

    def read_events(self) -> int:
        return 1 if self._watch is not None and self._watch.drain() else 0

    def _close_watch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()

    def release(self) -> None:
        pair, self._pair = self._pair, None
        self._close_watch()
        if pair is None:
            return
        with contextlib.suppress(Exception):  # release must never raise
            atomic_write_text(sim_value_path(self._root, self._chip, pair.output_line), "0\n")

    def describe(self) -> dict[str, Any]:
        return {"backend": "sim", "chip": self.location, "requested": self._pair is not None}
