"""A local OCPP 1.6-J CSMS for tests and the demo, on the ``ocpp`` package's central-system side.

Strict by design (an oracle at least as strict as a real CSMS):

* every CALL from the charge point is validated against the official 1.6 JSON schema
  (shipped with the ``ocpp`` package) before its handler runs, and every answer before it
  is sent; every CALL the CSMS sends is validated before sending and its CALLRESULT
  after receipt. Each failure is recorded in :attr:`Csms.violations` (a test asserts it
  stays empty) and the charge point gets the CALLERROR the spec asks for;
* a charge point that sends anything but BootNotification before its boot was accepted
  is a violation;
* HTTP Basic auth (user = identity) when a password is set; subprotocol ``ocpp1.6``.

Test controls: :meth:`Csms.refuse_for` (upgrades answered 503 for a while),
:meth:`Csms.drop` (close the sockets), :meth:`Csms.call` (a CSMS-initiated CALL),
:meth:`Csms.send_raw` (any frame, e.g. a malformed one). Everything received is in
:attr:`Csms.frames` (raw, both directions) and :attr:`Csms.calls` (parsed CALLs).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any

import structlog
from ocpp.exceptions import OCPPError
from ocpp.routing import on
from ocpp.v16 import ChargePoint as OcppChargePoint, call_result
from ocpp.v16.enums import Action
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

log = structlog.get_logger(__name__)


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class Frame:
    cp_id: str
    direction: str  # "in" (from the charge point) | "out"
    text: str
    at: float

    @property
    def message(self) -> list[Any] | None:
        try:
            value = json.loads(self.text)
        except ValueError:
            return None
        return value if isinstance(value, list) else None


@dataclass
class ReceivedCall:
    cp_id: str
    action: str
    payload: dict[str, Any]  # camelCase, as sent
    at: float


@dataclass
class Station:
    cp_id: str
    connection: ServerConnection
    cp: "CentralChargePoint"
    booted: bool = False
    statuses: dict[int, str] = field(default_factory=dict)


class _Recorder:
    def __init__(self, connection: ServerConnection, csms: "Csms", cp_id: str) -> None:
        self.connection = connection
        self.csms = csms
        self.cp_id = cp_id

    async def recv(self) -> str:
        text = await self.connection.recv()
        text = text if isinstance(text, str) else text.decode("utf-8", "replace")
        self.csms.frames.append(Frame(self.cp_id, "in", text, time.time()))
        return text

    async def send(self, text: str) -> None:
        self.csms.frames.append(Frame(self.cp_id, "out", text, time.time()))
        await self.connection.send(text)


class CentralChargePoint(OcppChargePoint):
    """The CSMS side of one charge point's connection."""

    def __init__(self, cp_id: str, connection: Any, csms: "Csms") -> None:
        super().__init__(cp_id, connection, response_timeout=30)
        self.csms = csms
        self.station: Station | None = None

    async def _handle_call(self, msg: Any) -> Any:
        call = ReceivedCall(self.id, msg.action, dict(msg.payload) if isinstance(msg.payload, dict) else {}, time.time())
        self.csms.calls.append(call)
        if msg.action != "BootNotification" and self.station is not None and not self.station.booted:
            self.csms.violations.append(f"{self.id}: {msg.action} before the boot was accepted")
        try:
            return await super()._handle_call(msg)
        except OCPPError as exc:
            self.csms.violations.append(f"{self.id}: {msg.action}: {exc.code}: {exc.description}")
            raise

    @on(Action.boot_notification)
    def on_boot(self, **_: Any) -> Any:
        status = self.csms.boot_status
        if self.station is not None and status == "Accepted":
            self.station.booted = True
            self.csms.accepted_ids.add(self.id)
        return call_result.BootNotification(current_time=_now(), interval=self.csms.heartbeat_interval, status=status)

    @on(Action.heartbeat)
    def on_heartbeat(self, **_: Any) -> Any:
        return call_result.Heartbeat(current_time=_now())

    @on(Action.status_notification)
    def on_status(self, connector_id: int, status: str, **_: Any) -> Any:
        if self.station is not None:
            self.station.statuses[connector_id] = status
        return call_result.StatusNotification()

    @on(Action.authorize)
    def on_authorize(self, id_tag: str, **_: Any) -> Any:
        return call_result.Authorize(id_tag_info={"status": self.csms.tag_status(id_tag)})

    @on(Action.start_transaction)
    async def on_start(self, id_tag: str, **_: Any) -> Any:
        if self.csms.hold_transactions is not None:
            await self.csms.hold_transactions.wait()
        if self.csms.refuse_transactions:
            raise OCPPError_internal()
        return call_result.StartTransaction(transaction_id=next(self.csms._tx_ids), id_tag_info={"status": self.csms.tag_status(id_tag)})

    @on(Action.stop_transaction)
    def on_stop(self, **_: Any) -> Any:
        if self.csms.refuse_transactions:
            raise OCPPError_internal()
        return call_result.StopTransaction(id_tag_info={"status": "Accepted"})

    @on(Action.meter_values)
    def on_meter_values(self, **_: Any) -> Any:
        if self.csms.refuse_transactions:
            raise OCPPError_internal()
        return call_result.MeterValues()

    @on(Action.data_transfer)
    def on_data_transfer(self, **_: Any) -> Any:
        return call_result.DataTransfer(status="UnknownVendorId")

    @on(Action.firmware_status_notification)
    def on_firmware_status(self, **_: Any) -> Any:
        return call_result.FirmwareStatusNotification()

    @on(Action.diagnostics_status_notification)
    def on_diagnostics_status(self, **_: Any) -> Any:
        return call_result.DiagnosticsStatusNotification()


