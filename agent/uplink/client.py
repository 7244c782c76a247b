"""HTTP client for the charger-side API: envelope parsing and error classification.

* TLS certificate verification is always on (the system trust store, or
  ``ca_file``); plain ``http://`` is refused unless the host is loopback.
* Every answer becomes an :class:`ApiResult`. Both the HTTP status and the
  envelope ``code`` are evaluated (platform-api §2); a 2xx with an empty body is a
  success for the endpoints that return nothing.
* Network errors, timeouts and any 5xx become ``kind == "transient"``
  (platform-api §3 Project choice).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog

from agent.config import is_loopback_host

log = structlog.get_logger(__name__)


@dataclass
class ApiResult:
    """One answer from the platform (or the reason there was none)."""

    http_status: int | None
    code: int | None = None
    message: str = ""
    data: Any = None
    details: dict[str, Any] = field(default_factory=dict)
    raw: Any = None
    error: str | None = None  # network-level failure text

    @property
    def ok(self) -> bool:
        return self.http_status is not None and 200 <= self.http_status < 300 and self.code in (0, None)

    @property
    def kind(self) -> str:
        """ok | auth | permanent | conflict | not_found | forbidden | rate_limited | transient."""
        if self.ok:
            return "ok"
        status, code = self.http_status, self.code
        if status is None or status >= 500 or code == 9001:
            return "transient"
        if status == 429 or code == 5001:
            return "rate_limited"
        if status == 401 or code in (2001, 2002):
            return "auth"
        if status == 403 or code == 2003:
            return "forbidden"
        if status == 404 or code == 3001:
            return "not_found"
        if status == 409 or code == 4001:
            return "conflict"
        if status == 400 or code in (1001, 1002):
            return "permanent"
        return "transient"

    @property
    def retry_after(self) -> float | None:
        value = self.details.get("retry_after_seconds") if isinstance(self.details, dict) else None
        return float(value) if isinstance(value, (int, float)) and value >= 0 else None

    def describe(self) -> str:
        if self.error:
            return self.error
        field_name = self.details.get("field") if isinstance(self.details, dict) else None
        extra = f" (field {field_name})" if field_name else ""
        return f"HTTP {self.http_status} code {self.code}: {self.message}{extra}"


def ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    """A verifying TLS >= 1.2 context (never anything less)."""
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class PlatformHttp:
    """A thin, reconnectable aiohttp wrapper bound to the API base URL (ending in /v1)."""

    def __init__(self, base_url: str, *, ca_file: Path | None = None, timeout_s: float = 15.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "https" and not (parts.scheme == "http" and is_loopback_host(parts.hostname or "")):
            raise ValueError(f"refusing insecure platform URL {base_url!r}: https is required off loopback")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._ssl: ssl.SSLContext | None = ssl_context(ca_file) if parts.scheme == "https" else None
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True, limit=16)
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers={"User-Agent": "charger-agent", "Accept": "application/json"},
                json_serialize=lambda obj: json.dumps(obj, separators=(",", ":")),
            )
        return self._session

    async def close(self) -> None:
        """Drop every open connection; the next request opens new ones."""
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
        token: str | None = None,
        timeout_s: float | None = None,
        enveloped: bool = True,
    ) -> ApiResult:
        """Send one request; never raises for network or protocol problems."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.timeout_s)
        try:
            async with self._get_session().request(
                method, self.base_url + path, json=body, params=params, headers=headers, timeout=timeout
            ) as resp:
                text = await resp.text()
                return _parse(resp.status, text, enveloped)
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            return ApiResult(None, error=f"timeout after {timeout.total:.0f} s on {method} {path}")
        except aiohttp.ClientError as exc:
            return ApiResult(None, error=f"{type(exc).__name__}: {exc}")
        except OSError as exc:
            return ApiResult(None, error=f"network error: {exc}")


def _parse(status: int, text: str, enveloped: bool) -> ApiResult:
    if not text.strip():
        return ApiResult(status, code=None if 200 <= status < 300 else None, raw=None)
    try:
        body = json.loads(text)
    except ValueError:
        return ApiResult(status, code=None if status < 300 else 9001, message="non-JSON answer", raw=text[:200])
    if not isinstance(body, dict):
        return ApiResult(status, message="unexpected JSON shape", raw=body)
    if not enveloped and "access_token" in body:
        return ApiResult(status, code=0, data=body, raw=body)
    code = body.get("code")
    return ApiResult(
        status,
        code=code if isinstance(code, int) else None,
        message=str(body.get("message", "")),
        data=body.get("data"),
        details=body.get("details") if isinstance(body.get("details"), dict) else {},
        raw=body,
    )
