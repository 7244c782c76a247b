"""The service-mode key switch: a GPIO input, active while the key is turned (``[service.key_switch]``).

Contract: the line is requested input-only (not :class:`hal.gpio.lines.LinePair`, which
always claims an output line too). ``read()`` is True while the key is turned;
``open()``/``read()`` raise :class:`hal.gpio.lines.LineError` when the chip is missing or the
line cannot be read (the service mode counts that as "key off": fail closed), ``close()``
never raises. Backend ``gpiod`` drives a real chip, ``sim`` reads the simulated gpio files.
See :mod:`agent.maintenance.service_mode` for how it is polled.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from pydantic import Field, model_validator

from hal.config import StrictModel
from hal.gpio.lines import BiasName, LineError, resolve_gpiochip, sim_value_path

if TYPE_CHECKING:
    from gpiod import LineRequest, LineSettings


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
