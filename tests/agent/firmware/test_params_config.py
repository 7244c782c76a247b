"""FirmwareUpgradeParams (spec §8.3 Project choice) and the [firmware] config section."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.commands.params import parse
from agent.firmware.config import FirmwareConfig
from agent.firmware.params import FirmwareUpgradeParams

from .helpers import make_keys

SIG = "A" * 86 + "=="
GOOD = {"url": "https://updates.example.com/fw/charger-agent-0.2.0.bundle.tar.gz?X-Sig=secret", "version": "0.2.0"}


def test_minimal_and_full_params() -> None:
    p = parse(FirmwareUpgradeParams, dict(GOOD))
    assert isinstance(p, FirmwareUpgradeParams)
    assert p.checksum is None and p.signature is None and p.checksum_type == "sha256" and p.install_at is None
    full = parse(
        FirmwareUpgradeParams,
        {**GOOD, "checksum": "SHA256:" + "AB" * 32, "checksum_type": "SHA-256", "signature": SIG,
         "install_at": "2030-01-01T02:00:00Z", "unknown": 1},
    )
    assert isinstance(full, FirmwareUpgradeParams)
    assert full.checksum == "ab" * 32 and full.checksum_type == "sha256" and full.install_at is not None


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"version": "0.2.0"}, "params.url: required"),
        ({"url": GOOD["url"]}, "params.version: required"),
        ({**GOOD, "url": "ftp://x/y"}, "params.url: an https:// URL"),
        ({**GOOD, "url": "http://updates.example.com/fw.tar.gz"}, "params.url: an https:// URL (plain http is accepted only for a loopback host)"),
        ({**GOOD, "version": "../../etc"}, "params.version:"),
        ({**GOOD, "checksum_type": "md5"}, "params.checksum_type: 'sha256'"),
        ({**GOOD, "checksum": "abc"}, "params.checksum: 64 hex digits"),
        ({**GOOD, "signature": "bm90IGEgc2lnbmF0dXJl"}, "params.signature: base64 of a 64-byte ed25519 signature"),
        ({**GOOD, "install_at": "2030-01-01T02:00:00"}, "params.install_at: a date-time with a time zone"),
    ],
)
def test_invalid_params_name_the_field(params: dict[str, object], expected: str) -> None:
    with pytest.raises(ValueError) as err:
        parse(FirmwareUpgradeParams, params)
    assert str(err.value).startswith(expected), str(err.value)
    assert "secret" not in str(err.value) and "updates.example.com" not in str(err.value)  # URL never echoed


def test_http_to_loopback_is_allowed_for_tests() -> None:
    assert parse(FirmwareUpgradeParams, {**GOOD, "url": "http://127.0.0.1:8080/b.tar.gz"})


def test_config_accepts_base64_pem_and_path(tmp_path: Path) -> None:
    keys = make_keys(tmp_path)
    assert FirmwareConfig(public_key=keys.public_b64).public_key == keys.public_b64
    pub = tmp_path / "key.pub"
    pub.write_text(keys.public_b64 + "\n")
    assert FirmwareConfig(public_key=str(pub)).public_key == str(pub)
    from cryptography.hazmat.primitives import serialization

    from agent.firmware.bundle import load_public_key

    pem = load_public_key(keys.public_b64).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    assert FirmwareConfig(public_key=pem).public_key == pem
    cfg = FirmwareConfig()
    assert cfg.public_key is None and cfg.installer == "auto" and cfg.install_root == Path("/opt/charger-agent")


def test_config_rejects_bad_key_and_unknown_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="public key"):
        FirmwareConfig(public_key="not-a-key")
    with pytest.raises(ValueError, match="public key"):
        FirmwareConfig(public_key=str(tmp_path / "missing.pub"))
    with pytest.raises(ValueError):
        FirmwareConfig.model_validate({"installer": "dpkg"})
    with pytest.raises(ValueError):
        FirmwareConfig.model_validate({"instal_root": "/x"})
