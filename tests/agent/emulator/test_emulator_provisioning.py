"""Registration, token exchange and bearer authentication against the emulator."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from agent.channels.tellus.models import DeviceEndpoint, ErrorCode
from agent.emulator import Emulator, OperatorClient, RequestKind
from tests.agent.emulator.emu_testkit import (
    HEARTBEAT,
    REGISTRATION,
    DeviceClient,
    FakeClock,
    assert_error,
    assert_ok,
    call,
    register_device,
)


async def _register(http: aiohttp.ClientSession, emulator: Emulator, body: Any = None,
                    raw: str | bytes | None = None) -> Any:
    return await call(http, "POST", emulator.api_url + "/device/register",
                      json_body=body, raw=raw)


async def _token(http: aiohttp.ClientSession, emulator: Emulator, body: Any) -> Any:
    return await call(http, "POST", emulator.api_url + "/device/token", json_body=body)


async def test_register_returns_enveloped_credentials(
    emulator: Emulator, http: aiohttp.ClientSession, operator: OperatorClient
) -> None:
    reply = await _register(http, emulator, REGISTRATION)
    assert_ok(reply)
    data = reply.data
    assert set(data) == {"device_id", "device_secret", "expires_in"}
    assert isinstance(data["device_id"], str) and data["device_id"]
    assert isinstance(data["device_secret"], str) and data["device_secret"]
    assert data["expires_in"] == 86400
    devices = await operator.devices()
    assert [(d.device_id, d.sn, d.model, d.mac) for d in devices] == [
        (data["device_id"], "SN1234567890", "AC-7kW-V2", "00:1A:2B:3C:4D:5E")
    ]


async def test_register_accepts_missing_optional_mac_and_refuses_unknown_fields(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    body = {k: v for k, v in REGISTRATION.items() if k != "mac"}
    assert_error(
        await _register(http, emulator, body | {"hw_rev": "B"}),
        ErrorCode.INVALID_PARAMETER,
        field="hw_rev",
    )
    assert_ok(await _register(http, emulator, body))


async def test_second_registration_of_same_sn_is_conflict(
    emulator: Emulator, http: aiohttp.ClientSession, operator: OperatorClient
) -> None:
    assert_ok(await _register(http, emulator, REGISTRATION))
    again = await _register(http, emulator, {**REGISTRATION, "model": "other"})
    assert_error(again, ErrorCode.CONFLICT)
    assert len(await operator.devices()) == 1
    assert_ok(await _register(http, emulator, {**REGISTRATION, "sn": "SN-OTHER"}))


@pytest.mark.parametrize(
    ("body", "code", "details"),
    [
        ({k: v for k, v in REGISTRATION.items() if k != "sn"}, ErrorCode.MISSING_PARAMETER,
         {"field": "sn"}),
        ({k: v for k, v in REGISTRATION.items() if k != "firmware_version"},
         ErrorCode.MISSING_PARAMETER, {"field": "firmware_version"}),
        ({**REGISTRATION, "sn": 12345}, ErrorCode.INVALID_PARAMETER,
         {"field": "sn", "value": 12345}),
        ({**REGISTRATION, "mac": None}, ErrorCode.INVALID_PARAMETER,
         {"field": "mac", "value": None}),
        ([REGISTRATION], ErrorCode.INVALID_PARAMETER, {"field": "body"}),
    ],
    ids=["missing-sn", "missing-firmware", "sn-not-string", "mac-null", "array-body"],
)
async def test_register_validation_errors(
    emulator: Emulator, http: aiohttp.ClientSession, body: Any, code: ErrorCode,
    details: dict[str, Any],
) -> None:
    assert_error(await _register(http, emulator, body), code, **details)


@pytest.mark.parametrize("raw", ["{not json", "", '{"sn": NaN}', b"\xff\xfe{}"])
async def test_malformed_json_is_1001(
    emulator: Emulator, http: aiohttp.ClientSession, raw: str | bytes
) -> None:
    assert_error(await _register(http, emulator, raw=raw), ErrorCode.INVALID_PARAMETER)


async def test_token_is_not_enveloped(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    reg = (await _register(http, emulator, REGISTRATION)).data
    reply = await _token(http, emulator, {"device_id": reg["device_id"],
                                          "device_secret": reg["device_secret"],
                                          "grant_type": "client_credentials"})
    assert reply.status == 200
    assert set(reply.body) == {"access_token", "token_type", "expires_in"}
    assert reply.body["token_type"] == "Bearer"
    assert reply.body["expires_in"] == 60  # the fixture's token_ttl
    assert isinstance(reply.body["access_token"], str) and reply.body["access_token"]


@pytest.mark.parametrize("which", ["wrong-secret", "unknown-device"])
async def test_token_with_bad_credentials_is_401(
    emulator: Emulator, http: aiohttp.ClientSession, which: str
) -> None:
    reg = (await _register(http, emulator, REGISTRATION)).data
    body = {"device_id": reg["device_id"], "device_secret": reg["device_secret"] + "x",
            "grant_type": "client_credentials"}
    if which == "unknown-device":
        body = {**body, "device_id": "dvc_nope", "device_secret": reg["device_secret"]}
    reply = await _token(http, emulator, body)
    assert_error(reply, ErrorCode.UNAUTHENTICATED)
    assert reply.status == 401


@pytest.mark.parametrize(
    ("change", "code", "field"),
    [
        ({"grant_type": "password"}, ErrorCode.INVALID_PARAMETER, "grant_type"),
        ({"grant_type": None}, ErrorCode.INVALID_PARAMETER, "grant_type"),
        ({"device_secret": ...}, ErrorCode.MISSING_PARAMETER, "device_secret"),
        ({"grant_type": ...}, ErrorCode.MISSING_PARAMETER, "grant_type"),
    ],
)
async def test_token_validation_errors(
    emulator: Emulator, http: aiohttp.ClientSession, change: dict[str, Any], code: ErrorCode,
    field: str,
) -> None:
    body: dict[str, Any] = {"device_id": "d", "device_secret": "s",
                            "grant_type": "client_credentials"}
    for key, value in change.items():
        if value is ...:
            del body[key]
        else:
            body[key] = value
    assert_error(await _token(http, emulator, body), code, field=field)


async def test_request_log_redacts_secrets_and_tokens(
    device: DeviceClient, operator: OperatorClient
) -> None:
    log = await operator.received()
    assert [r.kind for r in log] == [RequestKind.REGISTER, RequestKind.TOKEN]
    dump = "".join(r.model_dump_json() for r in log)
    assert device.device_secret not in dump
    assert device.token not in dump
    assert log[1].body["device_secret"] == "***"
    assert log[1].response["access_token"] == "***"
    assert log[0].response["data"]["device_secret"] == "***"
    assert log[1].device_id == device.device_id


# ------------------------------------------------------------------ bearer authentication

AUTHED = [
    ("POST", DeviceEndpoint.HEARTBEAT),
    ("POST", DeviceEndpoint.TELEMETRY),
    ("POST", DeviceEndpoint.EVENTS),
    ("POST", DeviceEndpoint.CHARGING_RECORDS),
    ("GET", DeviceEndpoint.COMMANDS),
    ("POST", DeviceEndpoint.COMMAND_STATUS),
    ("POST", DeviceEndpoint.FIRMWARE_STATUS),
]


@pytest.mark.parametrize(("method", "endpoint"), AUTHED, ids=[e.name for _, e in AUTHED])
@pytest.mark.parametrize("header", [None, "Bearer", "Bearer not-a-token", "Basic abc"])
async def test_authenticated_endpoints_reject_missing_or_invalid_token(
    emulator: Emulator, http: aiohttp.ClientSession, device: DeviceClient, method: str,
    endpoint: DeviceEndpoint, header: str | None,
) -> None:
    headers = {} if header is None else {"Authorization": header}
    async with http.request(method, emulator.api_url + endpoint.value, json={},
                            params={"connector_id": "1", "wait": "1"}, headers=headers) as resp:
        body = await resp.json()
        assert resp.status == 401
    assert body["code"] == ErrorCode.UNAUTHENTICATED
    assert body["data"] is None


async def test_token_expires_after_ttl_with_2002(
    device: DeviceClient, clock: FakeClock
) -> None:
    assert_ok(await device.heartbeat())
    clock.advance(59.5)
    assert_ok(await device.heartbeat())
    clock.advance(1.0)
    assert_error(await device.heartbeat(), ErrorCode.TOKEN_EXPIRED)
    assert (await device.refresh_token()).status == 200
    assert_ok(await device.heartbeat())


async def test_forced_expiry_gives_2002_then_new_token_works(
    device: DeviceClient, operator: OperatorClient
) -> None:
    assert await operator.expire_tokens(device.device_id) == 1
    reply = await device.post(DeviceEndpoint.TELEMETRY, {})
    assert_error(reply, ErrorCode.TOKEN_EXPIRED)
    log = await operator.received(RequestKind.TELEMETRY)
    assert log[-1].device_id == device.device_id and log[-1].code == ErrorCode.TOKEN_EXPIRED
    await device.refresh_token()
    assert_ok(await device.heartbeat())


async def test_forced_expiry_for_all_devices_only_counts_live_tokens(
    emulator: Emulator, http: aiohttp.ClientSession, device: DeviceClient,
    operator: OperatorClient,
) -> None:
    other = await register_device(http, emulator.api_url, sn="SN-2")
    assert await operator.expire_tokens() == 2
    assert await operator.expire_tokens() == 0
    assert_error(await other.heartbeat(), ErrorCode.TOKEN_EXPIRED)


async def test_revoked_token_is_2001(device: DeviceClient, operator: OperatorClient) -> None:
    assert await operator.revoke_tokens(device.device_id) == 1
    assert_error(await device.heartbeat(), ErrorCode.UNAUTHENTICATED)


async def test_deleted_device_loses_credentials_and_may_register_again(
    emulator: Emulator, http: aiohttp.ClientSession, device: DeviceClient,
    operator: OperatorClient,
) -> None:
    await operator.delete_device(device.device_id)
    assert_error(await device.heartbeat(), ErrorCode.UNAUTHENTICATED)
    assert_error(await device.refresh_token(), ErrorCode.UNAUTHENTICATED)
    again = await register_device(http, emulator.api_url)
    assert again.device_id != device.device_id
    assert_ok(await again.post(DeviceEndpoint.HEARTBEAT, HEARTBEAT))
