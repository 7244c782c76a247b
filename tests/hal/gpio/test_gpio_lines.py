"""Line backends without GPIO hardware: option handling, gpiod settings and errors, sim semantics."""

from __future__ import annotations

import asyncio
import os
import select
from datetime import timedelta
from pathlib import Path
from typing import Any

import gpiod
import pytest
from gpiod.line import Bias, Direction, Edge, Value
from pydantic import ValidationError

from hal import registry
from hal.context import BuildContext
from hal.gpio.contactor import GpioContactor
from hal.gpio.lines import (
    GpiodLines,
    LineBackend,
    LineError,
    LinePair,
    SimLines,
    gpiod_line_config,
    resolve_gpiochip,
    sim_value_path,
)
from hal.interfaces import ContactorError, ContactorPosition, HealthState

PAIR = LinePair(
    consumer="test",
    output_line=5,
    input_line=6,
    input_active_low=True,
    input_bias="pull_down",
    input_debounce_ms=10.0,
)


# ---------------------------------------------------------------- options / registry


def test_registry_resolves_gpio_contactor() -> None:
    spec = registry.lookup("contactor", "gpio")
    assert spec.cls is GpioContactor and spec.options_model is GpioContactor.Options


def test_options_defaults() -> None:
    o = GpioContactor.Options(chip="/dev/gpiochip0", coil_line=1, mirror_line=2)
    assert (o.backend, o.mirror_active_low, o.mirror_bias) == ("gpiod", True, "pull_up")
    assert (o.close_timeout_ms, o.open_timeout_ms, o.debounce_ms, o.rated_cycles) == (
        150,
        150,
        10,
        100_000,
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backend": "sim", "chip": "c", "coil_line": 1, "mirror_line": 2}, "needs 'root'"),
        (
            {"chip": "c", "root": "/tmp", "coil_line": 1, "mirror_line": 2},
            "only used with backend = 'sim'",
        ),
        ({"chip": "c", "coil_line": 1, "mirror_line": 1}, "must be different"),
        ({"chip": "c", "coil_line": 1, "mirror_line": 2, "debounce_ms": 150}, "shorter than"),
        ({"chip": "c", "coil_line": 1, "mirror_line": 2, "mirror_bias": "weak"}, "mirror_bias"),
        ({"chip": "c", "coil_line": 1, "mirror_line": 2, "colour": "red"}, "colour"),
    ],
)
def test_options_rejects_inconsistent_config(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as err:
        GpioContactor.Options(**kwargs)
    assert message in str(err.value)


# ---------------------------------------------------------------- gpiod backend, no chip needed


def test_gpiod_line_settings_built_from_options() -> None:
    config = gpiod_line_config(PAIR)
    assert set(config) == {5, 6}
    coil, mirror = config[5], config[6]
    assert coil.direction is Direction.OUTPUT and coil.output_value is Value.INACTIVE
    assert mirror.direction is Direction.INPUT
    assert mirror.bias is Bias.PULL_DOWN and mirror.active_low is True
    assert mirror.debounce_period == timedelta(milliseconds=10)
    assert mirror.edge_detection is Edge.BOTH


@pytest.mark.parametrize(
    "bias, expected",
    [
        ("as_is", Bias.AS_IS),
        ("pull_up", Bias.PULL_UP),
        ("pull_down", Bias.PULL_DOWN),
        ("disabled", Bias.DISABLED),
    ],
)
def test_gpiod_bias_mapping(bias: Any, expected: Bias) -> None:
    pair = LinePair(
        consumer="t", output_line=0, input_line=1, input_active_low=False, input_bias=bias
    )
    mirror = gpiod_line_config(pair)[1]
    assert mirror.bias is expected and mirror.active_low is False


def test_missing_chip_path_is_named_in_the_error() -> None:
    with pytest.raises(LineError) as err:
        GpiodLines("/dev/gpiochip97").request(PAIR)
    assert "/dev/gpiochip97" in str(err.value) and "does not exist" in str(err.value)


def test_not_a_gpio_device_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "gpiochip0"
    fake.write_text("")
    with pytest.raises(LineError) as err:
        resolve_gpiochip(str(fake))
    assert str(fake) in str(err.value) and "not a GPIO character device" in str(err.value)


def test_unknown_chip_label_lists_what_was_found(tmp_path: Path) -> None:
    with pytest.raises(LineError) as err:
        resolve_gpiochip("pinctrl-bcm2711", dev_dir=str(tmp_path))
    assert "'pinctrl-bcm2711'" in str(err.value) and "no GPIO chips under" in str(err.value)


async def test_contactor_on_missing_gpiochip_is_offline_not_crashing(tmp_path: Path) -> None:
    options = GpioContactor.Options(chip="/dev/gpiochip97", coil_line=1, mirror_line=2)
    c = GpioContactor("dc1", options, BuildContext(can={}, modbus={}, state_dir=tmp_path))
    await c.start()
    try:
        h = c.health()
        assert h.state is HealthState.OFFLINE and h.code == "transport_error"
        assert "/dev/gpiochip97" in (h.detail or "")
        with pytest.raises(ContactorError) as err:
            await c.close()
        assert (
            err.value.code == "contactor_failed_to_close" and "/dev/gpiochip97" in err.value.detail
        )
        with pytest.raises(ContactorError) as err:
            await c.open()
        assert err.value.code == "mirror_mismatch"
        c.release()
        assert c.describe()["lines"]["backend"] == "gpiod"
    finally:
        await c.stop()
    await c.stop()  # idempotent


# ---------------------------------------------------------------- gpiod backend against a fake request


class FakeRequest:
    """Stands in for gpiod.LineRequest: instant contactor mechanics, edges through a pipe."""

    def __init__(self, config: dict[Any, Any]) -> None:
        self.config = config
        self.coil = Value.INACTIVE
        self.mirror_active = True  # main open
        self.follow_coil = True
        self.released = False
        self.drained = 0
        self._r, self._w = os.pipe()

    def edge(self) -> None:
        os.write(self._w, b"e")

    def set_value(self, line: int, value: Value) -> None:
        assert line == 5
        self.coil = value
        if self.follow_coil:
            self.mirror_active = value is Value.INACTIVE
            self.edge()

    def get_value(self, line: int) -> Value:
        assert line == 6
        return Value.ACTIVE if self.mirror_active else Value.INACTIVE

    def fileno(self) -> int:
        return self._r

    def wait_edge_events(self, timeout: timedelta | float | None = None) -> bool:
        return bool(select.select([self._r], [], [], 0)[0])

    def read_edge_events(self, max_events: int | None = None) -> list[int]:
        data = os.read(self._r, 1024)
        self.drained += len(data)
        return list(data)

    def release(self) -> None:
        self.released = True
        os.close(self._r)
        os.close(self._w)


@pytest.fixture
def fake_gpiod(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    seen: dict[str, Any] = {"path": str(tmp_path / "gpiochip3")}
    Path(seen["path"]).write_text("")

    def request_lines(
        path: str, config: dict[Any, Any], consumer: str | None = None, **_: Any
    ) -> FakeRequest:
        seen.update(request_path=path, consumer=consumer)
        seen["request"] = FakeRequest(config)
        return seen["request"]

    monkeypatch.setattr(gpiod, "is_gpiochip_device", lambda p: p == seen["path"])
    monkeypatch.setattr(gpiod, "request_lines", request_lines)
    return seen


def test_gpiod_lines_logical_values(fake_gpiod: dict[str, Any]) -> None:
    lines = GpiodLines(fake_gpiod["path"])
    assert isinstance(lines, LineBackend)
    lines.request(PAIR)
    req: FakeRequest = fake_gpiod["request"]
    assert fake_gpiod["request_path"] == fake_gpiod["path"] and fake_gpiod["consumer"] == "test"
    assert req.config[6].active_low is True
    assert lines.get_input() is True
    lines.set_output(True)
    assert req.coil is Value.ACTIVE and lines.get_input() is False
    assert lines.read_events() == 1 and lines.read_events() == 0
    lines.release()
    assert req.coil is Value.INACTIVE and req.released
    lines.release()
    with pytest.raises(LineError):
        lines.get_input()


async def test_contactor_on_gpiod_backend_uses_edge_events(
    fake_gpiod: dict[str, Any], tmp_path: Path
) -> None:
    options = GpioContactor.Options(
        chip=fake_gpiod["path"], coil_line=5, mirror_line=6, debounce_ms=0, poll_interval_ms=1000
    )
    c = GpioContactor("dc1", options, BuildContext(can={}, modbus={}, state_dir=tmp_path / "s"))
    await c.start()
    try:
        req: FakeRequest = fake_gpiod["request"]
        assert fake_gpiod["consumer"] == "charger-agent:dc1"
        await c.close()
        assert c.status().position is ContactorPosition.CLOSED and req.coil is Value.ACTIVE
        await asyncio.sleep(0.01)
        assert req.drained >= 1  # the edge reader ran and drained the event
        # contacts drop out; with a 1 s poll period only the edge path can notice within 100 ms
        req.mirror_active = True
        req.edge()
        deadline = asyncio.get_running_loop().time() + 0.1
        while c.health().code != "mirror_mismatch":
            assert asyncio.get_running_loop().time() < deadline, "edge event not handled"
            await asyncio.sleep(0.005)
    finally:
        await c.stop()
    assert req.released and req.coil is Value.INACTIVE


# ---------------------------------------------------------------- file-backed lines


def test_sim_lines_missing_chip_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(LineError) as err:
        SimLines(tmp_path, "gpiochip9").request(PAIR)
    assert str(tmp_path / "gpiochip9") in str(err.value)


@pytest.mark.parametrize(
    "level, active_low, bias, expected",
    [
        ("0", True, "pull_down", True),
        ("1", True, "pull_down", False),
        ("0", False, "pull_down", False),
        ("1", False, "pull_up", True),
        (None, True, "pull_down", True),  # undriven: pull-down reads low -> active when active-low
        (None, True, "pull_up", False),
        (None, False, "pull_up", True),
        (None, False, "disabled", False),
        ("", False, "pull_up", True),
    ],
)
def test_sim_lines_bias_and_active_low(
    tmp_path: Path, level: str | None, active_low: bool, bias: Any, expected: bool
) -> None:
    (tmp_path / "chip").mkdir()
    pair = LinePair(
        consumer="t", output_line=0, input_line=1, input_active_low=active_low, input_bias=bias
    )
    lines = SimLines(tmp_path, "chip")
    lines.request(pair)
    if level is not None:
        path = sim_value_path(tmp_path, "chip", 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(level)
    assert lines.get_input() is expected


def test_sim_lines_output_and_garbage_input(tmp_path: Path) -> None:
    (tmp_path / "chip").mkdir()
    lines = SimLines(tmp_path, "chip")
    lines.request(PAIR)
    out = sim_value_path(tmp_path, "chip", 5)
    assert out.read_text().strip() == "0"
    lines.set_output(True)
    assert out.read_text().strip() == "1"
    mirror = sim_value_path(tmp_path, "chip", 6)
    mirror.parent.mkdir(parents=True, exist_ok=True)  # request() created the line's directory
    mirror.write_text("maybe")
    with pytest.raises(LineError):
        lines.get_input()
    lines.release()
    assert out.read_text().strip() == "0"
    assert lines.event_fd() is None and lines.read_events() == 0


def test_sim_lines_offer_edge_events_through_inotify(tmp_path: Path) -> None:
    import select

    from hal.gpio.lines import atomic_write_text

    (tmp_path / "chip").mkdir()
    lines = SimLines(tmp_path, "chip")
    lines.request(PAIR)
    fd = lines.event_fd()
    assert fd is not None
    assert select.select([fd], [], [], 0)[0] == [] and lines.read_events() == 0
    atomic_write_text(sim_value_path(tmp_path, "chip", 6), "0\n")  # as the simulator writes it
    assert select.select([fd], [], [], 1.0)[0] == [fd]
    assert lines.read_events() == 1 and lines.read_events() == 0
    lines.release()
    assert lines.event_fd() is None
