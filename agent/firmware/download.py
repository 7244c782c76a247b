"""Resumable bundle download over verified TLS.

* The body goes to ``<dest>.part``; a sidecar ``<dest>.part.json`` remembers the URL
  (without its query: pre-signed URLs change per command) and the server's ``ETag`` /
  ``Last-Modified``. A later attempt -- after a dropped connection, or by a new command
  for the same file -- asks for ``Range: bytes=<size>-`` with ``If-Range``; a ``206``
  continues the file, a ``200`` (range ignored or file changed) starts it over, a ``416``
  whose total equals what we have means the part is already complete.
* ``progress(percent)`` is awaited at 0 and whenever another ``step`` % (10) is reached,
  and at 100; without a ``Content-Length`` only 0 and 100.
* The size limit is checked against the announced total and while streaming.
* TLS certificates are always verified (system store, plus ``ca_file``); plain http is
  refused except to a loopback host (tests), also after redirects.
* Errors: :class:`DownloadError`; 4xx other than 408/425/429 are permanent, network
  errors, timeouts and 5xx are retried with backoff (each attempt resumes).
* URLs are logged as ``scheme://host/…/name`` only (no query: it may be a credential).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import ssl
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import structlog

from agent.firmware.params import check_download_url

log = structlog.get_logger(__name__)

Progress = Callable[[int], Awaitable[None]]
CHUNK = 64 * 1024
RETRYABLE_4XX = {408, 425, 429}


class DownloadError(Exception):
    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def redact(url: str) -> str:
    """``https://host/…/bundle.tar.gz``: no query, no credentials, no middle path."""
    parts = urlsplit(url)
    name = parts.path.rsplit("/", 1)[-1]
    host = parts.hostname or "?"
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}/…/{name}" if name else f"{parts.scheme}://{host}/"


def scrub(text: str, url: str) -> str:
    """``text`` without the URL's query string or full form (error messages may quote them)."""
    parts = urlsplit(url)
    for secret in (url, parts.query, parts.password or ""):
        if secret:
            text = text.replace(secret, "…")
    return text


def sibling_url(url: str, suffix: str) -> str:
    """The URL of ``<file><suffix>`` next to ``url`` (query dropped)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path + suffix, "", ""))


def _url_key(url: str) -> str:
    parts = urlsplit(url)
    return hashlib.sha256(urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")).encode()).hexdigest()


def ssl_context(ca_file: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if ca_file is not None:
        ctx.load_verify_locations(cafile=os.fspath(ca_file))
    return ctx


class _Reporter:
    def __init__(self, progress: Progress | None, step: int) -> None:
        self.progress = progress
        self.step = step
        self.last = -1

    async def at(self, received: int, total: int | None) -> None:
        if self.progress is None:
            return
        if total:
            pct = min(100, received * 100 // total)
            pct -= pct % self.step
        else:
            pct = 0 if self.last < 0 else self.last
        if pct > self.last:
            self.last = pct
            await self.progress(pct)

    async def done(self) -> None:
        if self.progress is not None and self.last < 100:
            self.last = 100
            await self.progress(100)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes 100-199/200`` -> (100, 200); ``bytes */200`` -> (None, 200)."""
    if not value:
        return None, None
    m = re.match(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value.strip())
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


