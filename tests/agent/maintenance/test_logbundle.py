"""The ``fetch_logs`` bundle: collection, window filtering, redaction, size limit, upload.

Journald is exercised through a fake ``journalctl`` script found by the real discovery
(``shutil.which`` on a search path) and run by the real asyncio subprocess code. Uploads go
to a real aiohttp server on 127.0.0.1 that stores what it receives.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import ssl
import subprocess
import tarfile
import time
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.commands.params import parse
from agent.maintenance.logbundle import (
    Bundle,
    BundleError,
    FetchLogsParams,
    LogSources,
    UploadError,
    build_bundle,
    collect_and_upload,
    redact_config,
    redact_text,
    upload,
)
from agent.store import Store, StoreConfig
from agent.store.commands import AuditEntry

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


# ---------------------------------------------------------------------------------------
# Log files and window filtering


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


# ---------------------------------------------------------------------------------------
# Journald through a fake journalctl


def _fake_journalctl(bin_dir: Path, body: str) -> Path:
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "journalctl"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(0o755)
    return exe


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


# ---------------------------------------------------------------------------------------
# Audit log


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


# ---------------------------------------------------------------------------------------
# Config redaction and things never included

CONFIG = """\
# Tellus charger. Old platform token = "cmt-tok-0001"
[charger]
serial_number = "TP-1"
state_dir = "/var/lib/charger-agent"

[platform]
url = "https://agent:pw-in-url-0002@api.example.com/v1"
api_key = "cfg-key-0003"
"auth-token" = 'cfg-tok-0004'
proxy = { host = "p.example", password = "cfg-pw-0005" }
signatures = [
  "cfg-sig-0006",   # multi-line array
  "cfg-sig-0007",
]
long_poll_wait_s = 30
client.secret = \"\"\"
cfg-sec-0008
\"\"\"

[secrets]
pin = 12345678

