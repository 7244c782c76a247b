"""The OCPP 1.6-J channel: one WebSocket to the CSMS, rebuilt whenever it drops.

Connection contract:

* ``{url}/{charge_point_id}``, subprotocol ``ocpp1.6`` (a server that does not agree is
  dropped and retried), HTTP Basic with the identity as user when a password is set,
  WebSocket ping/pong every ``WebSocketPingInterval`` s;
* reconnects back off exponentially from ``reconnect_min_s`` to ``reconnect_max_s`` with
  jitter (each delay a random 50-100 % of the exponential step), reset after a boot was
  accepted;
* BootNotification first after a start of the agent (not after a mere reconnect: a CSMS
  may take a boot for a reboot and close open transactions); Pending/Rejected are retried
  after the interval the CSMS gave and nothing else is sent before Accepted (CALLs from
  the CSMS are answered while Pending); on every connection then StatusNotification for connector 0 and every connector, Heartbeat every
  ``HeartbeatInterval`` s, status changes as they happen;
* transaction messages come from the journal, oldest first, one at a time: a CALLRESULT
  removes the message (a StartTransaction's transactionId commits with it); a CALLERROR
  or timeout counts an attempt and waits ``TransactionMessageRetryInterval`` x attempts;
  after ``TransactionMessageAttempts`` the message is dead-lettered with an alarm (F-0304)
  so the queue never stalls. A socket that drops while a CALL waits fails that call
  (its task is cancelled with the connection); the message stays in the journal and is
  sent again on the next connection, so nothing waits on a lock that will never free.
"""

from __future__ import annotations

import asyncio
import base64
import random
import ssl
from typing import Any, Callable

import structlog
import websockets
from ocpp.exceptions import OCPPError
from ocpp.v16 import call
from websockets.asyncio.client import ClientConnection, connect

from agent.channels.ocpp.authorize import Authorizer
from agent.channels.ocpp.config import OcppSection
from agent.channels.ocpp.interface import ChargerPort
from agent.channels.ocpp.journal import Journal, QueuedMessage
from agent.channels.ocpp.mapping import connector_status, error_code
from agent.channels.ocpp.metrics import ChannelMetrics
from agent.channels.ocpp.profiles import ChargingProfiles
from agent.channels.ocpp.settings import Settings
from agent.channels.ocpp.v16.handlers import ChargePoint16
from agent.channels.ocpp.v16.operations import AVAILABILITY_KEY, Operations
from agent.channels.ocpp.v16.transactions import TxTracker
from agent.utctime import to_iso as iso, utc_now
from hal.tasks import stop_tasks

log = structlog.get_logger(__name__)

PROFILES = ["Core", "FirmwareManagement", "LocalAuthListManagement", "RemoteTrigger", "SmartCharging"]
SETTINGS_KEY = "settings"
PROFILES_KEY = "charging_profiles"
DEAD_LETTER_FAULT = "F-0304"

VendorHandler = Callable[[str | None, str | None], tuple[str, str | None]]


class CountingConnection:
    """The WebSocket as the ``ocpp`` package sees it, counting frames for the metadata."""

    def __init__(self, ws: ClientConnection, metrics: ChannelMetrics) -> None:
        self.ws = ws
        self.metrics = metrics

    async def recv(self) -> str:
        frame = await self.ws.recv()
        self.metrics.frame(received=True)
        return frame if isinstance(frame, str) else frame.decode("utf-8", "replace")

    async def send(self, frame: str) -> None:
        await self.ws.send(frame)
        self.metrics.frame(received=False)


