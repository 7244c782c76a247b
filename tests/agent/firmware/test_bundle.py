"""Bundle format, ed25519 sign/verify, tamper detection, safe extraction, the offline wheel build."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from agent.firmware.build import BuildError, build_wheel
from agent.firmware.bundle import (
    BundleError,
    check_checksum,
    load_private_key,
    load_public_key,
    open_bundle,
    sha256_file,
    sign_file,
    verify_signature,
)

from .helpers import ROOT, fake_bundle, make_keys


def test_signed_bundle_verifies_and_extracts(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    result = fake_bundle(tmp_path, keys, size=100_000)
    assert result.signature_file.read_text().strip() == result.signature
    assert result.sha256 == sha256_file(result.bundle)
    check_checksum(result.bundle, result.sha256)
    verify_signature(result.bundle, result.signature, load_public_key(keys.public_b64))
    bundle = open_bundle(result.bundle, tmp_path / "x", max_bytes=10**7)
    assert bundle.manifest.version == "0.2.0" and bundle.manifest.kind == "wheel"
    assert sha256_file(bundle.payload_path) == bundle.manifest.payload_sha256
    assert bundle.deps_dir is None


def test_tampered_bundle_fails_checksum_and_signature(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    result = fake_bundle(tmp_path, keys, size=100_000)
    data = bytearray(result.bundle.read_bytes())
    data[len(data) // 2] ^= 0x01
    result.bundle.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch"):
        check_checksum(result.bundle, result.sha256)
    with pytest.raises(BundleError, match="signature verification failed"):
        verify_signature(result.bundle, result.signature, load_public_key(keys.public_b64))


def test_wrong_key_fails(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    other = make_keys(tmp_path / "other", "other")
    result = fake_bundle(tmp_path, keys, size=1000)
    with pytest.raises(BundleError, match="not signed by the configured key"):
        verify_signature(result.bundle, result.signature, load_public_key(other.public_b64))
    forged = sign_file(result.bundle, load_private_key(other.private_pem))
    with pytest.raises(BundleError, match="not signed by the configured key"):
        verify_signature(result.bundle, forged, load_public_key(keys.public_b64))
    with pytest.raises(BundleError, match="not valid base64"):
        verify_signature(result.bundle, "%%%", load_public_key(keys.public_b64))


def _tar(path: Path, members: dict[str, bytes], manifest: dict[str, object] | None) -> None:
    with tarfile.open(path, "w:gz") as tar:
        items = dict(members)
        if manifest is not None:
            items = {"manifest.json": json.dumps(manifest).encode(), **items}
        for name, data in items.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _manifest(payload: str, data: bytes) -> dict[str, object]:
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    return {"format": 1, "version": "0.2.0", "created_at": "", "kind": "wheel", "payload": payload,
            "payload_sha256": digest, "payload_size": len(data), "files": {payload: {"sha256": digest, "size": len(data)}}}


def test_manifest_hash_mismatch_is_refused(tmp_path: Path) -> None:
    """A bundle whose payload differs from its manifest (even if someone signed it) is refused."""
    good = b"payload"
    bad = tmp_path / "bad.tar.gz"
    _tar(bad, {"p.whl": b"other payload"}, _manifest("p.whl", good))
    with pytest.raises(BundleError, match="does not match the manifest"):
        open_bundle(bad, tmp_path / "x", max_bytes=10**6)


@pytest.mark.parametrize(
    ("members", "match"),
    [
        ({"../evil.whl": b"x"}, "unexpected member name"),
        ({"/etc/passwd": b"x"}, "unexpected member name"),
        ({"p.whl": b"payload", "extra.txt": b"x"}, "not in the manifest"),
    ],
)
def test_unsafe_members_are_refused(tmp_path: Path, members: dict[str, bytes], match: str) -> None:
    path = tmp_path / "b.tar.gz"
    _tar(path, members, _manifest("p.whl", b"payload"))
    with pytest.raises(BundleError, match=match):
        open_bundle(path, tmp_path / "x", max_bytes=10**6)
    assert not (tmp_path / "evil.whl").exists()


def test_symlink_member_and_missing_manifest_and_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "link.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("p.whl")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(BundleError, match="not a regular file"):
        open_bundle(path, tmp_path / "x", max_bytes=10**6)
    _tar(path, {"p.whl": b"payload"}, None)
    with pytest.raises(BundleError, match="no manifest"):
        open_bundle(path, tmp_path / "x", max_bytes=10**6)
    _tar(path, {"p.whl": b"payload"}, _manifest("p.whl", b"payload"))
    with pytest.raises(BundleError, match="exceed"):
        open_bundle(path, tmp_path / "x", max_bytes=3)
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(BundleError, match="not a gzip tar"):
        open_bundle(tmp_path / "junk.tar.gz", tmp_path / "x", max_bytes=10**6)


def test_offline_wheel_build_patches_version(tmp_path: Path) -> None:
    wheel = build_wheel(ROOT, tmp_path, "0.3.0rc1")
    assert wheel.name == "charger_agent-0.3.0rc1-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "agent/firmware/boot.py" in names and "hal/config.py" in names
        assert not any("__pycache__" in n or n.startswith("tests/") for n in names)
        assert '__version__ = "0.3.0rc1"' in zf.read("agent/__init__.py").decode()
        meta = zf.read("charger_agent-0.3.0rc1.dist-info/METADATA").decode()
        assert "Version: 0.3.0rc1" in meta and "Requires-Dist: aiohttp" in meta
        assert "charger-agent = agent.cli:main" in zf.read("charger_agent-0.3.0rc1.dist-info/entry_points.txt").decode()
        record = zf.read("charger_agent-0.3.0rc1.dist-info/RECORD").decode()
        assert "agent/__init__.py,sha256=" in record
    with pytest.raises(BuildError, match="PEP 440"):
        build_wheel(ROOT, tmp_path, "not a version")