[[connectors]]
id = 1
meter = { driver = "acrel", private_key = { pem = "cfg-pem-0009" } }
"""
CONFIG_SECRETS = [
    "cmt-tok-0001",
    "pw-in-url-0002",
    "cfg-key-0003",
    "cfg-tok-0004",
    "cfg-pw-0005",
    "cfg-sig-0006",
    "cfg-sig-0007",
    "cfg-sec-0008",
    "12345678",
    "cfg-pem-0009",
]


def test_redact_config_keeps_layout_and_replaces_every_secret() -> None:
    out = redact_config(CONFIG)
    for secret in CONFIG_SECRETS:
        assert secret not in out
    assert out.startswith("# Tellus charger. Old platform token = ***\n[charger]\n")
    assert "  # multi-line array" not in out  # it was inside the secret value
    parsed = tomllib.loads(out)
    assert parsed["charger"] == {"serial_number": "TP-1", "state_dir": "/var/lib/charger-agent"}
    assert parsed["platform"] == {
        "url": "https://api.example.com/v1",
        "api_key": "***",
        "auth-token": "***",
        "proxy": {"host": "p.example", "password": "***"},
        "signatures": "***",
        "long_poll_wait_s": 30,
        "client": {"secret": "***"},
    }
    assert parsed["secrets"] == {"pin": "***"}
    assert parsed["connectors"] == [{"id": 1, "meter": {"driver": "acrel", "private_key": "***"}}]


def test_redact_config_rewrites_when_a_secret_would_survive_in_a_comment() -> None:
    text = 'password = "hunter2hunter2"\n# previously hunter2hunter2, changed in March\nport = 8\n'
    out = redact_config(text)
    assert "hunter2hunter2" not in out
    assert out.startswith("# config re-written after redaction")
    assert tomllib.loads(out) == {"password": "***", "port": 8}


def test_redact_config_refuses_text_that_is_not_toml() -> None:
    out = redact_config('token = "unterminated-secret\n')
    assert "unterminated-secret" not in out
    assert out.startswith("# config not included: not valid TOML")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("GET https://agent:s3cr3t@h.example/v1 ok", "GET https://h.example/v1 ok"),
        ("Authorization: Bearer eyJhbGciOi.x.y", "Authorization: Bearer ***"),
        ("proxy Basic dXNlcjpwYXNz", "proxy Basic ***"),
        (
            "PUT /u?X-Amz-Date=1&X-Amz-Signature=ab12&sig=cd&a=1",
            "PUT /u?X-Amz-Date=1&X-Amz-Signature=***&sig=***&a=1",
        ),
        (
            '{"event": "t", "refresh_token": "r\\"x", "n": "ok"}',
            '{"event": "t", "refresh_token": "***", "n": "ok"}',
        ),
        ("login password=hunter2 user=bob", "login password=*** user=bob"),
        ("uplink.heartbeat connector=1 state=idle", "uplink.heartbeat connector=1 state=idle"),
    ],
)
def test_redact_text(text: str, expected: str) -> None:
    assert redact_text(text) == expected


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


# ---------------------------------------------------------------------------------------
# Size limit


def _noisy_log(path: Path, lines: int) -> list[str]:
    """Incompressible numbered lines, one per second from SINCE."""
    rows = [
        _jline(SINCE + timedelta(seconds=i), f"line{i:06d}", noise=os.urandom(48).hex())
        for i in range(lines)
    ]
    path.write_text("".join(rows))
    return rows


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


# ---------------------------------------------------------------------------------------
# Upload


@dataclass
class Received:
    status: int = 200
    requests: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, Received]]:
    received = Received()

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        received.requests.append(
            {
                "method": request.method,
                "path": request.path_qs,
                "headers": dict(request.headers),
                "body": body,
            }
        )
        if received.status in (301, 307):
            raise web.HTTPTemporaryRedirect("http://127.0.0.1:9/elsewhere")
        return web.Response(
            status=received.status, text="bucket says no" if received.status >= 400 else ""
        )

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        await runner.cleanup()


async def _big_bundle(tmp_path: Path) -> Bundle:
    return await _build(tmp_path, extra_files=[("archive.bin", os.urandom(1024 * 1024))])


async def test_upload_streams_the_bundle_with_progress(
    tmp_path: Path, server: tuple[str, Received]
) -> None:
    base, received = server
    bundle = await _big_bundle(tmp_path)
    seen: list[int] = []
    await upload(bundle, f"{base}/diag/report-1?X-Amz-Signature=s1", progress=seen.append)

    (req,) = received.requests
    assert req["method"] == "PUT" and req["path"] == "/diag/report-1?X-Amz-Signature=s1"
    assert hashlib.sha256(req["body"]).hexdigest() == bundle.sha256
    assert req["headers"]["Content-Type"] == "application/gzip"
    assert req["headers"]["Content-Length"] == str(bundle.size)
    assert "Transfer-Encoding" not in req["headers"]
    assert seen[-1] == 100 and len(seen) >= 6
    assert seen == sorted(set(seen)) and all(v % 10 == 0 for v in seen)


async def test_upload_by_post(tmp_path: Path, server: tuple[str, Received]) -> None:
    base, received = server
    received.status = 201
    bundle = await _build(tmp_path)
    await upload(bundle, f"{base}/up", method="POST")
    assert received.requests[0]["method"] == "POST"
    assert received.requests[0]["body"] == bundle.path.read_bytes()


async def test_server_error_is_an_upload_error_without_the_signature(
    tmp_path: Path, server: tuple[str, Received]
) -> None:
    base, received = server
    received.status = 500
    seen: list[int] = []
    with pytest.raises(UploadError) as err:
        await upload(await _build(tmp_path), f"{base}/up?sig=topsecret", progress=seen.append)
    assert err.value.status == 500
    assert str(err.value) == f"{base}/up answered 500 Internal Server Error: bucket says no"
    assert 100 not in seen  # 100 % means accepted


async def test_redirect_is_not_followed(tmp_path: Path, server: tuple[str, Received]) -> None:
    base, received = server
    received.status = 307
    with pytest.raises(UploadError, match="307 .*redirects are not followed"):
        await upload(await _build(tmp_path), f"{base}/up")
    assert len(received.requests) == 1


async def test_connection_refused_is_an_upload_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UploadError, match=rf"cannot connect to 127\.0\.0\.1:{port}"):
        await upload(await _build(tmp_path), f"http://127.0.0.1:{port}/up", timeout_s=10)


async def test_plain_http_to_a_remote_host_is_refused(tmp_path: Path) -> None:
    bundle = await _build(tmp_path)
    with pytest.raises(UploadError, match="plain http is accepted only to a loopback host"):
        await upload(bundle, "http://upload.example.com/up?token=t")


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,digitalSignature,keyEncipherment"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


async def test_tls_is_always_verified(tmp_path: Path, self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    got: list[bytes] = []

    async def handler(request: web.Request) -> web.Response:
        got.append(await request.read())
        return web.Response()

    app = web.Application()
    app.router.add_put("/up", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    url = f"https://127.0.0.1:{runner.addresses[0][1]}/up"
    try:
        bundle = await _build(tmp_path)
        with pytest.raises(UploadError, match="TLS verification of 127.0.0.1 failed"):
            await upload(bundle, url)
        assert got == []
        await upload(bundle, url, ca_file=cert)  # the same server once it is trusted
        assert got == [bundle.path.read_bytes()]
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------------------------------
# Parameters and the whole command


def test_params_default_to_the_last_24_hours() -> None:
    p = parse(FetchLogsParams, {"upload_url": "https://u.example/x"})
    assert isinstance(p, FetchLogsParams)
    since, until = p.window()
    assert abs(until.timestamp() - time.time()) < 5
    assert until - since == timedelta(hours=24)
    q = parse(
        FetchLogsParams,
        {"upload_url": "http://127.0.0.1:8/x", "until": "2025-03-16T01:00:00+01:00"},
    )
    assert isinstance(q, FetchLogsParams)
    assert q.window() == (SINCE, UNTIL)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "params.upload_url: required"),
        ({"upload_url": "ftp://h/x"}, "params.upload_url: an https:// URL with a host"),
        (
            {"upload_url": "http://upload.example.com/x?sig=1"},
            "params.upload_url: an https:// URL (plain http is accepted only to a loopback host",
        ),
        (
            {
                "upload_url": "https://h/x",
                "since": "2025-03-16T00:00:00Z",
                "until": "2025-03-15T00:00:00Z",
            },
            "params.until: must be after since (2025-03-16T00:00:00Z)",
        ),
        (
            {"upload_url": "https://h/x", "since": "2099-01-01T00:00:00Z"},
            "params.until: must be after since (2099-01-01T00:00:00Z); until defaults to now",
        ),
        (
            {"upload_url": "https://h/x", "since": "2025-03-15T00:00:00"},
            "params.since: a date-time with a time zone",
        ),
        ({"upload_url": "https://h/x", "until": "yesterday"}, "params.until: "),
    ],
)
def test_params_are_refused_naming_the_field(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse(FetchLogsParams, params)
    assert str(err.value).startswith(message), str(err.value)


async def test_collect_and_upload(tmp_path: Path, server: tuple[str, Received]) -> None:
    base, received = server
    store = await Store.open(tmp_path / "state", StoreConfig())
    try:
        await store.ledger.audit("platform", "c9", "fetch_logs", {}, "accepted")
        params = parse(FetchLogsParams, {"upload_url": f"{base}/diag"})
        assert isinstance(params, FetchLogsParams)
        config = tmp_path / "agent.toml"
        config.write_text('[platform]\nurl = "https://h/v1"\n')
        details = await collect_and_upload(
            params,
            sources=LogSources(journald_unit=None),
            audit=lambda s, u: store.ledger.audit_entries(since=s, until=u),
            config_path=config,
            workdir=tmp_path / "work",
        )
    finally:
        await store.close()
    body = received.requests[0]["body"]
    assert details["sha256"] == hashlib.sha256(body).hexdigest()
    assert details["size"] == len(body)
    assert details["files"] == ["MANIFEST.txt", "audit/commands.jsonl", "config/agent.toml"]
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        assert tar.getnames() == details["files"]
    assert list((tmp_path / "work").iterdir()) == []  # the bundle is deleted after upload


async def test_failed_upload_carries_the_bundle_details(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    params = parse(FetchLogsParams, {"upload_url": f"http://127.0.0.1:{port}/x"})
    assert isinstance(params, FetchLogsParams)

    async def no_audit(since: datetime, until: datetime) -> list[AuditEntry]:
        return []

    with pytest.raises(UploadError) as err:
        await collect_and_upload(
            params,
            sources=LogSources(journald_unit=None),
            audit=no_audit,
            config_path=None,
            workdir=tmp_path / "work",
            timeout_s=5,
        )
    assert err.value.details is not None and err.value.details["files"] == ["MANIFEST.txt"]
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
