"""Parameters of ``firmware_upgrade`` (platform-api §8.3, Project choice).

``{ "url": string, "version": string, "checksum"?: string, "checksum_type"?: "sha256",
"signature"?: string, "install_at"?: date-time }``; ``url`` and ``version`` are required.
Failures name the field (``params.url: required``); the URL itself is never echoed (it
may be pre-signed).
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from agent.commands.params import Params
from agent.netaddr import is_loopback_host

VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")


def check_download_url(value: str) -> str:
    """https://, or plain http:// only to a loopback host (tests, a local mirror tunnel)."""
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("an https:// URL of the update bundle")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError("an https:// URL (plain http is accepted only for a loopback host)")
    return value


class FirmwareUpgradeParams(Params):
    url: str = Field(..., min_length=1, max_length=4096)
    version: str = Field(..., min_length=1, max_length=64)
    checksum: str | None = Field(None, description="hex sha256 of the bundle file")
    checksum_type: str = Field("sha256", description="only sha256")
    signature: str | None = Field(None, description="base64 ed25519 signature of the bundle file")
    install_at: datetime | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_download_url(value.strip())

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        if not VERSION_RE.match(value) or ".." in value:
            raise ValueError("a version such as 2.2.0 (letters, digits, '.', '+', '_', '-')")
        return value

    @field_validator("checksum_type")
    @classmethod
    def _checksum_type(cls, value: str) -> str:
        norm = value.strip().lower().replace("-", "")
        if norm != "sha256":
            raise ValueError("'sha256' (the only supported checksum)")
        return norm

    @field_validator("checksum")
    @classmethod
    def _checksum(cls, value: str | None) -> str | None:
        if value is None:
            return None
        norm = value.strip().lower()
        if norm.startswith("sha256:"):
            norm = norm[len("sha256:") :]
        if not re.fullmatch(r"[0-9a-f]{64}", norm):
            raise ValueError("64 hex digits (sha256 of the bundle)")
        return norm

    @field_validator("signature")
    @classmethod
    def _signature(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            raw = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("base64 of a 64-byte ed25519 signature") from None
        if len(raw) != 64:
            raise ValueError(f"base64 of a 64-byte ed25519 signature (decoded to {len(raw)} bytes)")
        return value.strip()

    @field_validator("install_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("a date-time with a time zone (e.g. 2025-03-16T02:00:00Z)")
        return value