async def download(
    url: str,
    dest: str | os.PathLike[str],
    *,
    max_bytes: int,
    progress: Progress | None = None,
    ca_file: str | os.PathLike[str] | None = None,
    attempts: int = 5,
    connect_timeout_s: float = 30.0,
    read_timeout_s: float = 60.0,
    backoff_s: float = 1.0,
    step: int = 10,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``); return ``dest``."""
    try:
        check_download_url(url)
    except ValueError as exc:
        raise DownloadError(f"url: expected {exc}", permanent=True) from None
    target = Path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    meta_path = target.with_name(target.name + ".part.json")
    key = _url_key(url)
    report = _Reporter(progress, step)
    ctx = ssl_context(ca_file)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s)
    last_error = "no attempt made"

    def load_meta() -> dict[str, Any]:
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return meta if isinstance(meta, dict) and meta.get("url_key") == key else {}

    def reset() -> None:
        for p in (part, meta_path):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def finish() -> Path:
        with open(part, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(part, target)
        try:
            meta_path.unlink()
        except FileNotFoundError:
            pass
        return target

    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as http:
        for attempt in range(1, attempts + 1):
            meta = load_meta()
            if not meta:
                reset()
            offset = part.stat().st_size if part.exists() else 0
            headers = {"Accept-Encoding": "identity"}
            validator = meta.get("etag") or meta.get("last_modified")
            if offset and validator:
                headers["Range"] = f"bytes={offset}-"
                headers["If-Range"] = str(validator)
            elif offset:  # nothing to tell whether the file changed: start over
                reset()
                offset = 0
            try:
                async with http.get(url, headers=headers, ssl=ctx if url.startswith("https") else False) as resp:
                    try:
                        check_download_url(str(resp.url))
                    except ValueError:
                        raise DownloadError("redirected to an insecure URL (http to a non-loopback host)", permanent=True) from None
                    if resp.status == 416 and offset:
                        _, total = _content_range(resp.headers.get("Content-Range"))
                        if total == offset:
                            await report.at(offset, total)
                            await report.done()
                            return finish()
                        reset()
                        last_error = "HTTP 416 (partial file no longer matches)"
                        continue
                    if resp.status == 206:
                        start, total = _content_range(resp.headers.get("Content-Range"))
                        if start != offset:
                            reset()
                            last_error = "HTTP 206 with an unexpected range"
                            continue
                    elif resp.status == 200:
                        offset = 0
                        total = resp.content_length
                    elif 400 <= resp.status < 500 and resp.status not in RETRYABLE_4XX:
                        raise DownloadError(f"HTTP {resp.status} {resp.reason or ''}".strip(), permanent=True)
                    else:
                        raise DownloadError(f"HTTP {resp.status} {resp.reason or ''}".strip())
                    if total is not None and total > max_bytes:
                        raise DownloadError(f"bundle too large: {total} bytes (limit {max_bytes})", permanent=True)
                    meta_path.write_text(
                        json.dumps(
                            {
                                "url_key": key,
                                "etag": resp.headers.get("ETag"),
                                "last_modified": resp.headers.get("Last-Modified"),
                                "total": total,
                            }
                        ),
                        encoding="utf-8",
                    )
                    received = offset
                    with open(part, "ab" if offset else "wb") as fh:
                        await report.at(received, total)
                        async for chunk in resp.content.iter_chunked(CHUNK):
                            received += len(chunk)
                            if received > max_bytes:
                                raise DownloadError(f"bundle too large: more than {max_bytes} bytes", permanent=True)
                            fh.write(chunk)
                            await report.at(received, total)
                    if total is not None and received != total:
                        raise DownloadError(f"connection closed after {received} of {total} bytes")
                    await report.done()
                    log.info("firmware_download_done", url=redact(url), bytes=received, attempt=attempt, resumed_from=offset)
                    return finish()
            except DownloadError as exc:
                if exc.permanent:
                    if "too large" in str(exc):
                        reset()
                    raise
                last_error = str(exc)
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
                last_error = scrub(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, url)
                if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
                    raise DownloadError(f"TLS verification failed: {scrub(str(exc), url)}", permanent=True) from None
            log.warning("firmware_download_retry", url=redact(url), attempt=attempt, error=last_error)
            if attempt < attempts:
                await sleep(min(30.0, backoff_s * 2 ** (attempt - 1)))
    raise DownloadError(f"download failed after {attempts} attempt(s): {last_error}")


async def fetch_small(
    url: str, *, max_bytes: int = 4096, ca_file: str | os.PathLike[str] | None = None, timeout_s: float = 30.0
) -> str:
    """GET a small text resource (a ``.sig`` file) with the same URL and TLS rules."""
    try:
        check_download_url(url)
    except ValueError as exc:
        raise DownloadError(f"url: expected {exc}", permanent=True) from None
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.get(url, ssl=ssl_context(ca_file) if url.startswith("https") else False) as resp:
                if resp.status != 200:
                    raise DownloadError(f"HTTP {resp.status}")
                data = await resp.content.read(max_bytes + 1)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise DownloadError(scrub(f"{type(exc).__name__}: {exc}", url)) from None
    if len(data) > max_bytes:
        raise DownloadError(f"larger than {max_bytes} bytes")
    return data.decode("ascii", errors="replace").strip()
