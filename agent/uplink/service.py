"""The uplink service: heartbeat, outbox sender, long-poll loops, one reconnect path.

Contract:

* Charging never waits on anything here: the uplink only reads the outbox and
  hands received commands to the dispatcher. It can be stopped, restarted
  (:meth:`Uplink.force_reconnect`) or disabled without touching a connector.
* Items leave the outbox only after the platform acknowledged them (2xx with
  ``code`` 0 or an empty body; ``4001`` for a charging record = already stored).
  A permanent rejection (``1001``/``1002``) moves the item to the dead-letter table;
  billing data is never deleted silently.
* Rate shaping under the per-device limits: heartbeat+telemetry share a bucket of
  ``high_rate`` req/s (limit 10/s), events+records+statuses(+firmware status) share
  ``other_rate`` req/min (limit 60/min). A 429 pauses the whole class for
  ``retry_after_seconds`` (or the backoff delay).
* One supervised reconnect path: any transport failure (network error, timeout,
  5xx) marks the link offline; every loop then waits while a single supervisor
  retries with exponential backoff + jitter, never more than 5 reconnects in
  10 minutes (F-0302 budget). ``force_reconnect`` counts against the same budget.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Protocol

import structlog

from agent.uplink.auth import AuthError, TokenManager
from agent.uplink.client import ApiResult, PlatformHttp
from agent.uplink.shaping import Backoff, ReconnectBudget, TokenBucket

log = structlog.get_logger(__name__)

ENDPOINT_BY_KIND = {
    "command_status": "/device/command-status",
    "charging_record": "/device/charging-records",
    "event": "/device/events",
    "firmware_status": "/device/firmware/status",
    "telemetry": "/device/telemetry",
}


def utc_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class OutboxLike(Protocol):
    async def next_batch(self, limit: int, kinds: Any = None) -> list[Any]: ...
    async def ack(self, item_id: int) -> bool: ...
    async def nack(self, item_id: int, error: str) -> bool: ...
    async def dead_letter(self, item_id: int, reason: str) -> bool: ...
    async def wait_for_items(self, timeout: float | None = None) -> bool: ...
    def total_depth(self, kinds: Any = None) -> int: ...


Deliver = Callable[[dict[str, Any], str, "int | None"], Awaitable[None]]


@dataclass
class UplinkStats:
    online: bool = False
    last_heartbeat_ok: str | None = None
    reconnects: int = 0
    sent: dict[str, int] = field(default_factory=dict)
    dead_lettered: int = 0
    last_error: str | None = None
    rate_limited: int = 0


class Uplink:
    def __init__(
        self,
        *,
        http: PlatformHttp,
        tokens: TokenManager,
        outbox: OutboxLike,
        deliver: Deliver,
        heartbeat_status: Callable[[], tuple[str, int]],
        connector_ids: list[int],
        heartbeat_interval_s: float = 30.0,
        long_poll_wait_s: int = 30,
        high_rate: float = 8.0,
        other_per_minute: float = 50.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.http = http
        self.tokens = tokens
        self.outbox = outbox
        self.deliver = deliver
        self.heartbeat_status = heartbeat_status
        self.connector_ids = connector_ids
        self.heartbeat_interval_s = heartbeat_interval_s
        self.long_poll_wait_s = long_poll_wait_s
        self.clock = clock
        self.rng = rng or random.Random()
        self.sleep = sleep
        self.high = TokenBucket(high_rate, burst=high_rate, clock=clock)
        self.other = TokenBucket(other_per_minute / 60.0, burst=5.0, clock=clock)
        self.backoff = Backoff(rng=self.rng)
        self.budget = ReconnectBudget(clock=clock)
        self.stats = UplinkStats()
        self._online = asyncio.Event()
        self._offline = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._poll_tasks: list[asyncio.Task[None]] = []
        self._running = False
        self._heartbeat_now = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    @property
    def online(self) -> bool:
        return self._online.is_set()

    async def start(self) -> None:
        """Start every loop; the first heartbeat goes out as soon as a token is had."""
        self._running = True
        self._offline.set()
        self._tasks = [
            asyncio.create_task(self._supervisor(), name="uplink-supervisor"),
            asyncio.create_task(self._heartbeat_loop(), name="uplink-heartbeat"),
            asyncio.create_task(self._sender_loop(), name="uplink-sender"),
        ]
        self._start_polls()

    def _start_polls(self) -> None:
        self._poll_tasks = [
            asyncio.create_task(self._poll_loop(cid), name=f"uplink-poll-{cid}") for cid in self.connector_ids
        ]

    async def stop(self, *, final_heartbeat: bool = True, timeout: float = 5.0) -> None:
        """Stop every loop; send a final heartbeat ``offline`` first when online."""
        self._running = False
        for task in self._tasks + self._poll_tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._poll_tasks, return_exceptions=True)
        if final_heartbeat and self.online:
            try:
                await asyncio.wait_for(self._send_heartbeat("offline"), timeout)
            except (asyncio.TimeoutError, AuthError):
                log.warning("final_heartbeat_failed")
        await self.http.close()
        self._online.clear()

    async def force_reconnect(self) -> None:
        """Drop every connection, fetch a new token, restart the poll loops (counts as a reconnect)."""
        log.info("force_reconnect")
        for task in self._poll_tasks:
            task.cancel()
        await asyncio.gather(*self._poll_tasks, return_exceptions=True)
        await self.http.close()
        self.tokens.invalidate()
        self._mark_offline("force_reconnect", immediate=True)
        self._start_polls()

    def heartbeat_soon(self) -> None:
        """Send a heartbeat now (e.g. after a fault changed the device status)."""
        self._heartbeat_now.set()

    # ------------------------------------------------------------------ connection supervision

    def _mark_offline(self, reason: str, *, immediate: bool = False) -> None:
        if self._online.is_set():
            log.warning("uplink_offline", reason=reason)
        self._online.clear()
        self.stats.online = False
        self.stats.last_error = reason
        self._immediate = immediate
        self._offline.set()

    def _mark_online(self) -> None:
        if not self._online.is_set():
            log.info("uplink_online")
        self.backoff.reset()
        self.stats.online = True
        self._offline.clear()
        self._online.set()

    async def _supervisor(self) -> None:
        """The one reconnect path: wait while offline, retry within backoff and budget."""
        first = True
        while self._running:
            await self._offline.wait()
            if not first:
                delay = 0.0 if getattr(self, "_immediate", False) else self.backoff.next_delay()
                delay = max(delay, self.budget.wait_time())
                if delay > 0:
                    log.info("reconnect_wait", seconds=round(delay, 1), budget_used=self.budget.used())
                    await self.sleep(delay)
                self.budget.record()
                self.stats.reconnects += 1
            self._immediate = False
            try:
                await self.tokens.token()
                result = await self._send_heartbeat(self.heartbeat_status()[0])
            except AuthError as exc:
                log.warning("reconnect_auth_failed", error=str(exc))
                first = False
                if exc.reprovision:
                    await self.sleep(600.0)
                continue
            if result.ok:
                self._mark_online()
            first = False

    async def _wait_online(self) -> None:
        await self._online.wait()

    # ------------------------------------------------------------------ requests

    async def _call(
        self, method: str, path: str, *, body: Any = None, params: dict[str, Any] | None = None, timeout_s: float | None = None
    ) -> ApiResult:
        """One authorised request with the documented 401 reaction (new token, retry once)."""
        for attempt in (0, 1):
            token = await self.tokens.token()
            result = await self.http.request(method, path, body=body, params=params, token=token, timeout_s=timeout_s)
            if result.kind == "auth" and attempt == 0:
                self.tokens.invalidate()
                continue
            if result.kind == "transient":
                self._mark_offline(result.describe())
            return result
        return result

    async def _send_heartbeat(self, status: str) -> ApiResult:
        _, fault_code = self.heartbeat_status()
        body = {"timestamp": utc_iso(), "status": status, "fault_code": fault_code if status != "offline" else fault_code}
        await self._shape(self.high)
        result = await self._call("POST", "/device/heartbeat", body=body)
        if result.ok:
            self.stats.last_heartbeat_ok = body["timestamp"]
            commands = (result.data or {}).get("commands") if isinstance(result.data, dict) else None
            for cmd in commands or []:
                if isinstance(cmd, dict):
                    await self.deliver(cmd, "heartbeat", None)
        elif result.kind == "rate_limited":
            self.high.pause(result.retry_after or 1.0)
        return result

    async def _shape(self, bucket: TokenBucket) -> None:
        while True:
            delay = bucket.delay()
            if delay <= 0:
                bucket.take()
                return
            await self.sleep(delay)

    # ------------------------------------------------------------------ loops

    async def _heartbeat_loop(self) -> None:
        while self._running:
            await self._wait_online()
            interval = self.heartbeat_interval_s + self.rng.uniform(-2.0, 2.0)
            try:
                await asyncio.wait_for(self._heartbeat_now.wait(), max(interval, 1.0))
            except asyncio.TimeoutError:
                pass
            self._heartbeat_now.clear()
            if not self.online:
                continue
            try:
                result = await self._send_heartbeat(self.heartbeat_status()[0])
            except AuthError as exc:
                self._mark_offline(str(exc))
                continue
            if not result.ok:
                log.warning("heartbeat_failed", error=result.describe())

    async def _sender_loop(self) -> None:
        while self._running:
            await self._wait_online()
            items = await self.outbox.next_batch(20)
            if not items:
                await self.outbox.wait_for_items(timeout=1.0)
                continue
            for item in items:
                if not self.online:
                    break
                try:
                    await self._send_item(item)
                except AuthError as exc:
                    await self.outbox.nack(item.id, str(exc))
                    self._mark_offline(str(exc))
                    break

    async def _send_item(self, item: Any) -> None:
        bucket = self.high if item.kind == "telemetry" else self.other
        await self._shape(bucket)
        result = await self._call("POST", ENDPOINT_BY_KIND[item.kind], body=item.payload)
        kind = result.kind
        if kind == "ok" or (kind == "conflict" and item.kind == "charging_record"):
            await self.outbox.ack(item.id)
            self.stats.sent[item.kind] = self.stats.sent.get(item.kind, 0) + 1
        elif kind == "permanent" or (kind == "not_found" and item.kind == "command_status"):
            log.error("upload_rejected", kind=item.kind, error=result.describe())
            await self.outbox.dead_letter(item.id, result.describe())
            self.stats.dead_lettered += 1
        elif kind == "rate_limited":
            self.stats.rate_limited += 1
            bucket.pause(result.retry_after or self.backoff.next_delay())
            await self.outbox.nack(item.id, result.describe())
        elif kind == "forbidden":
            log.error("upload_forbidden", kind=item.kind, error=result.describe())
            await self.outbox.nack(item.id, result.describe())
            bucket.pause(300.0)
        else:
            await self.outbox.nack(item.id, result.describe())

    async def _poll_loop(self, connector_id: int) -> None:
        backoff = Backoff(rng=self.rng)
        while self._running:
            await self._wait_online()
            try:
                result = await self._call(
                    "GET",
                    "/device/commands",
                    params={"connector_id": connector_id, "wait": self.long_poll_wait_s},
                    timeout_s=self.long_poll_wait_s + 15.0,
                )
            except AuthError as exc:
                self._mark_offline(str(exc))
                continue
            if result.ok:
                backoff.reset()
                if isinstance(result.data, dict):
                    await self.deliver(result.data, f"long_poll:{connector_id}", connector_id)
                continue
            if result.kind == "rate_limited":
                await self.sleep(result.retry_after or backoff.next_delay())
            elif result.kind != "transient":
                log.warning("long_poll_failed", connector=connector_id, error=result.describe())
                await self.sleep(backoff.next_delay())
