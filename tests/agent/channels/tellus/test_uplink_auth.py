"""Registration, credential storage and bearer tokens against the real emulator
(virtual time: see vtime.py)."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import stat
from pathlib import Path

import pytest
import structlog

from agent.emulator import OutageMode, RequestKind
from agent.store import Credentials, CredentialStore
from agent.channels.tellus.auth import AuthError, TokenManager
from agent.channels.tellus.client import PlatformHttp
from tests.agent.channels.tellus.harness import IDENTITY, event, harness, wait_for
from tests.agent.channels.tellus.vtime import virtual_time


@virtual_time()
async def test_first_start_registers_and_stores_credentials_0600_without_logging_the_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as logs:
        async with harness(tmp_path / "state") as h:
            await h.started()
            await h.store.outbox.put("event", event(1))
            await h.drained()
            (device,) = h.emu.context.store.devices()
            secret = device.secret

    path = tmp_path / "state" / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = json.loads(path.read_text())
    assert stored["device_id"] == device.device_id and stored["device_secret"] == secret
    assert [r.kind for r in h.received()[:3]] == [
        RequestKind.REGISTER,
        RequestKind.TOKEN,
        RequestKind.HEARTBEAT,
    ]
    assert any(e["event"] == "registered" for e in logs)
    out, err = capfd.readouterr()
    for text in (repr(logs), caplog.text, out, err):
        assert secret not in text


@virtual_time()
async def test_second_start_reuses_stored_credentials(tmp_path: Path) -> None:
    async with harness(tmp_path / "state") as h:
        first = await h.started()
        await first.stop()
        second = await h.started()
        assert second.online
        assert len(h.received(RequestKind.REGISTER)) == 1
        assert len(h.accepted(RequestKind.TOKEN)) == 2
        assert len(h.emu.context.store.devices()) == 1


@virtual_time()
async def test_token_is_refreshed_before_it_expires(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    ttl = 700.0  # refresh margin = min(300 s + 0-60 s jitter, ttl / 2)
    async with harness(tmp_path / "state", token_ttl=ttl, connector_ids=[1, 2]) as h:
        await h.started()
        await asyncio.sleep(2400)
        issued = h.times(RequestKind.TOKEN, accepted=True)
        assert len(issued) >= 6
        gaps = [b - a for a, b in itertools.pairwise(issued)]
        # due 350-400 s after issue, done by the next request (heartbeat/long-poll every <= 32 s)
        assert all(340 <= gap <= 400 + 35 for gap in gaps), gaps
        assert all(gap < ttl for gap in gaps)
        rejected = [r for _, r in h.log if r.http_status == 401]
        assert rejected == []  # the platform never saw an expired token
        assert loop.time() - issued[-1] < ttl


@virtual_time()
async def test_forced_expiry_gets_one_new_token_and_retries_the_request_once(
    tmp_path: Path,
) -> None:
    async with harness(tmp_path / "state", connector_ids=[1, 2]) as h:
        await h.started()
        tokens_before = len(h.received(RequestKind.TOKEN))
        assert h.emu.expire_tokens() >= 1
        await h.store.outbox.put("event", event(7))
        await h.drained()
        events = h.received(RequestKind.EVENTS)
        assert [(r.http_status, r.code) for r in events] == [(401, 2002), (200, 0)]
        assert events[0].body == events[1].body
        tokens = h.received(RequestKind.TOKEN)
        assert len(tokens) == tokens_before + 1
        assert events[0].seq < tokens[-1].seq < events[1].seq

        # several loops hitting 2002 at once share one refresh
        h.emu.expire_tokens()
        h._uplinks[-1].heartbeat_soon()
        await h.store.outbox.put("event", event(8))
        h.emu.queue_command(command="stop_charging", connector_id=1)  # wakes a held long-poll
        await h.drained()
        await h.wait_delivered(1)
        await asyncio.sleep(5)
        assert len(h.received(RequestKind.TOKEN)) == tokens_before + 2
        assert h._uplinks[-1].online


@virtual_time()
async def test_rejected_secret_is_retired_after_three_token_refusals_and_the_device_registers_again(
    tmp_path: Path,
) -> None:
    async with harness(tmp_path / "state") as h:
        uplink = await h.started()
        old_id = h.store.credentials.load().device_id  # type: ignore[union-attr]
        h.emu.context.store.delete_device(old_id)  # platform forgot us: tokens and secret invalid
        uplink.heartbeat_soon()
        await wait_for(lambda: not uplink.online, timeout=60)
        await wait_for(lambda: uplink.online, timeout=1200)
        new = h.store.credentials.load()
        assert new is not None and new.device_id != old_id
        assert len(list((tmp_path / "state").glob("credentials.json.rejected-*"))) == 1
        token_answers = [r.http_status for r in h.received(RequestKind.TOKEN)]
        assert token_answers == [200, 401, 401, 401, 200]
        assert len(h.accepted(RequestKind.REGISTER)) == 2


@virtual_time()
async def test_409_without_a_stored_secret_needs_reprovisioning_and_retries_every_10_minutes(
    tmp_path: Path,
) -> None:
    loop = asyncio.get_running_loop()
    async with harness(tmp_path / "state") as h:
        await h.started()  # SN-UPLINK-1 is registered, its secret lives in state/
        http = PlatformHttp(h.emu.api_url)
        lost = TokenManager(
            http,
            CredentialStore(tmp_path / "wiped"),
            IDENTITY,
            lambda i, s: Credentials(device_id=i, device_secret=s),
            clock=loop.time,
        )
        with pytest.raises(AuthError) as info:
            await lost.token()
        assert info.value.reprovision and lost.needs_reprovision
        assert not (tmp_path / "wiped" / "credentials.json").exists()

        refused_before = len(h.times(RequestKind.REGISTER, accepted=False))
        start = loop.time()
        replaced = h.make_uplink(http=http, tokens=lost)
        await replaced.start()
        await asyncio.sleep(1500)
        assert not replaced.online
        refused = h.times(RequestKind.REGISTER, accepted=False)[refused_before:]
        assert len(refused) == 3  # at start, after ~10 min, after ~20 min
        assert all(b - a >= 600 for a, b in itertools.pairwise(refused))
        assert not any(r.kind == RequestKind.TOKEN for t, r in h.log if t >= start)


@virtual_time()
async def test_a_failed_early_refresh_keeps_the_still_valid_token(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    async with harness(tmp_path / "state", token_ttl=1000.0) as h:
        http = PlatformHttp(h.emu.api_url)
        tokens = TokenManager(
            http,
            h.store.credentials,
            IDENTITY,
            lambda i, s: Credentials(device_id=i, device_secret=s),
            clock=loop.time,
        )
        first = await tokens.token()
        assert 640 <= tokens.refresh_at - loop.time() <= 700  # 5 min + 0-60 s before expiry
        await asyncio.sleep(tokens.refresh_at - loop.time() + 1)
        h.emu.start_outage(60, OutageMode.HTTP_503)
        assert await tokens.token() == first  # refresh failed, token still good for ~5 min
        assert tokens.refresh_at - loop.time() == 30.0  # tried again in 30 s
        assert await tokens.token() == first  # no new attempt before then
        await asyncio.sleep(61)
        second = await tokens.token()
        assert second != first
        assert [r.http_status for r in h.received(RequestKind.TOKEN)] == [200, 503, 200]
        await http.close()
