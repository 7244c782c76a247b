"""Resumable download against a real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from agent.firmware.download import DownloadError, _url_key, download, fetch_small, redact, scrub

from .helpers import FileServer

DATA = os.urandom(1_000_000)


@pytest.fixture
async def server():  # type: ignore[no-untyped-def]
    srv = await FileServer().start()
    yield srv
    await srv.stop()


async def test_download_reports_progress_every_10_percent(server: FileServer, tmp_path: Path) -> None:
    url = server.add("b.tar.gz", DATA)
    seen: list[int] = []

    async def progress(p: int) -> None:
        seen.append(p)

    out = await download(url, tmp_path / "b", max_bytes=10**7, progress=progress)
    assert out.read_bytes() == DATA
    assert seen == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert not (tmp_path / "b.part").exists() and not (tmp_path / "b.part.json").exists()


async def test_dropped_connection_is_resumed_with_range(server: FileServer, tmp_path: Path) -> None:
    url = server.add("b.tar.gz", DATA)
    server.drop_after = 400_000
    seen: list[int] = []

    async def progress(p: int) -> None:
        seen.append(p)

    out = await download(url, tmp_path / "b", max_bytes=10**7, progress=progress, backoff_s=0.01)
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(DATA).digest()
    assert len(server.requests) == 2
    assert "Range" not in server.requests[0]
    assert server.requests[1]["Range"].startswith("bytes=") and int(server.requests[1]["Range"][6:-1]) > 0
    assert server.requests[1]["If-Range"]
    assert seen == sorted(seen) and seen[0] == 0 and seen[-1] == 100 and len(set(seen)) == len(seen)


async def test_partial_file_from_an_earlier_run_is_continued(server: FileServer, tmp_path: Path) -> None:
    url = server.add("b.tar.gz", DATA)
    server.drop_after = 300_000
    with pytest.raises(DownloadError, match="after 1 attempt"):
        await download(url, tmp_path / "b", max_bytes=10**7, attempts=1)
    have = (tmp_path / "b.part").stat().st_size
    assert 0 < have < len(DATA)
    # a later command with a new pre-signed query string for the same file resumes it
    out = await download(url + "?sig=new", tmp_path / "b", max_bytes=10**7)
    assert out.read_bytes() == DATA
    assert server.requests[-1]["Range"] == f"bytes={have}-"


async def test_changed_file_restarts_and_complete_part_is_finished(server: FileServer, tmp_path: Path) -> None:
    url = server.add("b.tar.gz", DATA)
    server.drop_after = 100_000
    with pytest.raises(DownloadError):
        await download(url, tmp_path / "b", max_bytes=10**7, attempts=1)
    new = os.urandom(500_000)
    server.files["b.tar.gz"] = new  # ETag changes: If-Range makes the server send it all
    assert (await download(url, tmp_path / "b", max_bytes=10**7)).read_bytes() == new
    # a .part that is already complete (crash before the rename): 416 with the same total
    (tmp_path / "b").rename(tmp_path / "b.part")
    etag = '"' + hashlib.sha256(new).hexdigest()[:16] + '"'
    (tmp_path / "b.part.json").write_text(json.dumps({"url_key": _url_key(url), "etag": etag}))
    assert (await download(url, tmp_path / "b", max_bytes=10**7)).read_bytes() == new
    assert server.requests[-1]["Range"] == f"bytes={len(new)}-"


async def test_size_limit_and_http_errors(server: FileServer, tmp_path: Path) -> None:
    url = server.add("b.tar.gz", DATA)
    with pytest.raises(DownloadError, match="too large"):
        await download(url, tmp_path / "b", max_bytes=1000)
    assert not (tmp_path / "b.part").exists()
    with pytest.raises(DownloadError, match="HTTP 404") as err:
        await download(server.base + "/fw/missing", tmp_path / "m", max_bytes=10**7)
    assert err.value.permanent and len([r for r in server.requests]) == 2  # no retry on 404
    server.status_override = 503
    with pytest.raises(DownloadError, match="after 2 attempt.*HTTP 503"):
        await download(url, tmp_path / "c", max_bytes=10**7, attempts=2, backoff_s=0.01)


async def test_insecure_urls_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="https"):
        await download("http://example.com/b.tar.gz", tmp_path / "b", max_bytes=100)
    with pytest.raises(DownloadError, match="https"):
        await fetch_small("http://example.com/b.sig")
    assert scrub("Cannot fetch https://h/x.tar.gz?sig=SECRET (sig=SECRET)", "https://h/x.tar.gz?sig=SECRET") == "Cannot fetch … (…)"
    assert redact("https://user:pw@cdn.example.com:8443/a/b/c.tar.gz?X-Amz-Signature=abc") == "https://cdn.example.com:8443/…/c.tar.gz"


async def test_tls_is_verified(tmp_path: Path) -> None:
    """A self-signed HTTPS server is refused (no way to switch verification off)."""
    import datetime
    import ssl

    from aiohttp import web
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress

    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    app = web.Application()
    async def hello(_request: web.Request) -> web.Response:
        return web.Response(body=b"hello")

    app.router.add_get("/b", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        with pytest.raises(DownloadError, match="TLS verification failed"):
            await download(f"https://127.0.0.1:{port}/b", tmp_path / "b", max_bytes=100, attempts=3)
        # with the CA configured ([firmware] ca_file) it is trusted
        out = await download(f"https://127.0.0.1:{port}/b", tmp_path / "b", max_bytes=100, ca_file=tmp_path / "c.pem")
        assert out.read_bytes() == b"hello"
    finally:
        await runner.cleanup()
