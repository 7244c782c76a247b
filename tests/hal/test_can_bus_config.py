"""``[can.<bus>]``: interface-specific options reach ``can.Bus`` unchanged, and are checked
as far as python-can allows (unknown interface, python-can's own key checks, required
arguments of the bus class), each problem one line naming file and key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import can
import pytest
from pydantic import ValidationError

from agent.config import ConfigError, load_config
from hal.can.port import CanPort
from hal.config import CanBusConfig

ROOT = Path(__file__).resolve().parents[2]
SIM = (ROOT / "config" / "sim.toml").read_text()


def _with_bus(body: str) -> str:
    """sim.toml with its [can.modules] table replaced by ``body``."""
    return re.sub(r"\[can\.modules\]\n(?:[^\[\n].*\n|\n)*?(?=\[)", "[can.modules]\n" + body + "\n", SIM, count=1)


def _problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def test_unknown_interface_is_one_line_naming_file_and_key(tmp_path: Path) -> None:
    lines = _problems(tmp_path, _with_bus('interface = "socketcn"\nchannel = "vcan0"'))
    assert len(lines) == 1
    assert lines[0].startswith(f"{tmp_path / 'agent.toml'}: can.modules.interface: expected a python-can interface name")
    assert "did you mean 'socketcan'?" in lines[0] and "(got 'socketcn')" in lines[0]


def test_required_arguments_of_the_bus_class_are_demanded(tmp_path: Path) -> None:
    lines = _problems(tmp_path, _with_bus('interface = "socketcand"\nchannel = "vcan0"'))
    assert lines == [
        f"{tmp_path / 'agent.toml'}: can.modules.options: expected the options interface 'socketcand' "
        "requires: 'host', 'port' (e.g. options = { host = ..., port = ... })"
    ]


def test_python_can_own_checks_apply(tmp_path: Path) -> None:
    lines = _problems(
        tmp_path, _with_bus('interface = "udp_multicast"\nchannel = "239.74.0.1"\noptions = { port = "many" }')
    )
    assert len(lines) == 1 and "can.modules.options:" in lines[0] and "Port config must be a number" in lines[0]


def test_own_keys_may_not_hide_in_options() -> None:
    with pytest.raises(ValidationError, match="bitrate set in \\[can.<bus>\\] itself"):
        CanBusConfig(interface="pcan", channel="PCAN_USBBUS1", options={"bitrate": 500000})


def test_bus_kwargs_pass_options_through_unchanged() -> None:
    cfg = CanBusConfig(interface="slcan", channel="/dev/ttyACM0", options={"tty_baudrate": 115200, "rtscts": True})
    assert cfg.bus_kwargs() == {
        "interface": "slcan", "channel": "/dev/ttyACM0", "bitrate": 125000, "tty_baudrate": 115200, "rtscts": True,
    }
    # bitrate is left out where python-can does not set it
    udp = CanBusConfig(interface="udp_multicast", channel="239.74.0.1", options={"port": 43113, "hop_limit": 1})
    assert udp.bus_kwargs() == {"interface": "udp_multicast", "channel": "239.74.0.1", "port": 43113, "hop_limit": 1}


async def test_port_opens_the_bus_with_the_options() -> None:
    cfg = CanBusConfig(interface="virtual", channel="opts-test", options={"preserve_timestamps": True, "rx_queue_size": 7})
    port = CanPort("modules", cfg)
    await port.open()
    try:
        bus = port._bus
        assert isinstance(bus, can.interfaces.virtual.VirtualBus)
        assert bus.preserve_timestamps is True
        assert bus.queue.maxsize == 7
        assert port.describe()["options"] == {"preserve_timestamps": True, "rx_queue_size": 7}
    finally:
        await port.close()


def _readme_can_examples() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [b for b in re.findall(r"```toml\n(.*?)```", text, flags=re.S) if b.lstrip().startswith("[can.")]


def test_readme_documents_the_adapters_and_every_example_validates() -> None:
    examples = _readme_can_examples()
    interfaces = set()
    for block in examples:
        for name, table in tomllib.loads(block)["can"].items():
            CanBusConfig.model_validate(table)  # raises on a bad example
            interfaces.add(table["interface"])
    assert {"socketcan", "socketcand", "slcan", "pcan", "gs_usb", "udp_multicast"} <= interfaces
