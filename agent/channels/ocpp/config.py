"""``[ocpp]``: the OCPP channel's configuration (validated like every other section).

No ``[ocpp]`` section: no OCPP channel, the agent behaves as without one. The charge
point identity is appended to ``url`` as its last path segment; ``ws://`` is accepted
only for a loopback CSMS (as ``http://`` is for the platform). ``password`` or
``password_file`` (never both) give HTTP Basic authentication (security profiles 1/2)
with the identity as user name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from agent.netaddr import is_loopback_host
from hal.config import StrictModel


def check_ocpp_url(value: str) -> str:
    """The CSMS URL rule, shared by the config model and ``--ocpp-url``; raises ``ValueError``."""
    parts = urlsplit(value)
    if parts.scheme not in ("wss", "ws") or not parts.hostname:
        raise ValueError(f"a wss:// URL of the CSMS (got {value!r})")
    if parts.scheme == "ws" and not is_loopback_host(parts.hostname):
        raise ValueError(f"wss:// (plain ws:// is accepted only for a loopback CSMS, got {value!r})")
    if parts.query or parts.fragment:
        raise ValueError(f"a URL without query or fragment (the identity is appended as the last path segment, got {value!r})")
    return value.rstrip("/")


class ReaderConfig(StrictModel):
    """An ID-token reader for one connector (hal.auth)."""

    connector: int = Field(..., ge=1)
    driver: Literal["pcsc", "sim"] = "pcsc"
    reader_name: str | None = Field(None, min_length=1, description="PC/SC reader name (a substring); default: any reader")


class OcppSection(StrictModel):
    enabled: bool = True
    version: Literal["1.6"] = "1.6"
    url: str = Field(..., description="CSMS WebSocket endpoint; the identity is appended")
    charge_point_id: str | None = Field(None, min_length=1, max_length=48, pattern=r"^[A-Za-z0-9._~:@!$&'()*+,;=-]+$")
    password: str | None = Field(None, min_length=1, max_length=40)
    password_file: Path | None = None
    ca_file: Path | None = None
    vendor: str = Field("charger-agent", min_length=1, max_length=20)
    reconnect_min_s: float = Field(1.0, gt=0.0, le=60.0, description="first reconnect delay (doubles, with jitter)")
    reconnect_max_s: float = Field(30.0, ge=1.0, le=600.0, description="reconnect delay cap")
    call_timeout_s: float = Field(30.0, ge=1.0, le=300.0, description="a CALL without an answer in this time failed")
    boot_retry_s: float = Field(30.0, ge=1.0, le=3600.0, description="BootNotification retry when the CSMS gives no interval")
    free_vend_id_tag: str = Field("FreeVend", min_length=1, max_length=20, description="idTag of sessions started by [charging] autostart")
    send_metadata: bool = Field(False, description="add the optional ocpp block to platform telemetry")
    readers: list[ReaderConfig] = Field([], description="ID-token readers; none given + in-process simulator: a simulated one per connector")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_ocpp_url(value)

    @model_validator(mode="after")
    def _one_password(self) -> "OcppSection":
        if self.password is not None and self.password_file is not None:
            raise ValueError("either password or password_file, not both")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError("reconnect_min_s not above reconnect_max_s")
        return self

    def read_password(self) -> str | None:
        """The Basic-auth password: ``password``, or the first line of ``password_file``."""
        if self.password is not None:
            return self.password
        if self.password_file is not None:
            return self.password_file.read_text(encoding="utf-8").splitlines()[0].strip() if self.password_file.stat().st_size else ""
        return None
