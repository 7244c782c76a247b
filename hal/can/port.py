"""One shared CAN bus: a python-can bus, one receive path, one transmit task.

Several drivers (two connectors' module groups, say) share one physical bus. The
:class:`CanPort` owns the single :class:`can.BusABC` object for it:

* **Receive.** A :class:`can.Notifier` bound to the running asyncio loop hands every
  received frame to each subscriber callback, on the loop thread. Subscribers filter
  their own frames. Error frames are not passed on; the port counts them and
  derives its health from them.
* **Transmit.** Every frame goes through one queue and one task that keeps at least
  ``tx_spacing_ms`` between two frames (some modules misbehave on back-to-back
  commands). Urgent frames (OFF) overtake queued normal frames; frames of the same
  class keep their order.
* **Health.** A failed send (:class:`can.CanError`) or a received BUS-OFF error
  frame turns the port into ``FAULT``/``transport_error``. The port keeps sending
  whatever is queued; a successful send clears a send failure, a received data
  frame or a "controller restarted" error frame clears a bus-off. Health listeners
  are told about every transition, and each transition is logged once.

Opening is reference counted: each driver calls :meth:`CanPort.open` once in its
``start()`` and :meth:`CanPort.close` once in its ``stop()``; the bus is created by
the first open and shut down by the last close.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import can
import structlog

from hal.config import CanBusConfig
from hal.interfaces import OK, Health, HealthState
from hal.tasks import stop_tasks

log = structlog.get_logger(__name__)

#: Error-frame class bits in ``arbitration_id`` (linux/can/error.h).
CAN_ERR_BUSOFF = 0x040
CAN_ERR_RESTARTED = 0x100

#: How long opening a bus may take before :class:`CanPortError` is raised.
OPEN_TIMEOUT_S = 5.0
#: Normal-priority frames beyond this many pending ones are dropped (counted).
MAX_PENDING = 1024
#: Pause before the receive thread is restarted after ``bus.recv`` failed.
RX_RESTART_DELAY_S = 1.0

FrameCallback = Callable[[can.Message], None]
HealthCallback = Callable[[Health], None]


class CanPortError(RuntimeError):
    """The CAN bus could not be opened (unknown interface, missing channel, ...)."""


class FrameError(ValueError):
    """A received frame is malformed or implausible and must be discarded.

    Raised by the protocol codecs; drivers count it as a garbage frame.
    """


@dataclass(frozen=True, slots=True)
class PortCounters:
    tx: int = 0  # frames handed to the bus
    rx: int = 0  # data frames received
    tx_errors: int = 0  # sends that raised can.CanError
    tx_dropped: int = 0  # frames never sent (queue full, port closed)
    tx_cancelled: int = 0  # frames withdrawn by their sender before they were sent
    rx_error_frames: int = 0  # error frames received (any class)
    rx_errors: int = 0  # exceptions raised by bus.recv


class _Listener(can.Listener):
    def __init__(self, port: CanPort) -> None:
        self._port = port

    def on_message_received(self, msg: can.Message) -> None:
        self._port._on_rx(msg)

    def on_error(self, exc: Exception) -> None:
        self._port._on_rx_error(exc)


@dataclass(order=True)
class _TxItem:
    priority: int  # 0 urgent, 1 normal
    seq: int  # FIFO within one priority
    msg: can.Message = field(compare=False)
    done: asyncio.Future[bool] = field(compare=False)


class CanPort:
    """The shared CAN bus named ``name`` in the config (``[can.<name>]``).

    Contract:

    * ``await open()`` creates the bus on first use (refcounted); if the bus cannot
      be created within :data:`OPEN_TIMEOUT_S` it raises :class:`CanPortError`
      naming the interface and channel, and the port stays closed.
    * ``send(msg, urgent=False)`` never blocks: it queues the frame and returns a
      future that resolves to ``True`` once the frame was handed to the bus and to
      ``False`` if sending failed, the frame was dropped or the port closed.
      Cancelling the future before the frame went out withdraws the frame.
      Raises :class:`RuntimeError` if the port is not open.
    * ``await flush()`` returns when every frame queued so far has been handled.
    * ``health()`` is ``OFFLINE`` while closed, ``FAULT``/``transport_error`` after a
      send failure or bus-off (see the module docstring for recovery), else ``OK``.
    """

    def __init__(self, name: str, config: CanBusConfig) -> None:
        self.name = name
        self.config = config
        self._refs = 0
        self._bus: can.BusABC | None = None
        self._notifier: can.Notifier | None = None
        self._listener = _Listener(self)
        self._subscribers: list[FrameCallback] = []
        self._health_listeners: list[HealthCallback] = []
        self._queue: asyncio.PriorityQueue[_TxItem] | None = None
        self._tx_task: asyncio.Task[None] | None = None
        self._rx_restart: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._seq = itertools.count()
        self._lock = asyncio.Lock()
        self._send_failed: str | None = None
        self._bus_off = False
        self._health: Health = Health(HealthState.OFFLINE, None, "not open")
        self._tx = self._rx = self._tx_errors = self._tx_dropped = self._tx_cancelled = 0
        self._rx_error_frames = self._rx_errors = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def is_open(self) -> bool:
        return self._bus is not None

    async def open(self) -> None:
        """Take one reference; the first one creates the bus, notifier and transmit task."""
        async with self._lock:
            if self._refs > 0:
                self._refs += 1
                return
            loop = asyncio.get_running_loop()
            kwargs = self.config.bus_kwargs()
            where = f"{self.config.interface} channel '{self.config.channel}'" + (
                f" with options {self.config.options}" if self.config.options else ""
            )
            try:
                bus = await asyncio.wait_for(
                    asyncio.to_thread(lambda: can.Bus(**kwargs)), OPEN_TIMEOUT_S
                )
            except TimeoutError:
                raise CanPortError(
                    f"CAN bus '{self.name}': opening {where} did not finish "
                    f"within {OPEN_TIMEOUT_S:g} s"
                ) from None
            except Exception as exc:  # python-can raises many types (OSError, ImportError, ...)
                raise CanPortError(f"CAN bus '{self.name}': cannot open {where}: {exc}") from exc
            self._loop = loop
            self._bus = bus
            self._queue = asyncio.PriorityQueue()
            self._notifier = can.Notifier(bus, [self._listener], timeout=0.1, loop=loop)
            self._tx_task = loop.create_task(self._tx_loop(), name=f"can-tx-{self.name}")
            self._refs = 1
            self._send_failed = None
            self._bus_off = False
            self._set_health(OK)
            log.info("can_port_opened", bus=self.name, interface=self.config.interface,
                     channel=self.config.channel, options=self.config.options)

    async def close(self) -> None:
        """Drop one reference; the last one stops the tasks and shuts the bus down.

        Frames still queued are dropped (their futures resolve to ``False``). Calling
        it on a closed port does nothing.
        """
        async with self._lock:
            if self._refs == 0:
                return
            self._refs -= 1
            if self._refs > 0:
                return
            await self._shutdown()

    async def _shutdown(self) -> None:
        bus, notifier, queue = self._bus, self._notifier, self._queue
        self._bus = None
        self._notifier = None
        await stop_tasks((self._tx_task, self._rx_restart))
        self._tx_task = None
        self._rx_restart = None
        if queue is not None:
            while not queue.empty():
                item = queue.get_nowait()
                if not item.done.cancelled():
                    self._resolve(item, False)
                    self._tx_dropped += 1
                queue.task_done()
        self._queue = None
        if notifier is not None:
            # joins the receive thread (if any) for up to one recv timeout
            await asyncio.to_thread(notifier.stop, 1.0)
        if bus is not None:
            bus.shutdown()
        self._set_health(Health(HealthState.OFFLINE, None, "closed"))
        log.info("can_port_closed", bus=self.name)

    # ------------------------------------------------------------------ subscribers

    def subscribe(self, callback: FrameCallback) -> None:
        """Call ``callback(msg)`` on the loop thread for every received data frame."""
        if callback not in self._subscribers:
            self._subscribers.append(callback)

    def unsubscribe(self, callback: FrameCallback) -> None:
        if callback in self._subscribers:
            self._subscribers.remove(callback)

    def add_health_listener(self, callback: HealthCallback) -> None:
        """Call ``callback(health)`` on every health transition of the port."""
        if callback not in self._health_listeners:
            self._health_listeners.append(callback)

    def remove_health_listener(self, callback: HealthCallback) -> None:
        if callback in self._health_listeners:
            self._health_listeners.remove(callback)

    # ------------------------------------------------------------------ transmit

    def send(self, msg: can.Message, urgent: bool = False) -> asyncio.Future[bool]:
        """Queue ``msg`` for the transmit task; see the class contract."""
        if self._queue is None or self._loop is None:
            raise RuntimeError(f"CAN bus '{self.name}' is not open")
        done: asyncio.Future[bool] = self._loop.create_future()
        if not urgent and self._queue.qsize() >= MAX_PENDING:
            self._tx_dropped += 1
            if self._tx_dropped == 1 or self._tx_dropped % 1000 == 0:
                log.warning("can_tx_queue_full", bus=self.name, dropped=self._tx_dropped)
            done.set_result(False)
            return done
        self._queue.put_nowait(_TxItem(0 if urgent else 1, next(self._seq), msg, done))
        return done

    async def flush(self) -> None:
        """Wait until every frame queued so far has been sent (or has failed)."""
        if self._queue is not None:
            await self._queue.join()

    async def _tx_loop(self) -> None:
        assert self._queue is not None and self._loop is not None
        queue, loop = self._queue, self._loop
        spacing = self.config.tx_spacing_ms / 1000.0
        last = -math.inf
        while True:
            item: _TxItem | None = None
            if queue.empty():
                # idle bus: wait for the next frame first, so a lone frame costs no extra
                # wake-up for the spacing after it (most frames are sent one at a time)
                item = await queue.get()
                if loop.time() - last < spacing:
                    # within the gap after the previous frame: back into the queue (no await in
                    # between, so it fits), and an urgent frame queued meanwhile still goes first
                    queue.put_nowait(item)
                    queue.task_done()
                    item = None
            if item is None:
                delay = last + spacing - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                item = await queue.get()
            try:
                if item.done.cancelled():
                    self._tx_cancelled += 1  # withdrawn by its sender (e.g. ON overtaken by OFF)
                    continue
                last = loop.time()
                self._resolve(item, self._transmit(item.msg))
            finally:
                queue.task_done()

    def _transmit(self, msg: can.Message) -> bool:
        bus = self._bus
        if bus is None:
            self._tx_dropped += 1
            return False
        try:
            # timeout=0: never block the event loop; a full transmit queue is an error
            bus.send(msg, timeout=0.0)
        except can.CanError as exc:
            self._tx_errors += 1
            if self._send_failed is None:
                self._send_failed = str(exc) or type(exc).__name__
                self._update_health()
            return False
        self._tx += 1
        if self._send_failed is not None:
            self._send_failed = None
            self._update_health()
        return True

    @staticmethod
    def _resolve(item: _TxItem, ok: bool) -> None:
        if not item.done.done():
            item.done.set_result(ok)

    # ------------------------------------------------------------------ receive

    def _on_rx(self, msg: can.Message) -> None:
        if msg.is_error_frame:
            self._rx_error_frames += 1
            if msg.arbitration_id & CAN_ERR_BUSOFF:
                if not self._bus_off:
                    self._bus_off = True
                    self._update_health()
            elif msg.arbitration_id & CAN_ERR_RESTARTED and self._bus_off:
                self._bus_off = False
                self._update_health()
            return
        self._rx += 1
        if self._bus_off:
            # somebody's frame made it through: our controller is on the bus again
            self._bus_off = False
            self._update_health()
        for callback in tuple(self._subscribers):
            try:
                callback(msg)
            except Exception:  # one broken subscriber must not starve the others
                log.exception("can_subscriber_failed", bus=self.name)

    def _on_rx_error(self, exc: Exception) -> None:
        """``bus.recv`` raised in the notifier's thread, which then ended: restart it."""
        self._rx_errors += 1
        log.error("can_receive_failed", bus=self.name, error=str(exc))
        if self._loop is not None and self._bus is not None and self._rx_restart is None:
            self._rx_restart = self._loop.create_task(self._restart_receiver())

    async def _restart_receiver(self) -> None:
        try:
            await asyncio.sleep(RX_RESTART_DELAY_S)
            old, bus, loop = self._notifier, self._bus, self._loop
            if old is None or bus is None or loop is None:
                return
            await asyncio.to_thread(old.stop, 1.0)
            if self._bus is bus:
                self._notifier = can.Notifier(bus, [self._listener], timeout=0.1, loop=loop)
                log.info("can_receive_restarted", bus=self.name)
        finally:
            self._rx_restart = None

    # ------------------------------------------------------------------ health

    def health(self) -> Health:
        return self._health

    def counters(self) -> PortCounters:
        return PortCounters(
            tx=self._tx,
            rx=self._rx,
            tx_errors=self._tx_errors,
            tx_dropped=self._tx_dropped,
            tx_cancelled=self._tx_cancelled,
            rx_error_frames=self._rx_error_frames,
            rx_errors=self._rx_errors,
        )

    def _update_health(self) -> None:
        if self._bus is None:
            return
        if self._bus_off:
            new = Health(HealthState.FAULT, "transport_error", "bus-off reported by the controller")
        elif self._send_failed is not None:
            new = Health(HealthState.FAULT, "transport_error", f"send failed: {self._send_failed}")
        else:
            new = OK
        self._set_health(new)

    def _set_health(self, new: Health) -> None:
        if new == self._health:
            return
        old, self._health = self._health, new
        if new.state is HealthState.FAULT:
            log.error("can_port_transport_error", bus=self.name, detail=new.detail)
        elif new.ok and old.state is HealthState.FAULT:
            log.info("can_port_recovered", bus=self.name)
        for callback in tuple(self._health_listeners):
            try:
                callback(new)
            except Exception:
                log.exception("can_health_listener_failed", bus=self.name)

    def describe(self) -> dict[str, Any]:
        c = self.counters()
        return {
            "bus": self.name,
            "interface": self.config.interface,
            "channel": self.config.channel,
            "options": dict(self.config.options),
            "open": self.is_open,
            "health": self._health.state.value,
            "code": self._health.code,
            "counters": {
                "tx": c.tx,
                "rx": c.rx,
                "tx_errors": c.tx_errors,
                "tx_dropped": c.tx_dropped,
                "tx_cancelled": c.tx_cancelled,
                "rx_error_frames": c.rx_error_frames,
                "rx_errors": c.rx_errors,
            },
        }
