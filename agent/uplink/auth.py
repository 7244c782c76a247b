"""Registration and bearer tokens (platform-api §4).

* Registers only when no credentials are stored; persists ``device_id`` and
  ``device_secret`` (mode 0600, atomic) *before* using them.
* Exchanges them for a token and refreshes it 5 minutes (+0-60 s jitter) before
  it expires, measured on the monotonic clock; one refresh at a time, other callers
  wait for it.
* ``invalidate()`` after a 401 makes the next caller fetch a new token.
* Token endpoint answers 401 three times in a row: the secret is no longer valid;
  registration is tried again. Registration answering 409 with no stored secret
  raises the "needs re-provisioning" condition and retries every 10 minutes.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import structlog

from agent.uplink.client import ApiResult, PlatformHttp

log = structlog.get_logger(__name__)

REFRESH_MARGIN_S = 300.0
REPROVISION_RETRY_S = 600.0


@dataclass(frozen=True)
class Identity:
    """What registration tells the platform about this charger."""

    sn: str
    model: str
    manufacturer: str
    firmware_version: str
    mac: str | None = None

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sn": self.sn,
            "model": self.model,
            "manufacturer": self.manufacturer,
            "firmware_version": self.firmware_version,
        }
        if self.mac:
            out["mac"] = self.mac
        return out


class CredentialStoreLike(Protocol):
    def load(self) -> Any: ...
    def save(self, credentials: Any) -> None: ...


class AuthError(Exception):
    """No token can be had right now; ``result`` is the last answer (``kind`` tells why)."""

    def __init__(self, message: str, result: ApiResult | None = None, *, reprovision: bool = False) -> None:
        super().__init__(message)
        self.result = result
        self.reprovision = reprovision


class TokenManager:
    def __init__(
        self,
        http: PlatformHttp,
        store: CredentialStoreLike,
        identity: Identity,
        make_credentials: Callable[[str, str], Any],
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.http = http
        self.store = store
        self.identity = identity
        self.make_credentials = make_credentials
        self.clock = clock
        self.rng = rng or random.Random()
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()
        self._generation = 0
        self._token_rejections = 0
        self.needs_reprovision = False
        self.last_error: str | None = None

    @property
    def has_token(self) -> bool:
        return self._token is not None

    def invalidate(self) -> None:
        self._token = None

    async def token(self) -> str:
        """A valid token, refreshing first when it is missing or due. Raises :class:`AuthError`."""
        if self._token is not None and self.clock() < self._refresh_at:
            return self._token
        generation = self._generation
        async with self._lock:
            if self._generation != generation and self._token is not None:
                return self._token  # someone else refreshed while we waited
            await self._refresh()
            assert self._token is not None
            return self._token

    async def _refresh(self) -> None:
        creds = self.store.load()
        if creds is None:
            creds = await self._register()
        result = await self.http.request(
            "POST",
            "/device/token",
            body={"device_id": creds.device_id, "device_secret": creds.device_secret, "grant_type": "client_credentials"},
            enveloped=False,
        )
        if result.ok and isinstance(result.data, dict) and isinstance(result.data.get("access_token"), str):
            expires_in = float(result.data.get("expires_in", 86400))
            margin = min(REFRESH_MARGIN_S + self.rng.uniform(0, 60), expires_in / 2)
            self._token = result.data["access_token"]
            self._refresh_at = self.clock() + expires_in - margin
            self._generation += 1
            self._token_rejections = 0
            self.last_error = None
            log.info("token_obtained", expires_in=expires_in)
            return
        self.last_error = result.describe()
        if result.kind == "auth":
            self._token_rejections += 1
            log.warning("token_rejected", attempts=self._token_rejections)
            if self._token_rejections >= 3:
                self._token_rejections = 0
                self.store_forget()
        raise AuthError(f"token exchange failed: {result.describe()}", result)

    def store_forget(self) -> None:
        """The stored secret is rejected: register again on the next attempt."""
        forget = getattr(self.store, "clear", None)
        if callable(forget):
            forget()

    async def _register(self) -> Any:
        result = await self.http.request("POST", "/device/register", body=self.identity.body())
        if result.ok and isinstance(result.data, dict):
            device_id, secret = result.data.get("device_id"), result.data.get("device_secret")
            if isinstance(device_id, str) and isinstance(secret, str):
                creds = self.make_credentials(device_id, secret)
                self.store.save(creds)  # persisted before first use
                self.needs_reprovision = False
                log.info("registered", device_id=device_id)
                return creds
        self.last_error = result.describe()
        if result.kind == "conflict":
            self.needs_reprovision = True
            log.error("needs_reprovisioning", reason="serial number already registered and no stored secret")
            raise AuthError("registration refused: already registered, no stored secret", result, reprovision=True)
        raise AuthError(f"registration failed: {result.describe()}", result)
