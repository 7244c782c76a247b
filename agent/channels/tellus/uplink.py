"""The uplink service: heartbeat, outbox sender, long-poll loops, one reconnect path.

Contract:

* Charging never waits on anything here: the uplink only reads the outbox and
  hands received commands to the dispatcher. It can be stopped, restarted
  (:meth:`Uplink.force_reconnect`) or disabled without touching a connector.
  A loop that hits an unexpected error logs it and restarts after a backoff; it
  never dies silently.
* Items leave the outbox only after the platform acknowledged them (2xx with
  ``code`` 0 or an empty body; ``4001`` for a charging record = already stored).
  A permanent rejection (``1001``/``1002``, or ``4001`` on anything but a charging
  record, or ``3001`` on a command status) moves the item to the dead-letter table;
  billing data is never deleted silently. Everything else is retried.
* Send order is strict priority: ``command_status``, ``charging_record``, ``event``,
  ``firmware_status``, ``telemetry``, oldest first within a kind; the next item is
  chosen again after every wait, so a newly queued urgent item goes next. A class
  paused by a 429 is skipped (the other class keeps flowing) until the pause ends.
* Rate shaping under the per-device limits: heartbeat+telemetry share a bucket of
  ``high_rate`` req/s (limit 10/s), events+records+statuses(+firmware status) share
  ``other_per_minute`` req/min (limit 60/min), each with a burst of 1 by default, so
  neither class can exceed its limit over any window (and CDRs/events never go out
  faster than 1/s while a backlog drains). A 429 pauses the whole class for
  ``retry_after_seconds`` (or the class's backoff delay).
* One supervised reconnect path: any transport failure (network error, timeout,
  5xx) marks the link offline; every loop then waits while a single supervisor
  retries with exponential backoff + jitter, never more than 5 reconnects in
  10 minutes (F-0302 budget, paced two minutes apart once two quick retries failed).
  ``force_reconnect`` counts against the same budget.
* Every wait (backoff, pacing, shaping, heartbeat interval, idle outbox) goes through
  the injected ``sleep`` and every measurement through the injected ``clock``
  (monotonic seconds); only HTTP timeouts and :meth:`Uplink.stop`'s timeout run on the
  event loop's clock. The wall clock is read for the heartbeat ``timestamp`` only.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from agent.store.outbox import PRIORITY
from agent.channels.tellus.auth import REPROVISION_RETRY_S, AuthError, TokenManager
from agent.channels.tellus.client import ApiResult, PlatformHttp
from agent.channels.tellus.shaping import Backoff, ReconnectBudget, TokenBucket
from agent.utctime import now_iso
from hal.tasks import stop_tasks

log = structlog.get_logger(__name__)

ENDPOINT_BY_KIND = {
    "command_status": "/device/command-status",
    "charging_record": "/device/charging-records",
    "event": "/device/events",
    "firmware_status": "/device/firmware/status",
    "telemetry": "/device/telemetry",
}
#: Outbox kinds in send order (highest priority first).
SEND_ORDER: tuple[str, ...] = tuple(sorted(ENDPOINT_BY_KIND, key=PRIORITY.__getitem__))
HIGH_CLASS_KINDS = frozenset({"telemetry"})

#: Documented per-device limits (platform-api §10): requests per window.
HIGH_LIMIT_PER_S = 10
OTHER_LIMIT_PER_MIN = 60
FORBIDDEN_PAUSE_S = 300.0
LONG_POLL_READ_MARGIN_S = 15.0
IDLE_RECHECK_S = 30.0  # the outbox wakes the sender on every put; this is only a safety net


class OutboxLike(Protocol):
    async def next_batch(self, limit: int = ..., kinds: Any = None) -> list[Any]: ...
    async def ack(self, item_id: int) -> bool: ...
    async def nack(self, item_id: int, error: str) -> bool: ...
    async def dead_letter(self, item_id: int, reason: str) -> bool: ...
    async def wait_for_items(self, kinds: Any = None, timeout: float | None = None) -> bool: ...
    def total_depth(self, kinds: Any = None) -> int: ...


Deliver = Callable[[dict[str, Any], str, "int | None"], Awaitable[None]]


@dataclass
class UplinkStats:
    online: bool = False
    last_heartbeat_ok: str | None = None
    reconnects: int = 0
    #: clock times of the most recent reconnect attempts (diagnostics, F-0302 evidence)
    reconnect_times: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    sent: dict[str, int] = field(default_factory=dict)
    dead_lettered: int = 0
    last_error: str | None = None
    rate_limited: int = 0
    #: heartbeats tried (whatever the answer): the systemd watchdog's progress signal
    heartbeats_attempted: int = 0


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
        high_burst: float = 1.0,
        other_burst: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.http = http
        self.tokens = tokens
        self.outbox = outbox
        self.deliver = deliver
        self.heartbeat_status = heartbeat_status
        self.connector_ids = list(connector_ids)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.long_poll_wait_s = max(1, min(60, int(long_poll_wait_s)))
        self.clock = clock
        self.rng = rng or random.Random()
        self.sleep = sleep
        self.high = TokenBucket(high_rate, burst=high_burst, clock=clock)
        self.other = TokenBucket(other_per_minute / 60.0, burst=other_burst, clock=clock)
        if self.high.max_in_window(1.0) > HIGH_LIMIT_PER_S:
            raise ValueError(f"high_rate + high_burst must stay within {HIGH_LIMIT_PER_S}/s")
        if self.other.max_in_window(60.0) > OTHER_LIMIT_PER_MIN:
            raise ValueError(
                f"other_per_minute + other_burst must stay within {OTHER_LIMIT_PER_MIN}/min"
            )
        self.backoff = Backoff(rng=self.rng)
        self._class_backoff = {self.high: Backoff(rng=self.rng), self.other: Backoff(rng=self.rng)}
        self.budget = ReconnectBudget(clock=clock)
        self.stats = UplinkStats()
        self._online = asyncio.Event()
        self._offline = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._poll_tasks: list[asyncio.Task[None]] = []
        self._poll_generation = 0
        self._running = False
        self._immediate = False
        self._connected_once = False
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
            asyncio.create_task(
                self._guarded("supervisor", self._supervisor), name="uplink-supervisor"
            ),
            asyncio.create_task(
                self._guarded("heartbeat", self._heartbeat_loop), name="uplink-heartbeat"
            ),
            asyncio.create_task(self._guarded("sender", self._sender_loop), name="uplink-sender"),
        ]
        self._start_polls()

    def _start_polls(self) -> None:
        self._poll_generation += 1
        generation = self._poll_generation
        self._poll_tasks = [
            asyncio.create_task(
                self._guarded(f"poll-{cid}", functools.partial(self._poll_loop, cid, generation)),
                name=f"uplink-poll-{cid}",
            )
            for cid in self.connector_ids
        ]

    async def stop(self, *, final_heartbeat: bool = True, timeout: float = 5.0) -> None:
        """Stop every loop; send a final heartbeat ``offline`` first when online."""
        self._running = False
        current = asyncio.current_task()
        await stop_tasks(t for t in self._tasks + self._poll_tasks if t is not current)
        if final_heartbeat and self.online:
            try:
                result = await asyncio.wait_for(self._send_heartbeat("offline"), timeout)
                if not result.ok:
                    log.warning("final_heartbeat_failed", error=result.describe())
            except (TimeoutError, AuthError) as exc:
                log.warning("final_heartbeat_failed", error=str(exc) or type(exc).__name__)
        await self.http.close()
        self._online.clear()
        self.stats.online = False

    async def force_reconnect(self) -> None:
        """Drop every connection, fetch a new token, restart the poll loops (counts as a reconnect).

        Safe to call from inside ``deliver`` (a command handler): the calling poll loop is
        not cancelled under its caller; it ends by itself once ``deliver`` returns.
        """
        log.info("force_reconnect")
        current = asyncio.current_task()
        old = [t for t in self._poll_tasks if t is not current]
        self._poll_generation += 1  # the calling poll loop (if any) ends after its deliver
        await stop_tasks(old)
        await self.http.close()
        self.tokens.invalidate()
        self._mark_offline("force_reconnect", immediate=True)
        if self._running:
            self._start_polls()

    def heartbeat_soon(self) -> None:
        """Send a heartbeat now (e.g. after a fault changed the device status)."""
        self._heartbeat_now.set()

    async def _guarded(self, name: str, body: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a loop; restart it after an unexpected exception instead of dying silently."""
        backoff = Backoff(rng=self.rng)
        while self._running:
            try:
                await body()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats.last_error = f"{name}: {type(exc).__name__}: {exc}"
                log.exception("uplink_loop_error", loop=name)
                await self.sleep(backoff.next_delay())

    # ------------------------------------------------------------------ connection supervision

    def _mark_offline(self, reason: str, *, immediate: bool = False) -> None:
        if self._online.is_set():
            log.warning("uplink_offline", reason=reason)
        self._online.clear()
        self.stats.online = False
        self.stats.last_error = reason
        self._immediate = self._immediate or immediate
        self._offline.set()

    def _mark_online(self) -> None:
        if not self._online.is_set():
            log.info("uplink_online", reconnects_in_window=self.budget.used())
        self.backoff.reset()
        self.stats.online = True
        self._offline.clear()
        self._online.set()

    async def _supervisor(self) -> None:
        """The one reconnect path: wait while offline, retry within backoff and budget.

        The very first connection after :meth:`start` is not a reconnect; every later
        attempt is, and is counted in the budget before it is made.
        """
        while self._running:
            await self._offline.wait()
            if self._connected_once:
                delay = 0.0 if self._immediate else self.backoff.next_delay()
                delay = max(delay, self.budget.wait_time())
                if delay > 0:
                    log.info(
                        "reconnect_wait", seconds=round(delay, 1), budget_used=self.budget.used()
                    )
                    await self.sleep(delay)
                self.budget.record()
                self.stats.reconnects += 1
                self.stats.reconnect_times.append(self.clock())
            self._connected_once = True
            self._immediate = False
            try:
                await self.tokens.token()
                result = await self._send_heartbeat()
            except AuthError as exc:
                log.warning("reconnect_auth_failed", error=str(exc))
                if exc.reprovision:
                    await self.sleep(REPROVISION_RETRY_S)
                continue
            if not result.ok:
                log.warning("reconnect_failed", error=result.describe())
            elif self._immediate:
                continue  # force_reconnect() ran while this probe delivered its commands
            else:
                self._mark_online()

    async def _wait_online(self) -> None:
        await self._online.wait()

    # ------------------------------------------------------------------ requests

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        retry_bucket: TokenBucket | None = None,
    ) -> ApiResult:
        """One authorised request with the documented 401 reaction (new token, retry once)."""
        result = ApiResult(None, error="not sent")
        for attempt in (0, 1):
            if attempt == 1 and retry_bucket is not None:
                await self._shape(retry_bucket)
            token = await self.tokens.token()
            result = await self.http.request(
                method, path, body=body, params=params, token=token, timeout_s=timeout_s
            )
            if result.kind == "auth":
                self.tokens.invalidate(token)
                if attempt == 0:
                    continue
            if result.kind == "transient":
                self._mark_offline(result.describe())
            return result
        return result

    def _recover_credentials(self, result: ApiResult) -> None:
        """A 401 after the retry, or 3001 on a device call: new token via the supervisor."""
        self.tokens.invalidate()
        self._mark_offline(f"credential recovery: {result.describe()}")

    async def _send_heartbeat(self, status: str | None = None) -> ApiResult:
        self.stats.heartbeats_attempted += 1
        current_status, fault_code = self.heartbeat_status()
        body: dict[str, Any] = {
            "timestamp": now_iso(),
            "status": status or current_status,
            "fault_code": int(fault_code),
        }
        await self._shape(self.high)
        result = await self._call("POST", "/device/heartbeat", body=body, retry_bucket=self.high)
        if result.ok:
            self.stats.last_heartbeat_ok = body["timestamp"]
            commands = result.data.get("commands") if isinstance(result.data, dict) else None
            for cmd in commands if isinstance(commands, list) else []:
                if isinstance(cmd, dict):
                    await self._deliver(cmd, "heartbeat", None)
        elif result.kind == "rate_limited":
            self.stats.rate_limited += 1
            self.high.pause(result.retry_after or 1.0)
        elif result.kind in ("auth", "not_found"):
            self.tokens.invalidate()
        return result

    async def _deliver(self, cmd: dict[str, Any], channel: str, connector_id: int | None) -> None:
        try:
            await self.deliver(cmd, channel, connector_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("deliver_failed", channel=channel, command_id=cmd.get("command_id"))

    async def _shape(self, bucket: TokenBucket) -> None:
        while True:
            delay = bucket.delay()
            if delay <= 0:
                bucket.take()
                return
            await self.sleep(delay)

    def _bucket_for(self, kind: str) -> TokenBucket:
        return self.high if kind in HIGH_CLASS_KINDS else self.other

    # ------------------------------------------------------------------ loops

    async def _heartbeat_loop(self) -> None:
        while self._running:
            await self._wait_online()
            interval = max(1.0, self.heartbeat_interval_s + self.rng.uniform(-2.0, 2.0))
            await self._sleep_unless(self._heartbeat_now.wait(), interval)
            self._heartbeat_now.clear()
            if not self.online:
                continue
            try:
                result = await self._send_heartbeat()
            except AuthError as exc:
                self._mark_offline(str(exc))
                continue
            if result.kind in ("auth", "not_found"):
                self._recover_credentials(result)
            elif not result.ok:
                log.warning("heartbeat_failed", error=result.describe())

    async def _sleep_unless(self, wake: Awaitable[Any], seconds: float) -> None:
        """Sleep ``seconds`` with the injected ``sleep``, or less if ``wake`` completes first.

        Every wait goes through the injected clock: the outbox's own ``timeout`` would be
        measured on the real monotonic clock.
        """
        sleeper = asyncio.ensure_future(self.sleep(seconds))
        waker = asyncio.ensure_future(wake)
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (sleeper, waker):
                fut.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)

    async def _sender_loop(self) -> None:
        while self._running:
            await self._wait_online()
            kinds = [k for k in SEND_ORDER if self._bucket_for(k).paused_for() <= 0]
            paused = [b.paused_for() for b in (self.high, self.other) if b.paused_for() > 0]
            if not kinds:
                await self.sleep(min(paused))
                continue
            items = await self.outbox.next_batch(1, kinds=kinds)
            if not items:
                await self._sleep_unless(
                    self.outbox.wait_for_items(kinds=kinds), min([IDLE_RECHECK_S, *paused])
                )
                continue
            item = items[0]
            bucket = self._bucket_for(item.kind)
            delay = bucket.delay()
            if delay > 0:
                await self.sleep(delay)
                continue  # choose again: something more urgent may have been queued meanwhile
            if not self.online:
                continue
            bucket.take()
            try:
                await self._send_item(item, bucket)
            except AuthError as exc:
                await self.outbox.nack(item.id, str(exc))
                self._mark_offline(str(exc))

    async def _send_item(self, item: Any, bucket: TokenBucket) -> None:
        result = await self._call(
            "POST", ENDPOINT_BY_KIND[item.kind], body=item.payload, retry_bucket=bucket
        )
        kind = result.kind
        backoff = self._class_backoff[bucket]
        if kind == "ok" or (kind == "conflict" and item.kind == "charging_record"):
            await self.outbox.ack(item.id)
            backoff.reset()
            self.stats.sent[item.kind] = self.stats.sent.get(item.kind, 0) + 1
        elif kind in ("permanent", "conflict") or (
            kind == "not_found" and item.kind == "command_status"
        ):
            log.error("upload_rejected", kind=item.kind, item_id=item.id, error=result.describe())
            await self.outbox.dead_letter(item.id, result.describe())
            self.stats.dead_lettered += 1
        elif kind == "rate_limited":
            self.stats.rate_limited += 1
            pause = result.retry_after or backoff.next_delay()
            log.warning("rate_limited", kind=item.kind, pause_s=pause)
            bucket.pause(pause)
            await self.outbox.nack(item.id, result.describe())
        elif kind == "forbidden":
            log.error("upload_forbidden", kind=item.kind, error=result.describe())
            await self.outbox.nack(item.id, result.describe())
            bucket.pause(FORBIDDEN_PAUSE_S)
        elif kind in ("auth", "not_found"):
            await self.outbox.nack(item.id, result.describe())
            self._recover_credentials(result)
        else:  # transient: _call marked the link offline, the supervisor takes over
            await self.outbox.nack(item.id, result.describe())

    async def _poll_loop(self, connector_id: int, generation: int) -> None:
        backoff = Backoff(rng=self.rng)
        channel = f"long_poll:{connector_id}"
        while self._running and generation == self._poll_generation:
            await self._wait_online()
            try:
                result = await self._call(
                    "GET",
                    "/device/commands",
                    params={"connector_id": connector_id, "wait": self.long_poll_wait_s},
                    timeout_s=self.long_poll_wait_s + LONG_POLL_READ_MARGIN_S,
                )
            except AuthError as exc:
                self._mark_offline(str(exc))
                continue
            if result.ok:
                backoff.reset()
                if isinstance(result.data, dict):
                    await self._deliver(result.data, channel, connector_id)
                continue
            if result.kind == "transient":
                continue  # offline now; wait for the supervisor
            if result.kind == "rate_limited":
                await self.sleep(result.retry_after or backoff.next_delay())
            elif result.kind == "auth":
                self._recover_credentials(result)
            else:
                log.warning("long_poll_failed", connector=connector_id, error=result.describe())
                await self.sleep(backoff.next_delay())
