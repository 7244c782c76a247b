"""Log bundle upload: to a real aiohttp server on 127.0.0.1 that stores what it receives;
TLS always verified; build-and-upload in one call.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import os
import socket
import ssl
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.commands.params import parse
from agent.maintenance.logbundle import (
    Bundle,
    FetchLogsParams,
    LogSources,
    UploadError,
    collect_and_upload,
    upload,
)
from agent.store import Store, StoreConfig
from agent.store.commands import AuditEntry
from tests.agent.maintenance.logbundle.helpers import _build


@dataclass
class Received:
    status: int = 200
    requests: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, Received]]:
    received = Received()

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        received.requests.append(
            {
                "method": request.method,
                "path": request.path_qs,
                "headers": dict(request.headers),
                "body": body,
            }
        )
        if received.status in (301, 307):
            raise web.HTTPTemporaryRedirect("http://127.0.0.1:9/elsewhere")
        return web.Response(
            status=received.status, text="bucket says no" if received.status >= 400 else ""
        )

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        await runner.cleanup()


async def _big_bundle(tmp_path: Path) -> Bundle:
    return await _build(tmp_path, extra_files=[("archive.bin", os.urandom(1024 * 1024))])


async def test_upload_streams_the_bundle_with_progress(
    tmp_path: Path, server: tuple[str, Received]
) -> None:
    base, received = server
    bundle = await _big_bundle(tmp_path)
    seen: list[int] = []
    await upload(bundle, f"{base}/diag/report-1?X-Amz-Signature=s1", progress=seen.append)

    (req,) = received.requests
    assert req["method"] == "PUT" and req["path"] == "/diag/report-1?X-Amz-Signature=s1"
    assert hashlib.sha256(req["body"]).hexdigest() == bundle.sha256
    assert req["headers"]["Content-Type"] == "application/gzip"
    assert req["headers"]["Content-Length"] == str(bundle.size)
    assert "Transfer-Encoding" not in req["headers"]
    assert seen[-1] == 100 and len(seen) >= 6
    assert seen == sorted(set(seen)) and all(v % 10 == 0 for v in seen)


async def test_upload_by_post(tmp_path: Path, server: tuple[str, Received]) -> None:
    base, received = server
    received.status = 201
    bundle = await _build(tmp_path)
    await upload(bundle, f"{base}/up", method="POST")
    assert received.requests[0]["method"] == "POST"
    assert received.requests[0]["body"] == bundle.path.read_bytes()


async def test_server_error_is_an_upload_error_without_the_signature(
    tmp_path: Path, server: tuple[str, Received]
) -> None:
    base, received = server
    received.status = 500
    seen: list[int] = []
    with pytest.raises(UploadError) as err:
        await upload(await _build(tmp_path), f"{base}/up?sig=topsecret", progress=seen.append)
    assert err.value.status == 500
    assert str(err.value) == f"{base}/up answered 500 Internal Server Error: bucket says no"
    assert 100 not in seen  # 100 % means accepted


async def test_redirect_is_not_followed(tmp_path: Path, server: tuple[str, Received]) -> None:
    base, received = server
    received.status = 307
    with pytest.raises(UploadError, match="307 .*redirects are not followed"):
        await upload(await _build(tmp_path), f"{base}/up")
    assert len(received.requests) == 1


async def test_connection_refused_is_an_upload_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UploadError, match=rf"cannot connect to 127\.0\.0\.1:{port}"):
        await upload(await _build(tmp_path), f"http://127.0.0.1:{port}/up", timeout_s=10)


async def test_plain_http_to_a_remote_host_is_refused(tmp_path: Path) -> None:
    bundle = await _build(tmp_path)
    with pytest.raises(UploadError, match="plain http is accepted only to a loopback host"):
        await upload(bundle, "http://upload.example.com/up?token=t")


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed CA certificate for 127.0.0.1, made with ``cryptography`` (a dependency)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


async def test_tls_is_always_verified(tmp_path: Path, self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    got: list[bytes] = []

    async def handler(request: web.Request) -> web.Response:
        got.append(await request.read())
        return web.Response()

    app = web.Application()
    app.router.add_put("/up", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    url = f"https://127.0.0.1:{runner.addresses[0][1]}/up"
    try:
        bundle = await _build(tmp_path)
        with pytest.raises(UploadError, match="TLS verification of 127.0.0.1 failed"):
            await upload(bundle, url)
        assert got == []
        await upload(bundle, url, ca_file=cert)  # the same server once it is trusted
        assert got == [bundle.path.read_bytes()]
    finally:
        await runner.cleanup()


async def test_collect_and_upload(tmp_path: Path, server: tuple[str, Received]) -> None:
    base, received = server
    store = await Store.open(tmp_path / "state", StoreConfig())
    try:
        await store.ledger.audit("platform", "c9", "fetch_logs", {}, "accepted")
        params = parse(FetchLogsParams, {"upload_url": f"{base}/diag"})
        assert isinstance(params, FetchLogsParams)
        config = tmp_path / "agent.toml"
        config.write_text('[platform]\nurl = "https://h/v1"\n')
        details = await collect_and_upload(
            params,
            sources=LogSources(journald_unit=None),
            audit=lambda s, u: store.ledger.audit_entries(since=s, until=u),
            config_path=config,
            workdir=tmp_path / "work",
        )
    finally:
        await store.close()
    body = received.requests[0]["body"]
    assert details["sha256"] == hashlib.sha256(body).hexdigest()
    assert details["size"] == len(body)
    assert details["files"] == ["MANIFEST.txt", "audit/commands.jsonl", "config/agent.toml"]
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        assert tar.getnames() == details["files"]
    assert list((tmp_path / "work").iterdir()) == []  # the bundle is deleted after upload


async def test_failed_upload_carries_the_bundle_details(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    params = parse(FetchLogsParams, {"upload_url": f"http://127.0.0.1:{port}/x"})
    assert isinstance(params, FetchLogsParams)

    async def no_audit(since: datetime, until: datetime) -> list[AuditEntry]:
        return []

    with pytest.raises(UploadError) as err:
        await collect_and_upload(
            params,
            sources=LogSources(journald_unit=None),
            audit=no_audit,
            config_path=None,
            workdir=tmp_path / "work",
            timeout_s=5,
        )
    assert err.value.details is not None and err.value.details["files"] == ["MANIFEST.txt"]
    assert list((tmp_path / "work").iterdir()) == []
