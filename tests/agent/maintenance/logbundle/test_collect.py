"""Log bundle collection: log files and rotated siblings filtered to the window, journald through a
fake ``journalctl`` found by the real discovery and run by the real asyncio subprocess code,
the command audit rows.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest

from agent.maintenance.logbundle import LogSources
from agent.store import Store, StoreConfig
from tests.agent.maintenance.logbundle.helpers import (
    SINCE,
    UNTIL,
    _build,
    _fake_journalctl,
    _jline,
    _members,
)


async def test_log_files_and_rotated_siblings_filtered_to_the_window(tmp_path: Path) -> None:
    logs = tmp_path / "log"
    logs.mkdir()
    h = timedelta(hours=1)
    live = logs / "agent.log"
    live.write_text(
        _jline(SINCE - h, "before.window")
        + "Traceback (most recent call last):\n  old continuation\n"
        + _jline(SINCE + h, "in.window.json")
        + "Traceback (most recent call last):\n  new continuation\n"
        + "2025-03-15T02:00:00.250Z [warning  ] console.line key=1\n"
        + "2025-03-15 03:00:00,5 stdlib style line without zone\n"
        + _jline(UNTIL, "at.until.excluded")
        + "  continuation of excluded\n"
        + _jline(UNTIL - timedelta(seconds=1), "last.second.kept")
    )
    rotated = logs / "agent.log.1"
    rotated.write_text("head line without stamp\n" + _jline(SINCE + 2 * h, "rotated.one"))
    with gzip.open(logs / "agent.log.2.gz", "wt") as gz:
        gz.write(_jline(SINCE - 2 * h, "gz.old") + _jline(SINCE + 3 * h, "gz.in.window"))
    stale = logs / "agent.log.3"
    stale.write_text(_jline(SINCE - 30 * h, "stale"))
    (logs / "credentials.json").write_text('{"device_secret": "never"}')
    (logs / "other.log").write_text(_jline(SINCE + h, "not.ours"))
    now = time.time()
    os.utime(logs / "agent.log.2.gz", (now - 300, now - 300))
    os.utime(rotated, (now - 200, now - 200))
    os.utime(stale, (SINCE.timestamp() - 3600,) * 2)

    bundle = await _build(tmp_path, sources=LogSources(journald_unit=None, log_file=live))
    files = _members(bundle)

    assert bundle.files == (
        "MANIFEST.txt",
        "logs/agent.log.2",
        "logs/agent.log.1",
        "logs/agent.log",
    )
    assert list(files) == list(bundle.files)
    assert files["logs/agent.log.2"].decode() == _jline(SINCE + 3 * h, "gz.in.window")
    assert files["logs/agent.log.1"].decode().splitlines() == [
        "head line without stamp",
        _jline(SINCE + 2 * h, "rotated.one").strip(),
    ]
    assert files["logs/agent.log"].decode().splitlines() == [
        _jline(SINCE + h, "in.window.json").strip(),
        "Traceback (most recent call last):",
        "  new continuation",
        "2025-03-15T02:00:00.250Z [warning  ] console.line key=1",
        "2025-03-15 03:00:00,5 stdlib style line without zone",
        _jline(UNTIL - timedelta(seconds=1), "last.second.kept").strip(),
    ]
    manifest = files["MANIFEST.txt"].decode()
    assert "agent.log.3: last written before the window, skipped" in manifest
    assert "2025-03-15T00:00:00Z .. 2025-03-16T00:00:00Z" in manifest
    assert "journald" not in manifest  # no unit asked for: nothing to say about it
    assert not bundle.truncated
    assert bundle.size == bundle.path.stat().st_size
    assert bundle.sha256 == hashlib.sha256(bundle.path.read_bytes()).hexdigest()
    assert bundle.details() == {
        "size": bundle.size,
        "sha256": bundle.sha256,
        "files": list(bundle.files),
        "since": "2025-03-15T00:00:00Z",
        "until": "2025-03-16T00:00:00Z",
        "truncated": False,
    }
    assert [p.name for p in (tmp_path / "work").iterdir()] == [bundle.path.name]  # staging gone


async def test_missing_log_file_and_journalctl_are_noted(tmp_path: Path) -> None:
    sources = LogSources.discover(
        journald_unit="charger-agent.service",
        log_file=tmp_path / "nope.log",
        search_path=str(tmp_path),  # no journalctl here
    )
    assert sources.journalctl is None
    bundle = await _build(tmp_path, sources=sources)
    manifest = _members(bundle)["MANIFEST.txt"].decode()
    assert bundle.files == ("MANIFEST.txt",)
    assert "journalctl not found" in manifest
    assert "nope.log: not found" in manifest
    assert "command audit log: no entries in the window" in manifest


async def test_journald_entries_from_journalctl(tmp_path: Path) -> None:
    entries = [
        {
            "MESSAGE": _jline(SINCE + timedelta(minutes=i), f"agent.event{i}").strip(),
            "__REALTIME_TIMESTAMP": str(int((SINCE.timestamp() + 60 * i) * 1e6)),
            "PRIORITY": "6",
        }
        for i in range(3)
    ]
    entries.append(
        {"MESSAGE": json.dumps({"event": "x", "access_token": "jrnl-tok-123"}), "PRIORITY": "4"}
    )
    payload = "".join(json.dumps(e) + "\n" for e in entries)
    (tmp_path / "entries.jsonl").write_text(payload)
    exe = _fake_journalctl(
        tmp_path / "bin",
        f'printf "%s\\n" "$@" > "{tmp_path}/args.txt"\ncat "{tmp_path}/entries.jsonl"\n',
    )
    sources = LogSources.discover(journald_unit="agent-x.service", search_path=str(exe.parent))
    assert sources.journalctl == str(exe)

    bundle = await _build(tmp_path, sources=sources, until=UNTIL - timedelta(microseconds=1))
    files = _members(bundle)

    args = (tmp_path / "args.txt").read_text().splitlines()
    assert args == [
        "-u", "agent-x.service",
        "--since", "2025-03-15 00:00:00 UTC",
        "--until", "2025-03-16 00:00:00 UTC",  # rounded up: the last partial second counts
        "-o", "json", "--no-pager",
    ]  # fmt: skip
    journal = [json.loads(line) for line in files["logs/journal.jsonl"].decode().splitlines()]
    assert journal[:3] == entries[:3]
    assert json.loads(journal[3]["MESSAGE"]) == {"event": "x", "access_token": "***"}
    assert b"jrnl-tok-123" not in b"".join(files.values())
    assert "journald unit agent-x.service" in files["MANIFEST.txt"].decode()


@pytest.mark.parametrize("noisy", [False, True], ids=["compressible", "incompressible"])
async def test_a_flood_of_journal_output_keeps_whole_newest_lines(
    tmp_path: Path, noisy: bool
) -> None:
    # Far more output than the collection cap (4 x max_bytes = 64 KiB here): the capture drops
    # old parts while reading, and entries spanning two parts must come out whole and
    # redacted. Compressible output then fits as captured; incompressible output is cut again
    # to fit the compressed limit.
    entries = [
        json.dumps(
            {
                "MESSAGE": f"entry {i:05d}",
                "token": f"flood-tok-{i}",
                "_SYSTEMD_UNIT": "charger-agent.service",
                "n": os.urandom(60).hex() if noisy else "",
            }
        )
        + "\n"
        for i in range(5000)
    ]
    (tmp_path / "flood.jsonl").write_text("".join(entries))
    exe = _fake_journalctl(tmp_path / "bin", f'cat "{tmp_path}/flood.jsonl"\n')
    limit = 16 * 1024
    bundle = await _build(tmp_path, sources=LogSources(journalctl=str(exe)), max_bytes=limit)
    files = _members(bundle)
    assert bundle.size <= limit and bundle.truncated
    text = files["logs/journal.jsonl"].decode()
    kept = [json.loads(line) for line in text.splitlines()]
    first = int(kept[0]["MESSAGE"].split()[1])
    assert [k["MESSAGE"] for k in kept] == [f"entry {i:05d}" for i in range(first, 5000)]
    if noisy:
        assert 10 < len(kept) < 500
    else:  # at least the cap's worth of newest bytes survived the capture
        assert len(text) >= 64 * 1024 - len(entries[0]) and len(kept) < 2000
    assert all(k["token"] == "***" for k in kept)
    assert b"flood-tok-" not in b"".join(files.values())
    manifest = files["MANIFEST.txt"].decode()
    assert f"logs/journal.jsonl: {first} oldest lines dropped to fit the size limit" in manifest
    size = len(text.encode())
    assert f"logs/journal.jsonl  {size} bytes  journald unit charger-agent.service" in manifest
    assert f"(journalctl -o json), {len(kept)} lines" in manifest


async def test_journalctl_failure_is_noted_and_the_bundle_still_built(tmp_path: Path) -> None:
    exe = _fake_journalctl(
        tmp_path / "bin",
        'echo "No journal files were opened due to insufficient permissions." >&2\nexit 1\n',
    )
    log_file = tmp_path / "agent.log"
    log_file.write_text(_jline(SINCE + timedelta(hours=1), "from.file"))
    bundle = await _build(tmp_path, sources=LogSources(journalctl=str(exe), log_file=log_file))
    manifest = _members(bundle)["MANIFEST.txt"].decode()
    assert bundle.files == ("MANIFEST.txt", "logs/agent.log")
    assert "journalctl exited with status 1" in manifest
    assert "insufficient permissions" in manifest


async def test_hanging_journalctl_is_killed_after_its_time_limit(tmp_path: Path) -> None:
    exe = _fake_journalctl(tmp_path / "bin", f'cat "{tmp_path}/one.jsonl"\nexec sleep 30\n')
    (tmp_path / "one.jsonl").write_text(json.dumps({"MESSAGE": "first"}) + "\n")
    started = time.monotonic()
    bundle = await _build(tmp_path, sources=LogSources(journalctl=str(exe), journal_timeout_s=0.5))
    assert time.monotonic() - started < 10
    files = _members(bundle)
    assert json.loads(files["logs/journal.jsonl"]) == {"MESSAGE": "first"}
    assert "did not finish within 0.5 s" in files["MANIFEST.txt"].decode()


async def test_audit_rows_from_the_store_as_json_lines(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "state", StoreConfig())
    try:
        ledger = store.ledger
        at = SINCE.timestamp()
        await ledger.audit("platform", "c0", "reboot", {}, "accepted", at=at - 10)
        await ledger.audit(
            "platform", "c1", "start_charging", {"connector_id": 1}, "accepted", at=at + 5
        )
        await ledger.audit(
            "long_poll",
            "c2",
            "fetch_logs",
            {
                "upload_url": "https://bucket.example/u?X-Amz-Signature=abcdef0123&X-Amz-Date=2",
                "api_token": "tok-in-params",
            },
            "rejected",
            "params.until: must be after since",
            at=at + 7.25,
        )
        await ledger.audit("platform", "c3", "reboot", {}, "accepted", at=UNTIL.timestamp())
        rows = await ledger.audit_entries(since=SINCE, until=UNTIL)
    finally:
        await store.close()

    bundle = await _build(tmp_path, audit_entries=rows)
    files = _members(bundle)
    audit = [json.loads(line) for line in files["audit/commands.jsonl"].decode().splitlines()]
    assert [(a["command_id"], a["at"]) for a in audit] == [
        ("c1", "2025-03-15T00:00:05Z"),
        ("c2", "2025-03-15T00:00:07.250Z"),
    ]
    assert audit[0] == {
        "id": 2, "at": "2025-03-15T00:00:05Z", "source": "platform", "command_id": "c1",
        "command": "start_charging", "params": {"connector_id": 1}, "outcome": "accepted",
        "message": None,
    }  # fmt: skip
    assert audit[1]["params"] == {
        "upload_url": "https://bucket.example/u?X-Amz-Signature=***&X-Amz-Date=2",
        "api_token": "***",
    }
    assert audit[1]["message"] == "params.until: must be after since"
    assert "audit/commands.jsonl" in bundle.files
