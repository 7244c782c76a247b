"""Registration and bearer tokens (platform-api §4).

* Registers only when no credentials are stored; persists ``device_id`` and
  ``device_secret`` (mode 0600, atomic) *before* using them.
  If they cannot be persisted (disk full), they are kept in memory, *not* used, and
  saving is retried on the next call: a secret the agent would lose on a restart is
  never put to use.
* Exchanges them for a token and refreshes it 5 minutes (+0-60 s jitter; at most
  half the lifetime) before it expires, measured on the injected monotonic clock;
  one refresh at a time, other callers wait for it and share its result. If an early
  refresh fails while the current token is still valid, that token keeps being used
  and the refresh is tried again 30 s later.
* ``invalidate(token)`` after a 401 makes the next caller fetch a new token; passing
  the rejected token keeps a late 401 from discarding a token fetched meanwhile.
* Token endpoint answers 401 three times in a row: the secret is no longer valid;
  the credentials file is retired and registration is tried again. Registration
  answering 409 with no stored secret (or an unreadable credentials file) raises the
  "needs re-provisioning" condition (:class:`AuthError` with ``reprovision=True``);
  the uplink retries every 10 minutes.
* Neither the secret nor a token is ever logged.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from agent.channels.tellus.client import ApiResult, PlatformHttp

log = structlog.get_logger(__name__)

REFRESH_MARGIN_S = 300.0
REFRESH_JITTER_S = 60.0
REFRESH_RETRY_S = 30.0
REPROVISION_RETRY_S = 600.0
TOKEN_REJECTIONS_BEFORE_REREGISTER = 3


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

    def __init__(
        self, message: str, result: ApiResult | None = None, *, reprovision: bool = False
    ) -> None:
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
        self._expires_at = 0.0
        self._unsaved: Any = None
        self._lock = asyncio.Lock()
        self._generation = 0
        self._token_rejections = 0
        self.needs_reprovision = False
        self.last_error: str | None = None

    @property
    def refresh_at(self) -> float:
        """Clock time at which the current token will be refreshed."""
        return self._refresh_at

    @property
    def expires_at(self) -> float:
        """Clock time at which the current token expires."""
        return self._expires_at

    def invalidate(self, rejected: str | None = None) -> None:
        """Drop the current token (only if it is ``rejected``, when given)."""
        if rejected is None or rejected == self._token:
            self._token = None

    async def token(self) -> str:
        """A valid token, refreshing first when it is missing or due. Raises :class:`AuthError`."""
        if self._token is not None and self.clock() < self._refresh_at:
            return self._token
        generation = self._generation
        async with self._lock:
            if self._generation != generation and self._token is not None:
                return self._token  # someone else refreshed while we waited
            if self._token is not None and self.clock() < self._refresh_at:
                return self._token
            try:
                await self._refresh()
            except AuthError as exc:
                if self._token is not None and self.clock() < self._expires_at - REFRESH_RETRY_S:
                    self._refresh_at = self.clock() + REFRESH_RETRY_S
                    log.warning(
                        "token_refresh_deferred", error=str(exc), retry_in_s=REFRESH_RETRY_S
                    )
                    return self._token
                raise
            assert self._token is not None
            return self._token

    def _load(self) -> Any:
        if self._unsaved is not None:
            try:
                self.store.save(self._unsaved)
            except OSError as exc:
                raise AuthError(f"registered, but the credentials cannot be saved: {exc}") from exc
            self._unsaved = None
        try:
            return self.store.load()
        except Exception as exc:  # corrupt/unreadable file: re-registering would only get 409
            self.needs_reprovision = True
            self.last_error = f"stored credentials unusable: {exc}"
            log.error("needs_reprovisioning", reason=self.last_error)
            raise AuthError(self.last_error, reprovision=True) from exc

    async def _refresh(self) -> None:
        creds = self._load()
        if creds is None:
            creds = await self._register()
        result = await self.http.request(
            "POST",
            "/device/token",
            body={
                "device_id": creds.device_id,
                "device_secret": creds.device_secret,
                "grant_type": "client_credentials",
            },
            enveloped=False,
        )
        token = (
            result.data.get("access_token") if result.ok and isinstance(result.data, dict) else None
        )
        if isinstance(token, str) and token:
            expires_in = _positive_number(result.data.get("expires_in"), 86400.0)
            margin = min(REFRESH_MARGIN_S + self.rng.uniform(0, REFRESH_JITTER_S), expires_in / 2)
            now = self.clock()
            self._token = token
            self._expires_at = now + expires_in
            self._refresh_at = now + expires_in - margin
            self._generation += 1
            self._token_rejections = 0
            self.last_error = None
            log.info("token_obtained", expires_in=expires_in)
            return
        self.last_error = result.describe()
        if result.kind == "auth":
            self._token_rejections += 1
            log.warning("token_rejected", attempts=self._token_rejections)
            if self._token_rejections >= TOKEN_REJECTIONS_BEFORE_REREGISTER:
                self._token_rejections = 0
                log.warning("credentials_rejected", action="register again")
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
                self.needs_reprovision = False
                log.info("registered", device_id=device_id)
                try:
                    self.store.save(creds)  # persisted before first use
                except OSError as exc:
                    self._unsaved = creds
                    self.last_error = f"credentials cannot be saved: {exc}"
                    log.error("credentials_save_failed", device_id=device_id, error=str(exc))
                    raise AuthError(self.last_error) from exc
                return creds
        self.last_error = result.describe()
        if result.kind == "conflict":
            self.needs_reprovision = True
            log.error(
                "needs_reprovisioning",
                reason="serial number already registered and no stored secret",
            )
            raise AuthError(
                "registration refused: already registered, no stored secret",
                result,
                reprovision=True,
            )
        raise AuthError(f"registration failed: {result.describe()}", result)


def _positive_number(value: Any, default: float) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return default
