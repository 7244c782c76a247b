"""CanPort: shared bus, refcounted open, one spaced transmit queue, health from errors."""

from __future__ import annotations

import asyncio
import itertools

import can
import pytest
from pydantic import ValidationError
from can_helpers import FlakyBus, Recorder, WaitUntil

from hal.can import port as port_module
from hal.can.port import CanPort, CanPortError
from hal.config import NO_BITRATE_INTERFACES, CanBusConfig
from hal.interfaces import Health, HealthState


def frame(n: int) -> can.Message:
    return can.Message(arbitration_id=0x02830000 | n, data=bytes([n] * 8), is_extended_id=True)


async def test_open_is_refcounted_and_close_idempotent(bus_config: CanBusConfig) -> None:
    port = CanPort("main", bus_config)
    assert port.health().state is HealthState.OFFLINE
    await port.open()
    await port.open()
    assert port.is_open and port.health().ok
    await port.close()
    assert port.is_open  # one user left
    await port.close()
    assert not port.is_open
    assert port.health().state is HealthState.OFFLINE
    await port.close()  # no-op
    with pytest.raises(RuntimeError, match="not open"):
        port.send(frame(1))


async def test_open_failure_names_the_channel() -> None:
    port = CanPort("main", CanBusConfig(interface="socketcan", channel="nosuchcan7"))
    with pytest.raises(CanPortError, match="nosuchcan7"):
        await port.open()
    assert not port.is_open
    # an unknown interface never gets this far: the config rejects it
    with pytest.raises(ValidationError, match="python-can interface name"):
        CanBusConfig(interface="no-such-interface", channel="x0")
    bypassed = CanBusConfig.model_construct(
        interface="no-such-interface", channel="x0", bitrate=125_000, tx_spacing_ms=5.0,
        controller_address=0xF0, options={"port": 1},
    )
    with pytest.raises(CanPortError, match="no-such-interface channel 'x0' with options"):
        await CanPort("other", bypassed).open()


async def test_bitrate_passed_only_where_meaningful(channel: str, flaky: type[FlakyBus]) -> None:
    port = CanPort("main", CanBusConfig(interface="flaky", channel=channel, bitrate=250_000))
    await port.open()
    try:
        assert flaky.instances[0].bitrate == 250_000
    finally:
        await port.close()
    assert "virtual" in NO_BITRATE_INTERFACES and "socketcan" in NO_BITRATE_INTERFACES


async def test_subscribers_get_every_data_frame(
    bus_config: CanBusConfig, channel: str, wait_until: WaitUntil
) -> None:
    port = CanPort("main", bus_config)
    first: list[can.Message] = []
    second: list[can.Message] = []
    port.subscribe(first.append)
    port.subscribe(second.append)
    await port.open()
    other = can.Bus(interface="virtual", channel=channel)
    try:
        for n in range(5):
            other.send(frame(n))
        other.send(can.Message(arbitration_id=0x004, is_error_frame=True, data=bytes(8)))
        await wait_until(lambda: len(first) == 5 and port.counters().rx_error_frames == 1)
        assert [m.data[0] for m in first] == [0, 1, 2, 3, 4]
        assert [m.data[0] for m in second] == [0, 1, 2, 3, 4]
        assert port.counters().rx == 5
        port.unsubscribe(second.append)
        other.send(frame(9))
        await wait_until(lambda: len(first) == 6)
        assert len(second) == 5
        assert port.health().ok  # a non-bus-off error frame is only counted
    finally:
        other.shutdown()
        await port.close()


async def test_frames_are_spaced(channel: str, recorder: Recorder) -> None:
    spacing_ms = 10.0
    port = CanPort("main", CanBusConfig(interface="virtual", channel=channel,
                                        tx_spacing_ms=spacing_ms))
    await port.open()
    try:
        futures = [port.send(frame(n)) for n in range(8)]
        await port.flush()
        assert all(f.result() for f in futures)
    finally:
        await port.close()
    stamps = [m.timestamp for m in recorder.frames()]
    assert len(stamps) == 8
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert min(gaps) >= (spacing_ms - 1.0) / 1000.0  # 1 ms for clock granularity
    assert port.counters().tx == 8


async def test_urgent_frames_overtake_queued_frames(channel: str, recorder: Recorder) -> None:
    port = CanPort("main", CanBusConfig(interface="virtual", channel=channel, tx_spacing_ms=5.0))
    await port.open()
    try:
        for n in range(4):
            port.send(frame(n))
        port.send(frame(0xAA), urgent=True)
        port.send(frame(0xBB), urgent=True)
        await port.flush()
    finally:
        await port.close()
    order = [m.data[0] for m in recorder.frames()]
    assert order == [0xAA, 0xBB, 0, 1, 2, 3]


