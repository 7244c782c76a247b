"""One redaction for live logs and log bundles: the same secrets leak through neither."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import structlog

from agent.maintenance.logbundle import LogSources, build_bundle
from agent.redaction import REDACTED, redact_text, redact_tree, safe_url
from agent.service import logs

#: secret -> a log event (keyword arguments) that carries it
SECRETS: dict[str, dict[str, object]] = {
    "bearer-tok-1a2b3c": {"header": "Authorization: Bearer bearer-tok-1a2b3c"},
    "YmFzaWMtY3JlZHM=": {"proxy": "Proxy-Authorization: Basic YmFzaWMtY3JlZHM="},
    "userinfo-pw-9z": {"url": "https://agent:userinfo-pw-9z@platform.example/v1/heartbeat"},
    "sig-value-77f": {"upload": "PUT https://s3.example/b/x.tar.gz?X-Amz-Date=1&sig=sig-value-77f"},
    "amz-sig-c0ffee": {"upload": "https://s3.example/x?X-Amz-Signature=amz-sig-c0ffee&a=1"},
    "kv-password-5": {"note": "login password=kv-password-5 user=bob"},
    "json-token-6": {"body": '{"access_token": "json-token-6", "n": 1}'},
    "keyed-secret-8": {"device_secret": "keyed-secret-8"},
    "nested-secret-9": {"request": {"headers": {"Authorization": "nested-secret-9"}}},
    "listed-tok-10": {"tries": ["Bearer listed-tok-10"]},
}


@pytest.fixture
def live_log() -> Iterator[io.StringIO]:
    """The agent's real logging set-up writing JSON to a buffer; restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    buf = io.StringIO()
    logs.configure(level="debug", fmt="json", stream=buf)
    try:
        yield buf
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
        structlog.reset_defaults()


def test_live_log_lines_leak_no_secret(live_log: io.StringIO) -> None:
    log = structlog.get_logger("charger_agent.test")
    for i, fields in enumerate(SECRETS.values()):
        log.info(f"event_{i}", **fields)
    logging.getLogger("aiohttp.client").warning("retrying https://agent:userinfo-pw-9z@h.example/")
    out = live_log.getvalue()
    assert out.count("\n") == len(SECRETS) + 1, out
    leaks = [s for s in SECRETS if s in out]
    assert not leaks, f"live log leaked {leaks}:\n{out}"
    assert "Bearer ***" in out and "Basic ***" in out and "sig=***" in out


async def test_bundle_log_lines_leak_no_secret(tmp_path: Path) -> None:
    at = datetime(2025, 3, 15, 12, 0, tzinfo=UTC)
    log_file = tmp_path / "agent.log"
    log_file.write_text(
        "".join(
            json.dumps({"event": f"event_{i}", **fields, "timestamp": "2025-03-15T12:00:00Z"}) + "\n"
            for i, fields in enumerate(SECRETS.values())
        )
    )
    bundle = await build_bundle(
        since=at.replace(hour=0),
        until=at.replace(hour=23),
        sources=LogSources(journald_unit=None, log_file=log_file),
        audit_entries=[],
        config_path=None,
        workdir=tmp_path / "work",
    )
    with tarfile.open(bundle.path, "r:gz") as tar:
        member = tar.extractfile("logs/agent.log")
        assert member is not None
        out = member.read().decode()
    assert out.count("\n") == len(SECRETS), out
    leaks = [s for s in SECRETS if s in out]
    assert not leaks, f"bundle leaked {leaks}:\n{out}"


def test_text_and_tree_rules() -> None:
    assert redact_text("no secret here, key count=3") == "no secret here, key count=3"
    assert redact_text("GET https://u:p@h.example/x") == "GET https://h.example/x"
    tree = redact_tree({"token": 5, "list": ("Bearer abcdef",), "n": 1})
    assert tree == {"token": REDACTED, "list": ("Bearer ***",), "n": 1}
    assert safe_url("https://u:p@h.example:8443/b/x?sig=1#f") == "https://h.example:8443/b/x"


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
