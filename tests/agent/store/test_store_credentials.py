"""CredentialStore: 0600 from creation, atomic replace, permission repair, no secret leaks."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from agent.store import Credentials, CredentialsError, CredentialStore

SECRET = "sk_7g8h9j0k1l2m-very-secret"


@pytest.fixture
def no_umask() -> Iterator[None]:
    """Run with umask 000: the store alone must make the file private."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_save_creates_private_file(state_dir: Path, no_umask: None) -> None:
    store = CredentialStore(state_dir)
    assert store.load() is None
    creds = Credentials("dvc_a1b2c3d4e5f6", SECRET, 86400, "2025-03-15T10:30:00Z")
    store.save(creds)
    assert _mode(store.path) == 0o600
    assert _mode(state_dir) == 0o700
    assert store.load() == creds
    assert json.loads(store.path.read_text())["device_secret"] == SECRET


def test_save_replaces_atomically(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CredentialStore(state_dir)
    old = Credentials("dvc_old", "sk_old")
    store.save(old)
    inode = store.path.stat().st_ino

    def crash(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.save(Credentials("dvc_new", "sk_new"))
    monkeypatch.undo()
    assert store.load() == old  # the previous file is intact
    assert sorted(p.name for p in state_dir.iterdir()) == ["credentials.json"]  # no temp left

    # A temp file left by a save that was killed half-way is cleaned up by the next save.
    (state_dir / ".credentials.json.tmp-12345").write_text('{"device_id": "half')
    new = Credentials("dvc_new", "sk_new")
    store.save(new)
    assert store.load() == new
    assert store.path.stat().st_ino != inode  # replaced by rename, not rewritten in place
    assert sorted(p.name for p in state_dir.iterdir()) == ["credentials.json"]


def test_world_readable_file_is_repaired(state_dir: Path) -> None:
    store = CredentialStore(state_dir)
    store.save(Credentials("dvc_x", SECRET))
    os.chmod(store.path, 0o644)
    with structlog.testing.capture_logs() as logs:
        creds = store.load()
    assert creds is not None and creds.device_secret == SECRET
    assert _mode(store.path) == 0o600
    warning = next(e for e in logs if e["event"] == "credentials.permissions_repaired")
    assert warning["log_level"] == "warning" and warning["mode"] == "0644"


def test_secret_never_in_repr_or_logs(state_dir: Path) -> None:
    store = CredentialStore(state_dir)
    creds = Credentials("dvc_x", SECRET)
    assert SECRET not in repr(creds) and SECRET not in str(creds)
    assert "***" in repr(creds)
    with structlog.testing.capture_logs() as logs:
        store.save(creds)
        os.chmod(store.path, 0o640)
        store.load()
    assert logs, "save/load should log"
    assert all(SECRET not in repr(entry) for entry in logs)


def test_corrupt_file_is_refused_and_kept(state_dir: Path) -> None:
    store = CredentialStore(state_dir)
    state_dir.mkdir()
    store.path.write_text('{"device_id": "dvc_x"')
    with pytest.raises(CredentialsError, match="left in place"):
        store.load()
    assert store.path.exists()
    store.path.write_text('{"device_id": "dvc_x", "device_secret": 5}')
    with pytest.raises(CredentialsError):
        store.load()


def test_empty_fields_rejected() -> None:
    with pytest.raises(ValueError):
        Credentials("", "x")


async def test_async_wrappers(state_dir: Path) -> None:
    store = CredentialStore(state_dir)
    creds = Credentials("dvc_async", SECRET)
    await store.save_async(creds)
    assert await store.load_async() == creds


def test_clear_retires_credentials(state_dir: Path) -> None:
    store = CredentialStore(state_dir)
    assert store.clear() is None
    store.save(Credentials("dvc_x", SECRET))
    retired = store.clear()
    assert retired is not None and retired.name.startswith("credentials.json.rejected-")
    assert store.load() is None  # the agent registers again
    assert _mode(retired) == 0o600 and SECRET in retired.read_text()  # kept, still private
