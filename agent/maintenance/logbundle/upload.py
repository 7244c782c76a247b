"""Uploading a bundle: one streaming ``PUT``/``POST`` with an exact length, TLS always verified,
no redirects; :func:`collect_and_upload` builds and uploads in one call.

See :mod:`agent.maintenance.logbundle` for the contract.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import structlog

from agent.maintenance.logbundle.collect import AuditRecord, LogSources
from agent.maintenance.logbundle.pack import Bundle, build_bundle
from agent.maintenance.logbundle.params import (
    DEFAULT_MAX_BYTES,
    DEFAULT_UPLOAD_TIMEOUT_S,
    FetchLogsParams,
    UploadError,
    check_upload_url,
)
from agent.redaction import redact_text, safe_url

log = structlog.get_logger(__name__)

class _Progress:
    def __init__(self, total: int, callback: Callable[[int], None] | None) -> None:
        self._total = max(total, 1)
        self._callback = callback
        self._sent = 0
        self._last = 0

    def report(self, percent: int) -> None:
        if self._callback is None or percent <= self._last:
            return
        self._last = percent
        try:
            self._callback(percent)
        except Exception:  # a broken progress reporter must not break the upload
            log.warning("logbundle.progress_callback_failed", exc_info=True)
            self._callback = None

    def advance(self, n: int) -> None:
        self._sent += n
        self.report(min(90, self._sent * 10 // self._total * 10))


async def upload(
    bundle: Bundle,
    url: str,
    *,
    method: Literal["PUT", "POST"] = "PUT",
    timeout_s: float = DEFAULT_UPLOAD_TIMEOUT_S,
    progress: Callable[[int], None] | None = None,
    ca_file: Path | None = None,
) -> None:
    """Stream ``bundle`` to ``url``; return on a 2xx answer, else raise :class:`UploadError`.

    ``timeout_s`` bounds the whole request. ``ca_file`` adds a trust anchor (the system
    store stays in use); certificate and host-name verification cannot be turned off.
    """
    try:
        check_upload_url(url)
    except ValueError as exc:
        raise UploadError(f"upload_url: expected {exc}") from None
    where = safe_url(url)
    host = urlsplit(url).hostname or "?"
    try:
        size = bundle.path.stat().st_size
    except OSError as exc:
        raise UploadError(f"bundle file cannot be read ({exc.strerror})") from None
    ssl_ctx = await asyncio.to_thread(
        ssl.create_default_context, cafile=str(ca_file) if ca_file else None
    )
    chunk = max(16 * 1024, min(256 * 1024, size // 20))
    tracker = _Progress(size, progress)

    async def body() -> AsyncIterator[bytes]:
        fh = await asyncio.to_thread(bundle.path.open, "rb")
        try:
            while block := await asyncio.to_thread(fh.read, chunk):
                yield block
                tracker.advance(len(block))
        finally:
            fh.close()

    headers = {"Content-Type": "application/gzip", "Content-Length": str(size)}
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(30.0, timeout_s))
    log.info("logbundle.upload_started", url=where, method=method, size=size)
    started = time.monotonic()
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, trust_env=False) as session,
            session.request(
                method, url, data=body(), headers=headers, ssl=ssl_ctx, allow_redirects=False
            ) as resp,
        ):
            if not 200 <= resp.status < 300:
                text = (await resp.content.read(300)).decode("utf-8", "replace")
                snippet = " ".join("".join(c for c in text if c.isprintable()).split())[:200]
                extra = " (redirects are not followed)" if 300 <= resp.status < 400 else ""
                raise UploadError(
                    f"{where} answered {resp.status} {resp.reason or ''}".rstrip()
                    + extra
                    + (f": {snippet}" if snippet else ""),
                    status=resp.status,
                )
    except UploadError as exc:
        log.warning("logbundle.upload_failed", url=where, reason=str(exc))
        raise
    except TimeoutError:
        reason = f"upload to {where} did not finish within {timeout_s:g} s"
        log.warning("logbundle.upload_failed", url=where, reason=reason)
        raise UploadError(reason) from None
    except aiohttp.ClientSSLError as exc:
        reason = f"TLS verification of {host} failed ({_ssl_reason(exc)})"
        log.warning("logbundle.upload_failed", url=where, reason=reason)
        raise UploadError(reason) from None
    except aiohttp.ClientConnectorError as exc:
        err = exc.os_error.strerror or str(exc.os_error) or type(exc.os_error).__name__
        reason = f"cannot connect to {exc.host}:{exc.port} ({err})"
        log.warning("logbundle.upload_failed", url=where, reason=reason)
        raise UploadError(reason) from None
    except (aiohttp.ClientError, OSError) as exc:
        reason = f"upload to {where} failed: {type(exc).__name__}" + (
            f" ({exc})" if str(exc) else ""
        )
        reason = redact_text(reason.replace(url, where))
        log.warning("logbundle.upload_failed", url=where, reason=reason)
        raise UploadError(reason) from None
    tracker.report(100)
    log.info(
        "logbundle.uploaded", url=where, size=size, seconds=round(time.monotonic() - started, 2)
    )


def _ssl_reason(exc: aiohttp.ClientSSLError) -> str:
    cert_error = getattr(exc, "certificate_error", None)
    inner = cert_error if cert_error is not None else getattr(exc, "os_error", None)
    text = getattr(inner, "verify_message", None) or getattr(inner, "reason", None) or str(inner)
    return str(text)


async def collect_and_upload(
    params: FetchLogsParams,
    *,
    sources: LogSources,
    audit: Callable[[datetime, datetime], Awaitable[Iterable[AuditRecord]]],
    config_path: Path | None,
    workdir: Path,
    extra_files: Sequence[tuple[str, bytes]] = (),
    method: Literal["PUT", "POST"] = "PUT",
    timeout_s: float = DEFAULT_UPLOAD_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_BYTES,
    known_secrets: Sequence[str] = (),
    ca_file: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Build the bundle for ``params.window()``, upload it, delete it; return its
    :meth:`Bundle.details`. ``audit(since, until)`` returns the audit rows of the window
    (e.g. ``lambda s, u: store.ledger.audit_entries(since=s, until=u)``). Raises
    :class:`BundleError` or :class:`UploadError` (with ``details`` set)."""
    since, until = params.window()
    rows = await audit(since, until)
    bundle = await build_bundle(
        since=since,
        until=until,
        sources=sources,
        audit_entries=rows,
        config_path=config_path,
        extra_files=extra_files,
        workdir=workdir,
        max_bytes=max_bytes,
        known_secrets=known_secrets,
    )
    try:
        await upload(
            bundle,
            params.upload_url,
            method=method,
            timeout_s=timeout_s,
            progress=progress,
            ca_file=ca_file,
        )
    except UploadError as exc:
        exc.details = bundle.details()
        raise
    finally:
        await asyncio.to_thread(bundle.remove)
    return bundle.details()