def OCPPError_internal() -> OCPPError:  # noqa: N802 - reads like the error it builds
    from ocpp.exceptions import InternalError

    return InternalError(description="CSMS refuses transaction messages (test control)")


class Csms:
    """Start with :meth:`start`; ``url`` is the base the charge point appends its identity to."""

    def __init__(self, *, password: str | None = None, heartbeat_interval: int = 300, boot_status: str = "Accepted") -> None:
        self.password = password
        self.heartbeat_interval = heartbeat_interval
        self.boot_status = boot_status
        self.frames: list[Frame] = []
        self.calls: list[ReceivedCall] = []
        self.violations: list[str] = []
        self.stations: dict[str, Station] = {}
        self.accepted_ids: set[str] = set()  # booted once: a reconnect needs no new boot
        self.connects = 0
        self.upgrade_attempts: list[float] = []
        self.refused_until = 0.0
        self.refuse_transactions = False
        self.hold_transactions: asyncio.Event | None = None  # StartTransaction answers wait for it
        self.rejected_tags: set[str] = set()
        self._tx_ids = itertools.count(1001)
        self._server: Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ocpp"

    def tag_status(self, id_tag: str) -> str:
        return "Invalid" if id_tag in self.rejected_tags else "Accepted"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = await serve(
            self._handler, host, port, subprotocols=["ocpp1.6"], process_request=self._process_request  # type: ignore[list-item]
        )
        self.port = next(iter(self._server.sockets)).getsockname()[1]
        log.info("csms_started", url=self.url)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    # ------------------------------------------------------------------ controls

    def refuse_for(self, seconds: float) -> None:
        """Answer every upgrade with 503 for ``seconds`` (and drop the open sockets)."""
        self.refused_until = time.monotonic() + seconds

    async def drop(self) -> None:
        for station in list(self.stations.values()):
            await station.connection.close(code=1001, reason="CSMS going away")

    def station(self, cp_id: str) -> Station:
        return self.stations[cp_id]

    def connected(self, cp_id: str) -> bool:
        st = self.stations.get(cp_id)
        return st is not None and st.booted

    async def call(self, cp_id: str, payload: Any) -> Any:
        """A CSMS-initiated CALL; validated both ways; a CALLERROR raises its OCPPError."""
        return await self.stations[cp_id].cp.call(payload, suppress=False)

    async def send_raw(self, cp_id: str, text: str, unique_id: str, timeout: float = 10.0) -> list[Any]:
        """Send any frame; return the charge point's answer with ``unique_id`` (CALLRESULT/CALLERROR)."""
        start = len(self.frames)
        await self.stations[cp_id].connection.send(text)
        self.frames.append(Frame(cp_id, "out", text, time.time()))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for frame in self.frames[start:]:
                msg = frame.message
                if frame.direction == "in" and msg and msg[0] in (3, 4) and len(msg) > 1 and msg[1] == unique_id:
                    return msg
            await asyncio.sleep(0.05)
        raise TimeoutError(f"no answer to {unique_id}")

    def calls_of(self, action: str, cp_id: str | None = None) -> list[ReceivedCall]:
        return [c for c in self.calls if c.action == action and (cp_id is None or c.cp_id == cp_id)]

    # ------------------------------------------------------------------ server

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        self.upgrade_attempts.append(time.monotonic())
        if time.monotonic() < self.refused_until:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "CSMS unavailable\n")
        cp_id = request.path.rstrip("/").rsplit("/", 1)[-1]
        if self.password is not None:
            expected = "Basic " + base64.b64encode(f"{cp_id}:{self.password}".encode()).decode()
            if request.headers.get("Authorization") != expected:
                response = connection.respond(HTTPStatus.UNAUTHORIZED, "bad credentials\n")
                response.headers = Headers([*response.headers.raw_items(), ("WWW-Authenticate", 'Basic realm="ocpp"')])
                return response
        return None

    async def _handler(self, connection: ServerConnection) -> None:
        assert connection.request is not None
        cp_id = connection.request.path.rstrip("/").rsplit("/", 1)[-1]
        if connection.subprotocol != "ocpp1.6":
            self.violations.append(f"{cp_id}: connected without the ocpp1.6 subprotocol")
            await connection.close(code=1002, reason="ocpp1.6 required")
            return
        cp = CentralChargePoint(cp_id, _Recorder(connection, self, cp_id), self)
        station = Station(cp_id, connection, cp, booted=cp_id in self.accepted_ids)
        self.connects += 1
        cp.station = station
        self.stations[cp_id] = station
        log.info("csms_station_connected", cp_id=cp_id)
        try:
            await cp.start()
        except Exception as exc:
            log.info("csms_station_disconnected", cp_id=cp_id, reason=type(exc).__name__)
        finally:
            if self.stations.get(cp_id) is station:
                station.booted = False
