"""HTTP client for the charger-side API: envelope parsing and error classification.

* TLS certificate verification is always on (the system trust store, or
  ``ca_file``); plain ``http://`` is refused unless the host is loopback.
* Redirects are never followed (a redirect could downgrade to plain HTTP and carry
  the bearer token along); a 3xx is a failure like any other.
* Every answer becomes an :class:`ApiResult`. Both the HTTP status and the
  envelope ``code`` are evaluated (platform-api §2); a 2xx with an empty body is a
  success for the endpoints that return nothing. A 2xx whose body is not a JSON
  object (a proxy or captive-portal page) is *not* a success: nothing may leave the
  outbox on an answer that did not come from the platform.
* Network errors, timeouts, any 5xx and malformed 2xx answers become
  ``kind == "transient"`` (platform-api §3 Project choice). Only a failure to reach the
  platform at all (connection refused, DNS, TLS, other socket errors before a request went
  out) sets :attr:`ApiResult.link_error`: that is what the uplink counts as "link down";
  a 5xx, ``9001`` or a timeout concerns the one request.
* ``retry_after`` comes from ``details.retry_after_seconds``, else from a numeric
  ``Retry-After`` header.
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

from agent.netaddr import is_loopback_host

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
    error: str | None = None  # network-level failure or malformed answer
    retry_after_header: float | None = None
    #: the platform could not be reached at all (connect, DNS, TLS): the link, not the request
    link_error: bool = False

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.http_status is not None
            and 200 <= self.http_status < 300
            and self.code in (0, None)
        )

    @property
    def kind(self) -> str:
        """ok | auth | permanent | conflict | not_found | forbidden | rate_limited | transient."""
        if self.ok:
            return "ok"
        status, code = self.http_status, self.code
        if status is None or self.error is not None or status >= 500 or code == 9001:
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
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
            return float(value)
        return self.retry_after_header

    def describe(self) -> str:
        if self.error:
            return f"HTTP {self.http_status}: {self.error}" if self.http_status else self.error
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

    def __init__(
        self,
        base_url: str,
        *,
        ca_file: Path | None = None,
        timeout_s: float = 15.0,
        max_connections: int = 64,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "https" and not (
            parts.scheme == "http" and is_loopback_host(parts.hostname or "")
        ):
            raise ValueError(
                f"refusing insecure platform URL {base_url!r}: https is required off loopback"
            )
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self._ssl: ssl.SSLContext | None = ssl_context(ca_file) if parts.scheme == "https" else None
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # One held long-poll per connector plus heartbeat and sender: the pool must never
            # make a heartbeat queue behind the long-polls.
            connector = aiohttp.TCPConnector(
                ssl=self._ssl if self._ssl is not None else True, limit=self.max_connections
            )
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
        query = {k: str(v) for k, v in params.items()} if params else None
        try:
            async with self._get_session().request(
                method,
                self.base_url + path,
                json=body,
                params=query,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            ) as resp:
                text = await resp.text()
                result = _parse(resp.status, text, enveloped)
                result.retry_after_header = _retry_after_header(resp.headers.get("Retry-After"))
                return result
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            return ApiResult(None, error=f"timeout after {timeout.total:.0f} s on {method} {path}")
        except aiohttp.ClientConnectorError as exc:  # refused, DNS, TLS handshake/certificate
            return ApiResult(None, error=f"{type(exc).__name__}: {exc}", link_error=True)
        except aiohttp.ClientError as exc:
            return ApiResult(None, error=f"{type(exc).__name__}: {exc}")
        except OSError as exc:
            return ApiResult(None, error=f"network error: {exc}", link_error=True)
        except (
            RuntimeError,
            ValueError,
        ) as exc:  # session closed under us (force_reconnect), bad text
            return ApiResult(None, error=f"{type(exc).__name__}: {exc}")


def _retry_after_header(value: str | None) -> float | None:
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: ignored, the backoff applies
    return seconds if seconds is not None and seconds >= 0 else None


def _parse(status: int, text: str, enveloped: bool) -> ApiResult:
    success = 200 <= status < 300
    if not text.strip():
        return ApiResult(status, code=None, raw=None)
    try:
        body = json.loads(text)
    except ValueError:
        return ApiResult(
            status,
            message="non-JSON answer",
            raw=text[:200],
            error="non-JSON answer" if success else None,
        )
    if not isinstance(body, dict):
        return ApiResult(
            status,
            message="unexpected JSON shape",
            raw=body,
            error="unexpected JSON shape" if success else None,
        )
    if not enveloped and "access_token" in body:
        return ApiResult(status, code=0, data=body, raw=body)
    code = body.get("code")
    details = body.get("details")
    return ApiResult(
        status,
        code=code if isinstance(code, int) and not isinstance(code, bool) else None,
        message=str(body.get("message", "")),
        data=body.get("data"),
        details=details if isinstance(details, dict) else {},
        raw=body,
    )
