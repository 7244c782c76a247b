"""Log bundle packing: nothing secret reaches the bundle, the size limit cuts oldest lines first,
a cancelled build kills ``journalctl`` and cleans up.
"""

from __future__ import annotations

import asyncio
import json
import os
import tomllib
from datetime import timedelta
from pathlib import Path

import pytest

from agent.maintenance.logbundle import BundleError, LogSources
from tests.agent.maintenance.logbundle.helpers import (
    SINCE,
    _build,
    _fake_journalctl,
    _jline,
    _members,
    _noisy_log,
)
from tests.agent.maintenance.logbundle.test_config_redaction import CONFIG, CONFIG_SECRETS


async def test_no_secret_reaches_the_bundle(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(CONFIG)
    device_secret = "dev-secret-7f3a9"
    log_file = tmp_path / "agent.log"
    log_file.write_text(
        _jline(
            SINCE + timedelta(hours=1),
            "uplink.request",
            headers={"Authorization": "Bearer eyJ.log-bearer.sig"},
            url="https://x:log-userinfo@h.example/p?token=log-query-tok",
        )
        + f"2025-03-15T02:00:00Z stray print of {device_secret} and password=log-kv-pw\n"
    )
    bundle = await _build(
        tmp_path,
        sources=LogSources(journald_unit=None, log_file=log_file),
        config_path=config,
        known_secrets=[device_secret],
        extra_files=[
            ("credentials.json", json.dumps({"device_secret": device_secret}).encode()),
            ("../../etc/session-1.json", b'{"kwh": 12.5}'),
        ],
    )
    files = _members(bundle)
    blob = b"\n".join(files.values())
    for secret in [
        *CONFIG_SECRETS,
        device_secret,
        "log-bearer",
        "log-userinfo",
        "log-query-tok",
        "log-kv-pw",
    ]:
        assert secret.encode() not in blob, secret
    assert set(files) == {
        "MANIFEST.txt",
        "logs/agent.log",
        "config/agent.toml",
        "sessions/session-1.json",
    }
    assert files["sessions/session-1.json"] == b'{"kwh": 12.5}'
    assert tomllib.loads(files["config/agent.toml"].decode())["platform"]["long_poll_wait_s"] == 30
    assert "credentials.json: credentials file, never included" in files["MANIFEST.txt"].decode()
    assert b"stray print of *** and password=***" in files["logs/agent.log"]


async def test_oversized_logs_lose_their_oldest_lines_and_say_so(tmp_path: Path) -> None:
    log_file = tmp_path / "agent.log"
    rows = _noisy_log(log_file, 4000)  # ~700 KB of incompressible text
    limit = 96 * 1024
    bundle = await _build(
        tmp_path, sources=LogSources(journald_unit=None, log_file=log_file), max_bytes=limit
    )
    assert bundle.size <= limit
    assert bundle.truncated
    files = _members(bundle)
    kept = files["logs/agent.log"].decode().splitlines(keepends=True)
    assert 100 < len(kept) < len(rows)
    assert kept == rows[len(rows) - len(kept) :]  # a whole-line suffix: the newest lines
    manifest = files["MANIFEST.txt"].decode()
    assert (
        f"logs/agent.log: {len(rows) - len(kept)} oldest lines dropped to fit the size limit"
        in manifest
    )


async def test_session_archives_are_dropped_first_ones_first_when_logs_cannot_make_room(
    tmp_path: Path,
) -> None:
    old, new = os.urandom(40 * 1024), os.urandom(40 * 1024)
    bundle = await _build(
        tmp_path, extra_files=[("s-old.bin", old), ("s-new.bin", new)], max_bytes=64 * 1024
    )
    files = _members(bundle)
    assert "sessions/s-old.bin" not in files and files["sessions/s-new.bin"] == new
    assert "sessions/s-old.bin: left out to fit the size limit" in files["MANIFEST.txt"].decode()
    assert bundle.truncated and bundle.size <= 64 * 1024


async def test_a_bundle_that_cannot_fit_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("".join(f'k{i} = "{os.urandom(30).hex()}"\n' for i in range(200)))
    with pytest.raises(BundleError, match="cannot be made smaller"):
        await _build(tmp_path, config_path=config, max_bytes=4096)
    assert list((tmp_path / "work").iterdir()) == []


async def test_cancelling_a_build_kills_journalctl_and_cleans_up(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    exe = _fake_journalctl(tmp_path / "bin", f'echo $$ > "{pid_file}"\nexec sleep 30\n')
    task = asyncio.create_task(_build(tmp_path, sources=LogSources(journalctl=str(exe))))
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert list((tmp_path / "work").iterdir()) == []
