"""The uplink service: heartbeat, outbox senders, long-poll loops, one reconnect path.

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
  billing data is never deleted silently. A charging record refused with
  ``1001``/``1002`` is first sent once more without the optional extension fields
  (``stop_reason``, ``transaction_id``, ``direction``; a strict server may refuse
  unknown fields); refused again, it is dead-lettered. Every dead-lettered record,
  command status or firmware status queues an ``alarm`` event (code 303) naming it, and
  ``charger-agent status`` shows the dead letters. Everything else is retried.
* **Failure isolation per endpoint.** Each outbox kind has its own endpoint, its own
  in-flight request (at most one: order within a kind is kept) and its own backoff
  (``min(1 s * 2^n, 23 s)`` + 0-30 % jitter, so a recovered endpoint is retried within
  30 s) after a 5xx, ``9001`` or timeout; the other
  kinds keep draining meanwhile, and a 403 holds only its endpoint (5 min). Among the
  kinds that are ready, priority decides who gets the next token: ``command_status``,
  ``charging_record``, ``event``, ``firmware_status``, ``telemetry``, oldest first
  within a kind. A class paused by a 429 is skipped until the pause ends
  (``retry_after_seconds``, else the class's backoff).
* The heartbeat has its own loop and never waits behind queued items: it is not shaped
  by the telemetry bucket (only kept at least 1 s apart and held by a 429 pause), so
  with ``high_rate + high_burst <= 9`` the high class still stays within 10/s.
* Rate shaping under the per-device limits: telemetry uses a bucket of ``high_rate``
  req/s, events+records+statuses(+firmware status) share ``other_per_minute`` req/min
  (limit 60/min), each with a burst of 1 by default, so neither class can exceed its
  limit over any window (and CDRs/events never go out faster than 1/s while a backlog
  drains).
* **Link down** means every request fails, not one: a connection-level failure
  (refused, DNS, TLS) marks the link offline at once; a 5xx/``9001``/timeout of one
  request only backs off that endpoint, and when no request has succeeded for
  ``PROBE_AFTER_S`` a heartbeat is sent at once as a probe -- the link is declared
  down only when the heartbeat itself fails that way too, with no success since. Only
  then does a single supervisor reconnect with exponential backoff + jitter, never more
  than 5 reconnects in 10 minutes (paced two minutes apart once two quick retries
  failed); F-0302 is raised when *more than* 5 were wanted in 10 minutes
  (:meth:`Uplink.reconnect_storm`). ``force_reconnect`` counts against the same budget.
* Every wait (backoff, pacing, shaping, heartbeat interval, idle outbox) goes through
  the injected ``sleep`` and every measurement through the injected ``clock``
  (monotonic seconds); only HTTP timeouts and :meth:`Uplink.stop`'s timeout run on the
  event loop's clock. The wall clock is read for timestamps only.

Why one module of ~560 lines: the heartbeat, long-poll loops and the one reconnect
supervisor share the link state (online, generation, budget) that decides when each may run;
the outbox sender already lives apart (:mod:`agent.channels.tellus.sender`).
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
from agent.channels.tellus.sender import (
    CDR_EXTENSION_FIELDS,
    DEAD_LETTER_ALARM_CODE,
    ENDPOINT_BACKOFF_CEILING_S,
    FORBIDDEN_PAUSE_S,
    OutboxSender,
    utc_iso,
)
from agent.channels.tellus.shaping import Backoff, ReconnectBudget, TokenBucket
from agent.utctime import now_iso
from hal.tasks import stop_tasks

__all__ = [
    "CDR_EXTENSION_FIELDS",
    "DEAD_LETTER_ALARM_CODE",
    "ENDPOINT_BACKOFF_CEILING_S",
    "ENDPOINT_BY_KIND",
    "FORBIDDEN_PAUSE_S",
    "SEND_ORDER",
    "Uplink",
    "UplinkStats",
    "utc_iso",
]

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
LONG_POLL_READ_MARGIN_S = 15.0
#: no success for this long after a failed request: probe the link with a heartbeat now
PROBE_AFTER_S = 5.0
HEARTBEAT_MIN_SPACING_S = 1.0


class OutboxLike(Protocol):
    async def put(self, kind: Any, payload: Any, *, key: str | None = None) -> int: ...
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
    #: the most recent dead letter: kind, key (record_id / command_id), reason, wall time
    last_dead_letter: dict[str, Any] | None = None
    last_error: str | None = None
    rate_limited: int = 0
    #: heartbeats tried (whatever the answer): the systemd watchdog's progress signal
    heartbeats_attempted: int = 0
    #: kind -> last transient failure of that endpoint while the link stayed up
    endpoint_errors: dict[str, str] = field(default_factory=dict)


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
        # +1/s: the heartbeat, kept at least HEARTBEAT_MIN_SPACING_S apart, outside the bucket
        if self.high.max_in_window(1.0) + 1 > HIGH_LIMIT_PER_S:
            raise ValueError(
                f"high_rate + high_burst must stay within {HIGH_LIMIT_PER_S - 1}/s "
                "(one request per second is the heartbeat's)"
            )
        if self.other.max_in_window(60.0) > OTHER_LIMIT_PER_MIN:
            raise ValueError(
                f"other_per_minute + other_burst must stay within {OTHER_LIMIT_PER_MIN}/min"
            )
        self.backoff = Backoff(rng=self.rng)
        self.sender = OutboxSender(self, SEND_ORDER, self.rng)
        self.budget = ReconnectBudget(clock=clock)
        #: clock times at which a reconnect was needed (F-0302 counts these)
        self._reconnects_wanted: deque[float] = deque()
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
        self._last_success: float | None = None
        self._failing_since_success: set[str] = set()
        self._last_heartbeat_at = -1e9

    # ------------------------------------------------------------------ lifecycle

    @property
    def online(self) -> bool:
        return self._online.is_set()

    # the surface the outbox sender uses (agent.channels.tellus.sender.SenderHost)

    @property
    def running(self) -> bool:
        return self._running

    async def wait_online(self) -> None:
        await self._online.wait()

    async def post(self, kind: str, body: Any, bucket: TokenBucket) -> ApiResult:
        return await self._call(
            "POST", ENDPOINT_BY_KIND[kind], endpoint=kind, body=body, retry_bucket=bucket
        )

    async def shape(self, bucket: TokenBucket) -> None:
        await self._shape(bucket)

    async def sleep_unless(self, wakes: list[Awaitable[Any]], seconds: float) -> None:
        await self._sleep_unless(wakes, seconds)

    def bucket_for(self, kind: str) -> TokenBucket:
        return self._bucket_for(kind)

    def mark_offline(self, reason: str) -> None:
        self._mark_offline(reason)

    def recover_credentials(self, result: ApiResult) -> None:
        self._recover_credentials(result)

    def reconnect_storm(self) -> bool:
        """F-0302: more than ``budget.limit`` reconnects wanted within ``budget.window``."""
        now = self.clock()
        while self._reconnects_wanted and now - self._reconnects_wanted[0] >= self.budget.window:
            self._reconnects_wanted.popleft()
        return len(self._reconnects_wanted) > self.budget.limit

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
            asyncio.create_task(self._guarded("sender", self.sender.run), name="uplink-sender"),
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
        in_flight = list(self.sender.in_flight.values())
        await stop_tasks(t for t in self._tasks + self._poll_tasks + in_flight if t is not current)
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

    def _note_success(self, endpoint: str) -> None:
        self._last_success = self.clock()
        self._failing_since_success.clear()
        self.stats.endpoint_errors.pop(endpoint, None)

    def _note_transient(self, endpoint: str, result: ApiResult) -> None:
        """One request failed transiently: decide whether that is the link or the request."""
        reason = result.describe()
        if result.link_error:
            self._mark_offline(reason)
            return
        self.stats.endpoint_errors[endpoint] = reason
        self._failing_since_success.add(endpoint)
        if endpoint == "heartbeat" and len(self._failing_since_success) >= 2:
            self._mark_offline(f"every request fails: {reason}")
            return
        if endpoint == "heartbeat" or not self.online:
            return  # the heartbeat is the probe; offline, the supervisor probes
        now = self.clock()
        if self._last_success is None or now - self._last_success >= PROBE_AFTER_S:
            self.heartbeat_soon()  # probe: does anything still get through?

    async def _supervisor(self) -> None:
        """The one reconnect path: wait while offline, retry within backoff and budget.

        The very first connection after :meth:`start` is not a reconnect; every later
        attempt is, and is counted in the budget before it is made.
        """
        while self._running:
            await self._offline.wait()
            if self._connected_once:
                self._reconnects_wanted.append(self.clock())
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
                self._failing_since_success.clear()
                self._mark_online()

    async def _wait_online(self) -> None:
        await self._online.wait()

    # ------------------------------------------------------------------ requests

    async def _call(
        self,
        method: str,
        path: str,
        *,
        endpoint: str,
        body: Any = None,
        params: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        retry_bucket: TokenBucket | None = None,
    ) -> ApiResult:
        """One authorised request with the documented 401 reaction (new token, retry once).

        Success and transient failures feed the link-health decision (see the module
        contract); ``endpoint`` names the request for that.
        """
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
                self._note_transient(endpoint, result)
            elif result.http_status is not None:
                self._note_success(endpoint)  # an answer from the platform: the link works
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
        # Not shaped by the telemetry bucket (never waits behind queued items): kept 1 s
        # apart, and held by a 429 pause of the class.
        wait = max(
            self.high.paused_for(),
            self._last_heartbeat_at + HEARTBEAT_MIN_SPACING_S - self.clock(),
        )
        if wait > 0:
            await self.sleep(wait)
        self._last_heartbeat_at = self.clock()
        result = await self._call("POST", "/device/heartbeat", endpoint="heartbeat", body=body)
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
            await self._sleep_unless([self._heartbeat_now.wait()], interval)
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

    async def _sleep_unless(self, wakes: list[Awaitable[Any]], seconds: float) -> None:
        """Sleep ``seconds`` with the injected ``sleep``, or less if one of ``wakes`` completes.

        Every wait goes through the injected clock: the outbox's own ``timeout`` would be
        measured on the real monotonic clock.
        """
        sleeper = asyncio.ensure_future(self.sleep(seconds))
        wakers = [asyncio.ensure_future(w) for w in wakes]
        try:
            await asyncio.wait({sleeper, *wakers}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (sleeper, *wakers):
                fut.cancel()
            await asyncio.gather(sleeper, *wakers, return_exceptions=True)

    async def _poll_loop(self, connector_id: int, generation: int) -> None:
        backoff = Backoff(rng=self.rng)
        channel = f"long_poll:{connector_id}"
        while self._running and generation == self._poll_generation:
            await self._wait_online()
            try:
                result = await self._call(
                    "GET",
                    "/device/commands",
                    endpoint=f"commands:{connector_id}",
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
            if result.kind == "rate_limited":
                await self.sleep(result.retry_after or backoff.next_delay())
            elif result.kind == "auth":
                self._recover_credentials(result)
            else:  # transient or anything else: this poll backs off, the rest keeps going
                log.warning("long_poll_failed", connector=connector_id, error=result.describe())
                if self.online:
                    await self.sleep(backoff.next_delay())
