"""Update bundles: ed25519 keys, detached signatures, and safe reading.

A bundle is a ``.tar.gz`` holding exactly::

    manifest.json             {"format": 1, "name": "charger-agent", "version": "0.2.0",
                               "created_at": "...Z", "kind": "wheel" | "rauc",
                               "payload": "charger_agent-0.2.0-py3-none-any.whl",
                               "payload_sha256": "...", "payload_size": 123,
                               "files": {"<name>": {"sha256": "...", "size": 123}, ...}}
    <payload>                 the wheel (application-level A/B) or a RAUC bundle (.raucb)
    deps/<name>.whl           optional dependency wheels (offline install)

Next to it ``<bundle>.sig`` holds the base64 ed25519 signature of the bundle *file's
bytes* (so ``openssl pkeyutl -verify -rawin`` can check it too). Verification order
on the device: sha256 of the file against the command's ``checksum``, the signature
against ``[firmware] public_key``, then the manifest's own hashes of every member while
it is extracted. Nothing is installed unless all three pass.

Keys: :func:`load_public_key` accepts base64 of the raw 32 bytes (what ``tools/keygen``
prints for the config), PEM ``PUBLIC KEY`` text, or a path to a file with either.
Private keys are PKCS#8 PEM files (mode 0600).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import mmap
import os
import re
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # cryptography is imported on first use: the agent only needs it to upgrade
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MANIFEST = "manifest.json"
FORMAT = 1
DEPS = "deps"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,200}$")
MAX_MANIFEST_BYTES = 256 * 1024

BundleKind = Literal["wheel", "rauc"]


class BundleError(Exception):
    """A bundle, key or signature is not usable; the message says why (no secrets)."""


# ----------------------------------------------------------------------------- keys


def generate_keypair() -> tuple[Ed25519PrivateKey, Ed25519PublicKey]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    private = Ed25519PrivateKey.generate()
    return private, private.public_key()


def public_key_b64(key: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _public_from_text(text: str) -> Ed25519PublicKey | None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text.encode("ascii"))
        except (ValueError, TypeError) as exc:
            raise BundleError(f"public key: not a valid PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise BundleError("public key: PEM key is not an ed25519 key")
        return key
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 32:
        return None
    return Ed25519PublicKey.from_public_bytes(raw)


def load_public_key(value: str | os.PathLike[str]) -> Ed25519PublicKey:
    """An ed25519 public key from base64 (raw 32 bytes), PEM text, or a path to a file with either."""
    text = os.fspath(value)
    key = _public_from_text(text)
    if key is not None:
        return key
    path = Path(text.strip())
    if text.strip() and len(text) < 4096 and path.is_file():
        try:
            content = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise BundleError(f"public key: cannot read {path}: {exc}") from None
        key = _public_from_text(content)
        if key is not None:
            return key
        raise BundleError(f"public key: {path} holds neither base64 of 32 bytes nor a PEM ed25519 key")
    raise BundleError("public key: expected base64 of the raw 32-byte ed25519 key, PEM text, or an existing file path")


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """A PKCS#8 PEM ed25519 private key (or base64 of the raw 32-byte seed) from a file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise BundleError(f"private key: cannot read {p}: {exc.strerror}") from None
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise BundleError(f"private key: {p} is not an unencrypted PEM key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise BundleError(f"private key: {p} is not an ed25519 key")
        return key
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise BundleError(f"private key: {p} is neither PEM nor base64 of a 32-byte seed")
    return Ed25519PrivateKey.from_private_bytes(raw)


# ----------------------------------------------------------------------------- hashes and signatures


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_checksum(path: str | os.PathLike[str], expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected.lower():
        raise BundleError(f"checksum mismatch: sha256 of the download is {actual}, the command expects {expected.lower()}")


def _with_file_bytes(path: str | os.PathLike[str], use: Any) -> Any:
    """Call ``use(buffer)`` with the file's bytes, memory-mapped (no copy of a large bundle)."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return use(b"")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return use(view)


def sign_file(path: str | os.PathLike[str], key: Ed25519PrivateKey) -> str:
    """Base64 ed25519 signature of the file's bytes."""
    signature: bytes = _with_file_bytes(path, key.sign)
    return base64.b64encode(signature).decode("ascii")


def decode_signature(signature_b64: str) -> bytes:
    try:
        raw = base64.b64decode(signature_b64.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise BundleError("signature: not valid base64") from None
    if len(raw) != 64:
        raise BundleError(f"signature: expected 64 bytes, got {len(raw)}")
    return raw


def verify_signature(path: str | os.PathLike[str], signature_b64: str, key: Ed25519PublicKey) -> None:
    """Raise :class:`BundleError` unless ``signature_b64`` signs the file with ``key``."""
    from cryptography.exceptions import InvalidSignature
    raw = decode_signature(signature_b64)
    try:
        _with_file_bytes(path, lambda data: key.verify(raw, data))
    except InvalidSignature:
        raise BundleError("signature verification failed: the bundle is not signed by the configured key") from None


# ----------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Manifest:
    version: str
    created_at: str
    payload: str
    payload_sha256: str
    payload_size: int
    kind: BundleKind = "wheel"
    name: str = "charger-agent"
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "created_at": self.created_at,
            "kind": self.kind,
            "payload": self.payload,
            "payload_sha256": self.payload_sha256,
            "payload_size": self.payload_size,
            "files": self.files,
        }

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        if not isinstance(data, dict):
            raise BundleError("manifest: not a JSON object")
        if data.get("format") != FORMAT:
            raise BundleError(f"manifest: unsupported format {data.get('format')!r} (expected {FORMAT})")
        try:
            version = str(data["version"])
            payload = str(data["payload"])
            digest = str(data["payload_sha256"]).lower()
            size = int(data["payload_size"])
            kind = str(data.get("kind", "wheel"))
            files = data.get("files") or {payload: {"sha256": digest, "size": size}}
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"manifest: missing or invalid field {exc}") from None
        if kind not in ("wheel", "rauc"):
            raise BundleError(f"manifest: unknown kind {kind!r}")
        if not SAFE_NAME.match(payload):
            raise BundleError(f"manifest: unsafe payload name {payload!r}")
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise BundleError("manifest: payload_sha256 is not a sha256")
        if not isinstance(files, dict) or payload not in files:
            raise BundleError("manifest: files must list the payload")
        for name, meta in files.items():
            _check_member_name(str(name))
            if not isinstance(meta, dict) or not re.fullmatch(r"[0-9a-f]{64}", str(meta.get("sha256", ""))):
                raise BundleError(f"manifest: files[{name!r}] needs a sha256")
        if files[payload].get("sha256") != digest:
            raise BundleError("manifest: payload_sha256 differs from files[payload]")
        return cls(
            version=version,
            created_at=str(data.get("created_at", "")),
            payload=payload,
            payload_sha256=digest,
            payload_size=size,
            kind=kind,  # type: ignore[arg-type]
            name=str(data.get("name", "charger-agent")),
            files={str(k): dict(v) for k, v in files.items()},
        )


def _check_member_name(name: str) -> None:
    parts = name.split("/")
    if len(parts) == 1 and SAFE_NAME.match(parts[0]):
        return
    if len(parts) == 2 and parts[0] == DEPS and SAFE_NAME.match(parts[1]) and parts[1].endswith(".whl"):
        return
    raise BundleError(f"bundle: unexpected member name {name!r}")


@dataclass(frozen=True)
class Bundle:
    """A verified bundle, extracted under ``root``."""

    path: Path
    manifest: Manifest
    root: Path

    @property
    def payload_path(self) -> Path:
        return self.root / self.manifest.payload

    @property
    def deps_dir(self) -> Path | None:
        d = self.root / DEPS
        return d if d.is_dir() else None


def write_bundle(out: Path, manifest: Manifest, members: dict[str, Path]) -> None:
    """Write ``manifest.json`` and ``members`` (arcname -> file) as a gzip tar at ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(manifest.to_json(), indent=1, sort_keys=True).encode("utf-8")
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0
        tar.addfile(info, io.BytesIO(data))
        for arcname, path in sorted(members.items()):
            _check_member_name(arcname)
            ti = tar.gettarinfo(str(path), arcname)
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            ti.mode = 0o644
            with open(path, "rb") as fh:
                tar.addfile(ti, fh)
    os.replace(tmp, out)


def open_bundle(path: str | os.PathLike[str], dest: str | os.PathLike[str], *, max_bytes: int) -> Bundle:
    """Extract a bundle into the empty directory ``dest``, checking every member.

    Only regular files named in the manifest are accepted (no links, devices, absolute
    or ``..`` paths); each one's sha256 and size must match the manifest and the total
    may not exceed ``max_bytes``. Call only after the signature was verified.
    """
    src = Path(path)
    root = Path(dest)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    try:
        tar = tarfile.open(src, "r:gz")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"bundle: not a gzip tar archive ({exc})") from None
    manifest: Manifest | None = None
    seen: dict[str, str] = {}
    total = 0
    try:
        with tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if member.isdir() and name.rstrip("/") == DEPS:
                    continue
                if not member.isfile():
                    raise BundleError(f"bundle: member {member.name!r} is not a regular file")
                if name == MANIFEST:
                    if member.size > MAX_MANIFEST_BYTES:
                        raise BundleError("bundle: manifest too large")
                    fh = tar.extractfile(member)
                    assert fh is not None
                    try:
                        manifest = Manifest.from_json(json.loads(fh.read().decode("utf-8")))
                    except (ValueError, UnicodeDecodeError) as exc:
                        raise BundleError(f"manifest: not valid JSON ({exc})") from None
                    continue
                _check_member_name(name)
                if name in seen:
                    raise BundleError(f"bundle: duplicate member {name!r}")
                total += member.size
                if total > max_bytes:
                    raise BundleError(f"bundle: contents exceed {max_bytes} bytes")
                target = root / name
                target.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                fh = tar.extractfile(member)
                assert fh is not None
                with open(target, "wb") as out:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):  # noqa: B023
                        digest.update(chunk)
                        out.write(chunk)
                seen[name] = digest.hexdigest()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"bundle: damaged archive ({exc})") from None
    if manifest is None:
        raise BundleError("bundle: no manifest.json")
    missing = sorted(set(manifest.files) - set(seen))
    extra = sorted(set(seen) - set(manifest.files))
    if missing:
        raise BundleError(f"bundle: members missing: {', '.join(missing)}")
    if extra:
        raise BundleError(f"bundle: members not in the manifest: {', '.join(extra)}")
    for name, digest_hex in seen.items():
        if manifest.files[name]["sha256"] != digest_hex:
            raise BundleError(f"bundle: sha256 of {name} does not match the manifest (tampered or damaged)")
    return Bundle(path=src, manifest=manifest, root=root)
