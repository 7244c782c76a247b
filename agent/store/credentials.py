"""Device credentials (``device_id`` / ``device_secret``) in ``{state_dir}/credentials.json``.

Contract
--------
* **Mode 0600 from the first byte.** The file is created with ``os.open(..., 0o600)`` (and
  ``fchmod`` in case of an odd umask); the secret is never readable by other users, not even
  for an instant.
* **Atomic replace.** :meth:`CredentialStore.save` writes a temporary file in the same
  directory, fsyncs it, renames it over ``credentials.json`` and fsyncs the directory. After
  a crash or power cut at any point the file holds either the old or the new credentials in
  full, never a mix or a truncated file (this is also how a rotated secret will be swapped in).
  A leftover temporary file from an interrupted save is removed by the next save.
* **Permissions repaired, loudly.** :meth:`CredentialStore.load` on a file readable or
  writable by group/others logs a warning and chmods it to 0600 before reading (refusing to
  start would leave the charger offline for a fixable problem).
* **Retiring a rejected secret.** :meth:`CredentialStore.clear` renames the file to
  ``credentials.json.rejected-<ts>`` (kept, still 0600) so the agent registers again.
* **Corrupt file.** A file that is not valid credentials JSON raises
  :class:`CredentialsError` and is left in place: deleting it would make the agent
  re-register, which the platform answers with 409 for a known serial number.
* **No secret in logs or reprs.** Log lines carry the ``device_id`` only;
  ``repr(Credentials)`` shows the secret as ``'***'``.
* :meth:`~CredentialStore.load` and :meth:`~CredentialStore.save` block on the file system
  (fsync): call them at start-up or through :meth:`~CredentialStore.load_async` /
  :meth:`~CredentialStore.save_async`, which run them in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from agent.store.db import StoreError, fsync_dir
from agent.utctime import file_stamp

log = structlog.get_logger(__name__)

CREDENTIALS_FILENAME: Final = "credentials.json"
_FORMAT_VERSION: Final = 1
_TMP_PREFIX: Final = ".credentials.json.tmp-"


class CredentialsError(StoreError):
    """The credentials file exists but cannot be used (unreadable, bad JSON, fields missing)."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """What registration returned. ``secret_expires_in`` is the platform's ``expires_in`` for
    the secret (gap G2) and ``registered_at`` an ISO-8601 UTC time, both informational."""

    device_id: str
    device_secret: str
    secret_expires_in: int | None = None
    registered_at: str | None = None

    def __post_init__(self) -> None:
        if not self.device_id or not self.device_secret:
            raise ValueError("device_id and device_secret must be non-empty")

    def __repr__(self) -> str:
        return (
            f"Credentials(device_id={self.device_id!r}, device_secret='***', "
            f"secret_expires_in={self.secret_expires_in!r}, registered_at={self.registered_at!r})"
        )

    __str__ = __repr__

    def to_json(self) -> dict[str, Any]:
        """The on-disk form (contains the secret: never log it)."""
        return {
            "version": _FORMAT_VERSION,
            "device_id": self.device_id,
            "device_secret": self.device_secret,
            "secret_expires_in": self.secret_expires_in,
            "registered_at": self.registered_at,
        }

    @classmethod
    def from_json(cls, data: Any) -> Credentials:
        """Parse the on-disk form; raises ``TypeError``/``ValueError`` on anything unexpected."""
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        device_id, secret = data.get("device_id"), data.get("device_secret")
        if not isinstance(device_id, str) or not isinstance(secret, str):
            raise TypeError("device_id and device_secret must be strings")
        expires = data.get("secret_expires_in")
        if expires is not None and (not isinstance(expires, int) or isinstance(expires, bool)):
            raise TypeError("secret_expires_in must be an integer")
        registered = data.get("registered_at")
        if registered is not None and not isinstance(registered, str):
            raise TypeError("registered_at must be a string")
        return cls(device_id, secret, expires, registered)


class CredentialStore:
    """Loads and atomically saves :class:`Credentials` in ``state_dir``."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        """Bind to ``state_dir`` (created with mode 0700 on the first save if missing)."""
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / CREDENTIALS_FILENAME

    def load(self) -> Credentials | None:
        """Return the stored credentials, or None if none were saved yet (see contract)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CredentialsError(f"cannot open {self.path}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CredentialsError(f"{self.path} is not a regular file")
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                log.warning(
                    "credentials.permissions_repaired",
                    path=str(self.path),
                    mode=f"{mode:04o}",
                    new_mode="0600",
                )
                os.fchmod(fd, 0o600)
            with os.fdopen(fd, "rb", closefd=False) as fh:
                raw = fh.read()
        finally:
            os.close(fd)
        try:
            creds = Credentials.from_json(json.loads(raw))
        except (ValueError, TypeError) as exc:
            raise CredentialsError(
                f"{self.path} does not hold valid credentials ({exc}); it was left in place. "
                f"Restore it from a backup or re-provision the device."
            ) from exc
        log.info("credentials.loaded", device_id=creds.device_id)
        return creds

    def save(self, credentials: Credentials) -> None:
        """Persist ``credentials`` atomically with mode 0600 (see contract). Raises ``OSError``
        (the previous file is intact) if the disk is full or not writable."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._remove_stale_temps()
        data = json.dumps(credentials.to_json(), indent=2).encode() + b"\n"
        tmp = self.state_dir / f"{_TMP_PREFIX}{os.getpid()}"
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
        try:
            try:
                os.fchmod(fd, 0o600)
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.state_dir)
        log.info("credentials.saved", device_id=credentials.device_id, path=str(self.path))

    def clear(self) -> Path | None:
        """Retire the stored credentials (the platform rejected the secret): rename the file to
        ``credentials.json.rejected-<UTC timestamp>`` (still 0600, kept for forensics) so the
        next :meth:`load` returns None and the agent registers again. Returns the new path, or
        None if nothing was stored. Atomic and durable like :meth:`save`."""
        stamp = file_stamp()
        target = self.state_dir / f"{CREDENTIALS_FILENAME}.rejected-{stamp}"
        try:
            os.replace(self.path, target)
        except FileNotFoundError:
            return None
        fsync_dir(self.state_dir)
        log.warning("credentials.retired", moved_to=str(target))
        return target

    def _remove_stale_temps(self) -> None:
        for stale in self.state_dir.glob(f"{_TMP_PREFIX}*"):
            stale.unlink(missing_ok=True)

    async def load_async(self) -> Credentials | None:
        """:meth:`load` in a worker thread."""
        return await asyncio.to_thread(self.load)

    async def save_async(self, credentials: Credentials) -> None:
        """:meth:`save` in a worker thread."""
        await asyncio.to_thread(self.save, credentials)
