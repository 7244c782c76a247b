"""``[firmware]``: how this controller verifies and installs updates.

Example::

    [firmware]
    public_key = "u3Lr0mN0...="            # base64 of the 32-byte ed25519 key, PEM text, or a file path
    installer = "auto"                     # auto | rauc | app_ab
    install_root = "/opt/charger-agent"    # releases/<version>/, current -> releases/<version>
    keep_releases = 3
    health_timeout_s = 600                 # new version must heartbeat within this
    max_boot_attempts = 3

Without ``public_key`` every ``firmware_upgrade`` is rejected: nothing unsigned is
ever installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from hal.config import StrictModel

MIB = 1024 * 1024


class FirmwareConfig(StrictModel):
    public_key: str | None = Field(
        None, description="ed25519 public key: base64 of the raw 32 bytes, PEM text, or a path to a file with either"
    )
    installer: Literal["auto", "rauc", "app_ab"] = Field(
        "auto", description="auto = RAUC when `rauc` is on PATH and the bundle carries a RAUC image, else app_ab"
    )
    install_root: Path = Field(Path("/opt/charger-agent"), description="releases/<version>/ and the current/stable links")
    keep_releases: int = Field(3, ge=2, le=20, description="release directories kept (current and stable always kept)")
    health_timeout_s: float = Field(600.0, ge=1.0, le=86400.0, description="new version must be healthy within this")
    max_boot_attempts: int = Field(3, ge=1, le=20, description="starts of the new version before it is rolled back")
    download_dir: Path | None = Field(None, description="partial and verified bundles; default <state_dir>/firmware")
    max_bundle_bytes: int = Field(256 * MIB, ge=1024, le=8192 * MIB)
    wheelhouse: Path | None = Field(None, description="app_ab: extra dependency wheels (offline --find-links)")
    ca_file: Path | None = Field(None, description="extra CA bundle for the download (TLS is always verified)")
    download_attempts: int = Field(5, ge=1, le=50, description="attempts, each resuming the partial file")
    download_read_timeout_s: float = Field(60.0, ge=1.0, le=3600.0)
    reboot_command: list[str] = Field(["systemctl", "reboot"], min_length=1, description="RAUC: boot the new slot")

    @field_validator("public_key")
    @classmethod
    def _usable_key(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from agent.firmware.bundle import BundleError, load_public_key

        try:
            load_public_key(value)
        except BundleError as exc:
            raise ValueError(str(exc)) from None
        return value