class OcppV16Channel(Operations):
    """Implements :class:`agent.channels.ocpp.interface.CsmsChannel` for OCPP 1.6-J."""

    def __init__(self, cfg: OcppSection, port: ChargerPort, journal: Journal) -> None:
        self.cfg = cfg
        self.port = port
        self.journal = journal
        self.cp_id = cfg.charge_point_id or port.serial_number
        self.metrics = ChannelMetrics("1.6-J")
        self.metrics.features = list(PROFILES)
        self.settings: Settings = Settings(len(port.connectors), PROFILES, {}, self._persist_setting)
        self.auth = Authorizer(journal, self.settings)
        self.vendors: dict[str, VendorHandler] = {}
        self.inoperative: set[int] = set()
        self.tracker: TxTracker | None = None
        self.profiles = ChargingProfiles(port.connectors, self._persist_profiles, self._tx_start)
        self._cp: ChargePoint16 | None = None
        self._accepted = asyncio.Event()
        self._wake_sender = asyncio.Event()
        self._status_changed = asyncio.Event()
        self._volatile: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(maxsize=200)
        self._sent_status: dict[int, tuple[str, str]] = {}
        self._task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._ws: ClientConnection | None = None
        self._reconnect_now = asyncio.Event()
        self._booted_once = False  # BootNotification once per process start, not per reconnect
        self.firmware_status = "Idle"
        self._pending_profile: tuple[int, dict[str, Any]] | None = None
        self.diagnostics_status = "Idle"

    # ------------------------------------------------------------------ CsmsChannel

    @property
    def online(self) -> bool:
        return self._accepted.is_set()

    def metadata(self) -> dict[str, Any]:
        return self.metrics.snapshot()

    async def start(self) -> None:
        stored = await self.journal.kv_get(SETTINGS_KEY, {})
        self.settings = Settings(len(self.port.connectors), PROFILES, dict(stored), self._persist_setting)
        self.settings.on_change = self._setting_changed
        self.auth = Authorizer(self.journal, self.settings)
        await self.auth.load()
        self.inoperative = set(await self.journal.kv_get(AVAILABILITY_KEY, []))
        self.profiles.load(await self.journal.kv_get(PROFILES_KEY, []))
        self.profiles.attach()
        self.metrics.dead_letters = await self.journal.dead_count()
        self.tracker = TxTracker(
            self.port, self.journal, self.settings, self._wake_sender.set, self.send_volatile, self.cfg.free_vend_id_tag
        )
        self.tracker.on_start_failed = lambda cid, tag, why: log.warning("ocpp_start_refused", connector=cid, id_tag=tag, reason=why)
        await self.tracker.load()
        for cid in self.inoperative:
            connector = self.port.connectors.get(cid)
            if connector is not None and not connector.in_session():
                await connector.set_unavailable("ocpp_inoperative")
        self._tasks = [
            asyncio.create_task(self.tracker.run(), name="ocpp-transactions"),
            asyncio.create_task(self._local_loop(), name="ocpp-local"),
        ]
        self._task = asyncio.create_task(self._run(), name="ocpp-channel")
        log.info("ocpp_channel_started", url=self.cfg.url, charge_point_id=self.cp_id)

    async def stop(self) -> None:
        """Close the socket; the journal keeps whatever is unsent. Sessions are not touched."""
        await stop_tasks([self._task, *self._tasks, *self._background], report_failures=False)
        self._task, self._tasks = None, []
        self.profiles.detach()
        self._accepted.clear()
        self.metrics.connected = False

    async def force_reconnect(self) -> None:
        self._reconnect_now.set()
        if self._ws is not None:
            await self._ws.close(code=1012, reason="reconnect requested")

    # ------------------------------------------------------------------ connection loop

    def _url(self) -> str:
        return f"{self.cfg.url}/{self.cp_id}"

    def _headers(self) -> dict[str, str]:
        password = self.cfg.read_password()
        if password is None:
            return {}
        token = base64.b64encode(f"{self.cp_id}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def _ssl(self) -> ssl.SSLContext | None:
        if not self.cfg.url.startswith("wss://"):
            return None
        context = ssl.create_default_context(cafile=str(self.cfg.ca_file) if self.cfg.ca_file else None)
        return context

    async def _run(self) -> None:
        attempt = 0
        while True:
            self._reconnect_now.clear()
            self.metrics.upgrade_attempts += 1
            try:
                ping = self.settings.get_int("WebSocketPingInterval") or None
                async with connect(
                    self._url(),
                    subprotocols=[websockets.Subprotocol("ocpp1.6")],
                    additional_headers=self._headers(),
                    ssl=self._ssl(),
                    proxy=None,
                    open_timeout=10,
                    ping_interval=ping,
                    ping_timeout=ping,
                    close_timeout=5,
                ) as ws:
                    if ws.subprotocol != "ocpp1.6":
                        raise ConnectionError(f"CSMS did not agree to ocpp1.6 (got {ws.subprotocol!r})")
                    self._ws = ws
                    self.metrics.connected = True
                    self.metrics.connects += 1
                    log.info("ocpp_connected", url=self._url())
                    if await self._connected(ws):
                        attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.metrics.last_error = f"{type(exc).__name__}: {exc}"[:200]
                log.warning("ocpp_connection_failed", error=self.metrics.last_error)
            finally:
                self._ws = None
                self._cp = None
                self._accepted.clear()
                self.metrics.connected = False
            if self._reconnect_now.is_set():
                continue
            step = min(self.cfg.reconnect_max_s, self.cfg.reconnect_min_s * (2 ** min(attempt, 16)))
            delay = step * random.uniform(0.5, 1.0)
            attempt += 1
            log.info("ocpp_reconnect_in", seconds=round(delay, 1))
            try:
                await asyncio.wait_for(self._reconnect_now.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def _connected(self, ws: ClientConnection) -> bool:
        """Serve one connection until it drops; True when a boot was accepted on it."""
        cp = ChargePoint16(self.cp_id, CountingConnection(ws, self.metrics), self, self.cfg.call_timeout_s)
        self._cp = cp
        reader = asyncio.create_task(cp.start(), name="ocpp-reader")
        main = asyncio.create_task(self._online(cp), name="ocpp-online")
        booted = False
        try:
            done, _ = await asyncio.wait({reader, main}, return_when=asyncio.FIRST_COMPLETED)
            booted = self._accepted.is_set()
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    exc = task.exception()
                    self.metrics.last_error = f"{type(exc).__name__}: {exc}"[:200]
        finally:
            booted = booted or self._accepted.is_set()
            self._accepted.clear()
            # the caller's own cancellation (stop()) must propagate, not pass for theirs
            await stop_tasks((main, reader), report_failures=False)
        return booted

    async def _call(self, payload: Any) -> Any:
        cp = self._cp
        if cp is None:
            raise ConnectionError("not connected")
        return await cp.call(payload, suppress=False)

    async def _online(self, cp: ChargePoint16) -> None:
        while not self._booted_once:
            answer = await self._call(
                call.BootNotification(
                    charge_point_vendor=self.port.vendor[:20],
                    charge_point_model=self.port.model[:20],
                    charge_point_serial_number=self.port.serial_number[:25],
                    firmware_version=self.port.firmware_version[:50],
                )
            )
            self.metrics.boot_status = answer.status
            if answer.status == "Accepted":
                if answer.interval and answer.interval > 0:
                    self.settings.change("HeartbeatInterval", str(answer.interval))
                log.info("ocpp_boot_accepted", charge_point_id=self.cp_id)
                self._booted_once = True
                break
            retry = answer.interval if answer.interval and answer.interval > 0 else self.cfg.boot_retry_s
            log.warning("ocpp_boot_not_accepted", status=answer.status, retry_s=retry)
            await asyncio.sleep(retry)
        log.info("ocpp_online", charge_point_id=self.cp_id)
        self._accepted.set()
        self._sent_status = {}
        await self._send_statuses(force=True)
        tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="ocpp-heartbeat"),
            asyncio.create_task(self._sender_loop(), name="ocpp-sender"),
            asyncio.create_task(self._status_loop(), name="ocpp-status"),
            asyncio.create_task(self._volatile_loop(), name="ocpp-volatile"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            await stop_tasks(tasks, report_failures=False)

    # ------------------------------------------------------------------ periodic traffic

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(max(self.settings.get_int("HeartbeatInterval"), 1))
            await self._call(call.Heartbeat())

    def _statuses(self) -> dict[int, tuple[str, str, str | None]]:
        out: dict[int, tuple[str, str, str | None]] = {}
        faults = self.port.faults
        station = [f.fault_id for f in faults.active() if f.connector_id is None and f.definition.severity.value == "error"]
        code, vendor = error_code(station)
        out[0] = ("Unavailable" if 0 in self.inoperative else ("Faulted" if station else "Available"), code, vendor)
        finishing = self.tracker.finishing if self.tracker is not None else set()
        for cid, c in self.port.connectors.items():
            reading = c.hw.meter.reading()
            waiting = self.tracker is not None and cid in self.tracker.pending and c.state.value == "idle"
            status = connector_status(
                "vehicle_connected" if waiting else c.state.value,
                finishing=cid in finishing,
                inoperative=cid in self.inoperative,
                power_kw=reading.power_kw if reading is not None else None,
                limit_kw=c.effective_limit_kw(),
            )
            mine = [f.fault_id for f in faults.active(cid) if f.connector_id == cid]
            code, vendor = error_code(mine if status == "Faulted" else [f for f in mine if f in ("F-0203",)])
            out[cid] = (status, code, vendor)
        return out

    async def _send_statuses(self, *, force: bool = False, only: int | None = None) -> None:
        for cid, (status, code, vendor) in self._statuses().items():
            if only is not None and cid != only:
                continue
            if not force and self._sent_status.get(cid) == (status, code):
                continue
            await self._call(
                call.StatusNotification(
                    connector_id=cid, error_code=code, status=status, timestamp=iso(utc_now()), vendor_error_code=vendor
                )
            )
            self._sent_status[cid] = (status, code)

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            await self._send_statuses()

    async def _volatile_loop(self) -> None:
        while True:
            action, payload = await self._volatile.get()
            try:
                await self._call(getattr(call, action)(**payload))
            except OCPPError as exc:
                log.warning("ocpp_call_refused", action=action, error=exc.code)

    def send_volatile(self, action: str, payload: dict[str, Any]) -> None:
        """Queue a non-transaction message for the current connection (dropped when offline)."""
        if self.online and not self._volatile.full():
            self._volatile.put_nowait((action, payload))

    # ------------------------------------------------------------------ transaction messages

    async def _sender_loop(self) -> None:
        while True:
            message = await self.journal.head()
            self.metrics.queue_depth = await self.journal.depth()
            if message is None:
                self._wake_sender.clear()
                await self._wake_sender.wait()
                continue
            await self._deliver(message)

    async def _deliver(self, message: QueuedMessage) -> None:
        payload = dict(message.payload)
        if message.local_tx is not None and message.action != "StartTransaction":
            row = await self.journal.transaction(message.local_tx)
            if row is None or row.transaction_id is None:
                await self._dead(message, "its StartTransaction was never answered")
                return
            payload["transaction_id"] = row.transaction_id
        try:
            answer = await self._call(getattr(call, message.action)(**payload))
        except (OCPPError, asyncio.TimeoutError) as exc:
            error = exc.code if isinstance(exc, OCPPError) else "Timeout"
            attempts = await self.journal.failed_attempt(message.seq)
            log.warning("ocpp_tx_message_failed", action=message.action, seq=message.seq, attempts=attempts, error=error)
            if attempts >= self.settings.get_int("TransactionMessageAttempts"):
                await self._dead(message, f"{error} after {attempts} attempts")
            else:
                await asyncio.sleep(self.settings.get_int("TransactionMessageRetryInterval") * attempts)
            return
        if message.action == "StartTransaction":
            transaction_id = int(answer.transaction_id)
            await self.journal.delivered(message.seq, message.local_tx, transaction_id)
            assert self.tracker is not None and message.local_tx is not None
            self.tracker.transaction_answered(message.local_tx, transaction_id)
            info = dict(answer.id_tag_info or {})
            await self.auth.remember(str(payload["id_tag"]), info)
            if info.get("status") != "Accepted" and self.settings.get_bool("StopTransactionOnInvalidId"):
                self._stop_local(message.local_tx, "DeAuthorized")
            log.info("ocpp_transaction_id", local_tx=message.local_tx, transaction_id=transaction_id)
        else:
            await self.journal.delivered(message.seq)
            if message.action == "StopTransaction":
                self.profiles.transaction_ended(int(payload.get("connector_id", 0) or 0))

    async def _dead(self, message: QueuedMessage, why: str) -> None:
        await self.journal.dead_letter(message.seq, why)
        self.metrics.dead_letters += 1
        log.error("ocpp_dead_letter", action=message.action, seq=message.seq, local_tx=message.local_tx, error=why)
        self.port.faults.raise_(DEAD_LETTER_FAULT, None, action=message.action, seq=message.seq, error=why)

    def _stop_local(self, local_tx: str | None, reason: str) -> None:
        assert self.tracker is not None
        for cid, connector in self.port.connectors.items():
            if connector.session is not None and connector.session.record_id == local_tx:
                self.tracker.stop(cid, reason, "user_request")

    # ------------------------------------------------------------------ local work, online or not

    async def _local_loop(self) -> None:
        """Charging profiles (every second), persisted state, ID-token taps."""
        taps = [asyncio.create_task(self._reader_loop(cid, r), name=f"ocpp-reader-{cid}") for cid, r in self.port.readers.items()]
        ticks = 0
        try:
            while True:
                if ticks % 3600 == 0:
                    await self.journal.purge_closed()
                ticks += 1
                pending = self._pending_profile
                if pending is not None and self._tx_start(pending[0]) is not None:
                    self._pending_profile = None
                    self.profiles.set(*pending)
                self.profiles.apply()
                await self.profiles.flush()
                await asyncio.sleep(1.0)
        finally:
            await stop_tasks(taps, report_failures=False)

    async def _reader_loop(self, connector_id: int, reader: Any) -> None:
        start = getattr(reader, "start", None)
        if start is not None:
            await start()
        while True:
            token = await reader.next_tap()
            try:
                await self.token_presented(connector_id, str(token))
            except Exception:
                log.exception("ocpp_tap_failed", connector=connector_id)

    async def _ask_csms(self, id_tag: str) -> dict[str, Any] | None:
        if not self.online:
            return None
        try:
            answer = await asyncio.wait_for(self._call(call.Authorize(id_tag=id_tag)), self.cfg.call_timeout_s)
        except (OCPPError, asyncio.TimeoutError, ConnectionError):
            return None
        return dict(answer.id_tag_info)

    async def token_presented(self, connector_id: int, id_tag: str) -> str:
        """A card tap: stop our own transaction, or authorise a new one (the status returned)."""
        assert self.tracker is not None
        running = self.tracker.id_tag(connector_id)
        if running is not None:
            if running == id_tag:
                self.tracker.stop(connector_id, "Local", "user_request")
                return "Accepted"
            return "Rejected"
        info = await self.auth.authorize(id_tag, online=self.online, ask=self._ask_csms)
        status = str(info.get("status"))
        log.info("ocpp_token", connector=connector_id, id_tag=id_tag, status=status)
        if status == "Accepted":
            self._arm(connector_id, id_tag, remote=False)
        return status

    # ------------------------------------------------------------------ persistence

    def _persist_setting(self, key: str, value: str) -> None:
        stored = {k: v for k, v in self.settings._values.items() if v != self.settings.defs[k].default}
        stored[key] = value
        self.start_background(self.journal.kv_set(SETTINGS_KEY, stored))

    def _setting_changed(self, key: str, _value: str) -> None:
        if key in ("WebSocketPingInterval",):
            log.info("ocpp_setting_applies_on_reconnect", key=key)

    async def _persist_profiles(self, profiles: list[dict[str, Any]]) -> None:
        await self.journal.kv_set(PROFILES_KEY, profiles)