async def test_send_failure_sets_transport_error_until_a_send_succeeds(
    channel: str, flaky: type[FlakyBus], recorder: Recorder
) -> None:
    port = CanPort("main", CanBusConfig(interface="flaky", channel=channel))
    transitions: list[Health] = []
    port.add_health_listener(transitions.append)
    await port.open()
    try:
        bus = flaky.instances[0]
        bus.fail_send = True
        failed = port.send(frame(1))
        assert await failed is False
        health = port.health()
        assert (health.state, health.code) == (HealthState.FAULT, "transport_error")
        assert "No buffer space" in (health.detail or "")
        assert await port.send(frame(2)) is False
        assert port.counters().tx_errors == 2
        bus.fail_send = False
        assert await port.send(frame(3)) is True
        assert port.health().ok
    finally:
        await port.close()
    assert [m.data[0] for m in recorder.frames()] == [3]
    codes = [(h.state, h.code) for h in transitions]
    assert codes[:3] == [
        (HealthState.OK, None),  # opened
        (HealthState.FAULT, "transport_error"),  # once, not once per failed frame
        (HealthState.OK, None),
    ]


async def test_bus_off_error_frame_until_controller_restarts(
    bus_config: CanBusConfig, channel: str, wait_until: WaitUntil
) -> None:
    port = CanPort("main", bus_config)
    await port.open()
    other = can.Bus(interface="virtual", channel=channel)
    try:
        other.send(can.Message(arbitration_id=port_module.CAN_ERR_BUSOFF, is_error_frame=True,
                               data=bytes(8)))
        await wait_until(lambda: not port.health().ok)
        assert port.health().code == "transport_error"
        assert "bus-off" in (port.health().detail or "")
        # a successful send does not prove the controller is back on the bus
        assert await port.send(frame(1)) is True
        assert port.health().code == "transport_error"
        other.send(can.Message(arbitration_id=port_module.CAN_ERR_RESTARTED,
                               is_error_frame=True, data=bytes(8)))
        await wait_until(lambda: port.health().ok)
        other.send(can.Message(arbitration_id=port_module.CAN_ERR_BUSOFF, is_error_frame=True,
                               data=bytes(8)))
        await wait_until(lambda: not port.health().ok)
        other.send(frame(2))  # any data frame received: back on the bus
        await wait_until(lambda: port.health().ok)
        assert port.counters().rx_error_frames == 3
    finally:
        other.shutdown()
        await port.close()


# python-can's Notifier re-raises the recv error in its thread after calling on_error
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_receive_restarts_after_recv_error(
    channel: str, flaky: type[FlakyBus], wait_until: WaitUntil, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(port_module, "RX_RESTART_DELAY_S", 0.05)
    port = CanPort("main", CanBusConfig(interface="flaky", channel=channel))
    received: list[can.Message] = []
    port.subscribe(received.append)
    await port.open()
    other = can.Bus(interface="virtual", channel=channel)
    try:
        flaky.instances[0].fail_recv_once = True
        await wait_until(lambda: port.counters().rx_errors == 1)
        other.send(frame(7))
        await wait_until(lambda: len(received) == 1)
        assert received[0].data[0] == 7
    finally:
        other.shutdown()
        await port.close()


async def test_close_drops_pending_frames(channel: str) -> None:
    port = CanPort("main", CanBusConfig(interface="virtual", channel=channel, tx_spacing_ms=200.0))
    await port.open()
    futures = [port.send(frame(n)) for n in range(5)]
    await asyncio.sleep(0.01)  # the first one goes out at once, the rest wait for spacing
    await port.close()
    results = [f.result() for f in futures]
    assert results[0] is True
    assert results[1:] == [False] * 4
    assert port.counters().tx_dropped == 4


async def test_normal_frames_beyond_the_queue_limit_are_dropped(
    channel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(port_module, "MAX_PENDING", 3)
    port = CanPort("main", CanBusConfig(interface="virtual", channel=channel, tx_spacing_ms=50.0))
    await port.open()
    try:
        normal = [port.send(frame(n)) for n in range(5)]
        urgent = port.send(frame(9), urgent=True)
        assert [f.done() and f.result() is False for f in normal] == [False] * 3 + [True] * 2
        assert not urgent.done()  # urgent frames are always accepted
        assert port.counters().tx_dropped == 2
    finally:
        await port.close()
