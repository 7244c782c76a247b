"""Helpers for the emulator tests: a controllable clock and a minimal device-side HTTP client."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aiohttp

from agent.channels.tellus.models import ERROR_CODES, DeviceEndpoint, ErrorCode

HEARTBEAT = {"timestamp": "2025-03-15T10:30:00Z", "status": "online", "fault_code": 0}
TELEMETRY = {
    "timestamp": "2025-03-15T10:30:05Z",
    "connector_id": 1,
    "state": "charging",
    "voltage": 220.5,
    "current": 32.0,
    "power": 7.04,
    "energy_delivered": 12.3,
    "soc": 55,
    "temperature": 35.2,
}
EVENT = {
    "timestamp": "2025-03-15T10:36:00Z",
    "event_type": "fault",
    "connector_id": 1,
    "data": {
        "fault_code": 1001,
        "fault_message": "Overcurrent protection",
        "details": {"current": 40.5, "threshold": 32.0},
    },
}
CDR = {
    "record_id": "rec_9x8y7z6w",
    "connector_id": 1,
    "start_time": "2025-03-15T09:00:00Z",
    "end_time": "2025-03-15T10:30:00Z",
    "energy": 15.2,
    "max_power": 7.2,
    "avg_power": 6.8,
    "cost": 12.16,
    "meter_start": 12345.6,
    "meter_end": 12360.8,
    "vehicle_info": {"vin": "LVXFA394XJ1234567", "soc_start": 20, "soc_end": 90},
}
FIRMWARE = {
    "firmware_version": "2.2.0",
    "status": "downloading",
    "progress": 45,
    "message": "Downloading...",
}
REGISTRATION = {
    "sn": "SN1234567890",
    "model": "AC-7kW-V2",
    "manufacturer": "ChargeTech",
    "firmware_version": "2.1.0",
    "mac": "00:1A:2B:3C:4D:5E",
}


class FakeClock:
    """Monotonic clock the test moves by hand (token expiry, rate limits, outages)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Reply:
    """An HTTP answer: status, parsed JSON body (``None`` if not JSON), raw text, headers."""

    status: int
    body: Any
    text: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def code(self) -> Any:
        return self.body.get("code") if isinstance(self.body, dict) else None

    @property
    def data(self) -> Any:
        return self.body.get("data") if isinstance(self.body, dict) else None

    @property
    def details(self) -> Any:
        return self.body.get("details") if isinstance(self.body, dict) else None


def assert_error(reply: Reply, code: ErrorCode, **details: Any) -> None:
    """The reply is an enveloped error with ``code``, the matching HTTP status, ``data`` null
    and (when given) exactly these ``details`` entries."""
    assert reply.code == code, reply.body
    assert reply.status == ERROR_CODES[code].http_status, reply.body
    assert reply.body["data"] is None
    assert isinstance(reply.body["message"], str) and reply.body["message"]
    for key, value in details.items():
        assert reply.details[key] == value, reply.details


def assert_ok(reply: Reply) -> None:
    """The reply is a 200 success envelope."""
    assert reply.status == 200, reply.body
    assert reply.code == 0, reply.body
    assert reply.body["message"]


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    json_body: Any = None,
    raw: str | bytes | None = None,
    token: str | None = None,
    params: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Reply:
    """One HTTP request; JSON-encodes ``json_body`` unless ``raw`` is given."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    kwargs: dict[str, Any] = {"headers": headers, "timeout": aiohttp.ClientTimeout(total=timeout)}
    if raw is not None:
        kwargs["data"] = raw
    elif json_body is not None:
        kwargs["json"] = json_body
    if params is not None:
        kwargs["params"] = params
    async with http.request(method, url, **kwargs) as resp:
        text = await resp.text()
        try:
            body = await resp.json(content_type=None)
        except ValueError:
            body = None
        return Reply(resp.status, body, text, dict(resp.headers))


@dataclass
class DeviceClient:
    """A registered device holding a token, talking to the emulator's ``/v1`` API."""

    http: aiohttp.ClientSession
    api_url: str
    device_id: str
    device_secret: str
    token: str

    async def post(
        self, endpoint: DeviceEndpoint, body: Any = None, *, raw: str | None = None,
        token: str | None = None,
    ) -> Reply:
        return await call(
            self.http, "POST", self.api_url + endpoint.value, json_body=body, raw=raw,
            token=self.token if token is None else token,
        )

    async def poll(
        self, params: dict[str, str], *, token: str | None = None, timeout: float = 30.0
    ) -> Reply:
        return await call(
            self.http, "GET", self.api_url + DeviceEndpoint.COMMANDS.value, params=params,
            token=self.token if token is None else token, timeout=timeout,
        )

    async def heartbeat(self) -> Reply:
        return await self.post(DeviceEndpoint.HEARTBEAT, HEARTBEAT)

    async def refresh_token(self) -> Reply:
        reply = await call(
            self.http, "POST", self.api_url + DeviceEndpoint.TOKEN.value,
            json_body={"device_id": self.device_id, "device_secret": self.device_secret,
                       "grant_type": "client_credentials"},
        )
        if reply.status == 200:
            self.token = reply.body["access_token"]
        return reply


async def register_device(
    http: aiohttp.ClientSession, api_url: str, sn: str = "SN1234567890"
) -> DeviceClient:
    """Register ``sn`` and obtain a token."""
    reg = await call(http, "POST", api_url + DeviceEndpoint.REGISTER.value,
                     json_body={**REGISTRATION, "sn": sn})
    assert reg.status == 200, reg.body
    data = reg.data
    client = DeviceClient(http, api_url, data["device_id"], data["device_secret"], "")
    tok = await client.refresh_token()
    assert tok.status == 200, tok.body
    return client
