"""PlatformHttp / ApiResult: transport security, envelope parsing, error classification."""

from __future__ import annotations

import socket

import pytest

from agent.channels.tellus.client import ApiResult, PlatformHttp, _parse


@pytest.mark.parametrize(
    "url",
    [
        "http://api.telluspower.example.com/v1",
        "http://192.168.1.10:8080/v1",
        "http://10.0.0.1/v1",
        "ftp://127.0.0.1/v1",
    ],
)
def test_plain_http_off_loopback_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="insecure"):
        PlatformHttp(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://api.telluspower.example.com/v1",
        "http://127.0.0.1:8080/v1",
        "http://localhost/v1",
        "http://[::1]:9/v1",
    ],
)
def test_https_and_loopback_http_are_accepted(url: str) -> None:
    http = PlatformHttp(url)
    assert http.base_url == url.rstrip("/")


def test_https_context_verifies_certificates() -> None:
    import ssl

    http = PlatformHttp("https://api.telluspower.example.com/v1")
    assert http._ssl is not None
    assert http._ssl.verify_mode == ssl.CERT_REQUIRED and http._ssl.check_hostname
    assert http._ssl.minimum_version >= ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize(
    ("status", "text", "kind"),
    [
        (200, '{"code":0,"message":"success","data":null}', "ok"),
        (200, "", "ok"),  # "accepted" endpoints may answer with an empty body
        (200, "<html>captive portal</html>", "transient"),  # never ack on a non-platform answer
        (200, "[1,2]", "transient"),
        (200, '{"code":1001,"message":"bad","data":null}', "permanent"),
        (
            400,
            '{"code":1001,"message":"invalid","data":null,"details":{"field":"power"}}',
            "permanent",
        ),
        (400, '{"code":1002,"message":"missing","data":null}', "permanent"),
        (401, '{"code":2001,"message":"invalid token","data":null}', "auth"),
        (401, '{"code":2002,"message":"token expired","data":null}', "auth"),
        (403, '{"code":2003,"message":"denied","data":null}', "forbidden"),
        (404, '{"code":3001,"message":"not found","data":null}', "not_found"),
        (409, '{"code":4001,"message":"conflict","data":null}', "conflict"),
        (429, '{"code":5001,"message":"Too many requests","data":null}', "rate_limited"),
        (500, '{"code":9001,"message":"internal","data":null}', "transient"),
        (503, "503 Service Unavailable", "transient"),
        (502, "", "transient"),
        (301, "", "transient"),
    ],
)
def test_classification(status: int, text: str, kind: str) -> None:
    result = _parse(status, text, enveloped=True)
    assert result.kind == kind
    assert result.ok is (kind == "ok")


def test_token_answer_is_not_enveloped() -> None:
    result = _parse(
        200, '{"access_token":"abc","token_type":"Bearer","expires_in":86400}', enveloped=False
    )
    assert result.ok and result.data["access_token"] == "abc"
    rejected = _parse(
        401, '{"code":2001,"message":"invalid device credentials","data":null}', enveloped=False
    )
    assert rejected.kind == "auth"


def test_retry_after_from_details_then_header() -> None:
    body = '{"code":5001,"message":"Too many requests","data":null,"details":{"retry_after_seconds":17}}'
    assert _parse(429, body, enveloped=True).retry_after == 17.0
    bare = _parse(429, '{"code":5001,"message":"Too many requests","data":null}', enveloped=True)
    assert bare.retry_after is None
    bare.retry_after_header = 3.0
    assert bare.retry_after == 3.0
    assert (
        "field power"
        in _parse(
            400,
            '{"code":1001,"message":"invalid","data":null,"details":{"field":"power"}}',
            enveloped=True,
        ).describe()
    )


async def test_network_error_is_transient_and_never_raises() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    http = PlatformHttp(f"http://127.0.0.1:{port}/v1", timeout_s=2.0)
    try:
        result = await http.request("POST", "/device/heartbeat", body={})
    finally:
        await http.close()
    assert result.http_status is None and result.kind == "transient" and result.error
    assert isinstance(result, ApiResult)


async def test_redirects_are_not_followed() -> None:
    from aiohttp import web

    hits: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        hits.append(request.path)
        raise web.HTTPFound("/elsewhere")

    async def elsewhere(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"code": 0, "message": "success", "data": None})

    app = web.Application()
    app.router.add_post("/v1/device/events", redirect)
    app.router.add_post("/elsewhere", elsewhere)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    http = PlatformHttp(f"http://127.0.0.1:{port}/v1")
    try:
        result = await http.request("POST", "/device/events", body={}, token="tok")
    finally:
        await http.close()
        await runner.cleanup()
    assert result.http_status == 302 and not result.ok and result.kind == "transient"
    assert hits == ["/v1/device/events"]  # the bearer token never followed the redirect
