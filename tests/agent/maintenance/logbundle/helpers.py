"""Shared helpers of the log bundle tests: the window, JSON log lines, building and reading a
bundle, a fake ``journalctl``.
"""

from __future__ import annotations

import json
import os
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.maintenance.logbundle import Bundle, LogSources, build_bundle

SINCE = datetime(2025, 3, 15, 0, 0, tzinfo=UTC)


UNTIL = datetime(2025, 3, 16, 0, 0, tzinfo=UTC)


def _ts(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


def _jline(dt: datetime, event: str, **kw: Any) -> str:
    """A structlog JSON line as agent.service.logs renders it (timestamp near the end)."""
    return json.dumps({"event": event, **kw, "level": "info", "timestamp": _ts(dt)}) + "\n"


def _members(bundle: Bundle) -> dict[str, bytes]:
    with tarfile.open(bundle.path, "r:gz") as tar:
        out = {}
        for m in tar.getmembers():
            fh = tar.extractfile(m)
            assert fh is not None
            out[m.name] = fh.read()
        return out


async def _build(tmp_path: Path, **kw: Any) -> Bundle:
    args: dict[str, Any] = {
        "since": SINCE,
        "until": UNTIL,
        "sources": LogSources(journald_unit=None),
        "audit_entries": [],
        "config_path": None,
        "workdir": tmp_path / "work",
    }
    args.update(kw)
    return await build_bundle(**args)


def _fake_journalctl(bin_dir: Path, body: str) -> Path:
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "journalctl"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(0o755)
    return exe


def _noisy_log(path: Path, lines: int) -> list[str]:
    """Incompressible numbered lines, one per second from SINCE."""
    rows = [
        _jline(SINCE + timedelta(seconds=i), f"line{i:06d}", noise=os.urandom(48).hex())
        for i in range(lines)
    ]
    path.write_text("".join(rows))
    return rows
