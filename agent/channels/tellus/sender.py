"""The outbox half of the uplink: per-endpoint senders, refusals and dead letters.

Contract (see :mod:`agent.channels.tellus.uplink` for the whole channel):

* One :class:`OutboxSender` loop hands the next token to the most urgent *ready* kind;
  each kind then sends on its own task. A kind is ready when it has no request in flight
  (at most one: order within a kind is kept), its endpoint is not backing off and its
  class is not paused by a 429.
* A 5xx / ``9001`` / timeout backs off that endpoint only (``min(1 s * 2^n, 23 s)`` + 0-30 %
  jitter: a recovered endpoint is retried within 30 s); a 403 holds that endpoint 5 min;
  a 429 pauses the class for ``retry_after_seconds``, else the class's own backoff.
* ``ok`` (and ``4001`` for a charging record) acks the item. A permanent refusal
  dead-letters it -- after one more try without the extension fields for a charging
  record -- and queues an ``alarm`` event (code 303, F-0303) for a refused record,
  command status or firmware status.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog

from agent.utctime import now_iso

from agent.channels.tellus.auth import AuthError
from agent.channels.tellus.client import ApiResult
from agent.channels.tellus.shaping import Backoff, TokenBucket

log = structlog.get_logger("agent.channels.tellus.uplink")

#: Optional charging-record fields a strict server may refuse; the one retry drops them.
CDR_EXTENSION_FIELDS = ("stop_reason", "transaction_id", "direction")
#: ``fault_code`` of the alarm event raised for a dead-lettered item (project code F-0303).
DEAD_LETTER_ALARM_CODE = 303
#: no alarm for these: one about a refused event could be refused the same way, forever;
#: telemetry is not durable data (a refused sample is logged and counted)
NO_ALARM_KINDS = frozenset({"event", "telemetry"})
FORBIDDEN_PAUSE_S = 300.0
IDLE_RECHECK_S = 30.0  # the outbox wakes the sender on every put; this is only a safety net
ENDPOINT_BACKOFF_CEILING_S = 23.0


utc_iso = now_iso  # the heartbeat/report timestamp: whole seconds, UTC "Z"


def without_extensions(payload: dict[str, Any]) -> dict[str, Any] | None:
    """The charging record without its optional extension fields, or None if it had none."""
    if not any(k in payload for k in CDR_EXTENSION_FIELDS):
        return None
    return {k: v for k, v in payload.items() if k not in CDR_EXTENSION_FIELDS}


def item_key(item: Any) -> str | None:
    """What names an outbox item for an operator: its record or command id, else its key."""
    payload = item.payload if isinstance(item.payload, dict) else {}
    for name in ("record_id", "command_id"):
        if isinstance(payload.get(name), str):
            return str(payload[name])
    return getattr(item, "key", None)


def dead_letter_alarm(item: Any, key: str | None, reason: str, connector_ids: list[int]) -> dict[str, Any]:
    """The ``alarm`` event body naming a dead-lettered item."""
    payload = item.payload if isinstance(item.payload, dict) else {}
    connector = payload.get("connector_id")
    if not isinstance(connector, int) or isinstance(connector, bool) or connector < 1:
        connector = min(connector_ids) if connector_ids else 1
    label = item.kind.replace("_", " ")
    what = f"{label} {key}" if key else label
    return {
        "timestamp": utc_iso(),
        "event_type": "alarm",
        "connector_id": connector,
        "data": {
            "fault_code": DEAD_LETTER_ALARM_CODE,
            "fault_message": f"F-0303 {what} refused by the platform; kept on the charger",
            "details": {"fault_id": "F-0303", "kind": item.kind, "key": key, "reason": reason[:200]},
        },
    }


class SenderHost(Protocol):
    """What the sender needs of the :class:`~agent.channels.tellus.uplink.Uplink`."""

    outbox: Any
    stats: Any
    clock: Callable[[], float]
    sleep: Callable[[float], Awaitable[None]]
    connector_ids: list[int]
    high: TokenBucket
    other: TokenBucket

    @property
    def online(self) -> bool: ...
    @property
    def running(self) -> bool: ...
    async def wait_online(self) -> None: ...
    async def post(self, kind: str, body: Any, bucket: TokenBucket) -> ApiResult: ...
    async def shape(self, bucket: TokenBucket) -> None: ...
    async def sleep_unless(self, wakes: list[Awaitable[Any]], seconds: float) -> None: ...
    def bucket_for(self, kind: str) -> TokenBucket: ...
    def mark_offline(self, reason: str) -> None: ...
    def recover_credentials(self, result: ApiResult) -> None: ...


class OutboxSender:
    """Drains the outbox with per-endpoint isolation (see the module contract)."""

    def __init__(self, host: SenderHost, send_order: tuple[str, ...], rng: Any) -> None:
        self.host = host
        self.send_order = send_order
        self._class_backoff = {host.high: Backoff(rng=rng), host.other: Backoff(rng=rng)}
        self._kind_backoff = {
            kind: Backoff(ceiling=ENDPOINT_BACKOFF_CEILING_S, rng=rng) for kind in send_order
        }
        self._retry_at: dict[str, float] = {}
        self.in_flight: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()

    async def run(self) -> None:
        """Hand the next token to the most urgent ready kind; each kind sends on its own."""
        h = self.host
        while h.running:
            await h.wait_online()
            now = h.clock()
            waits = [
                at - now
                for kind, at in self._retry_at.items()
                if at > now and kind not in self.in_flight
            ]
            waits += [b.paused_for() for b in (h.high, h.other) if b.paused_for() > 0]
            kinds = [
                k
                for k in self.send_order
                if k not in self.in_flight
                and self._retry_at.get(k, 0.0) <= now
                and h.bucket_for(k).paused_for() <= 0
            ]
            items = await h.outbox.next_batch(1, kinds=kinds) if kinds else []
            if not items:
                wakes: list[Awaitable[Any]] = [self._wake.wait()]
                if kinds:
                    wakes.append(h.outbox.wait_for_items(kinds=kinds))
                await h.sleep_unless(wakes, min([IDLE_RECHECK_S, *waits]))
                self._wake.clear()
                continue
            item = items[0]
            bucket = h.bucket_for(item.kind)
            delay = bucket.delay()
            if delay > 0:
                await h.sleep(delay)
                continue  # choose again: something more urgent may have been queued meanwhile
            if not h.online:
                continue
            bucket.take()
            task = asyncio.create_task(self._send_guarded(item, bucket), name=f"uplink-send-{item.kind}")
            self.in_flight[item.kind] = task
            task.add_done_callback(functools.partial(self._send_done, item.kind))

    def _send_done(self, kind: str, task: asyncio.Task[None]) -> None:
        if self.in_flight.get(kind) is task:
            del self.in_flight[kind]
        self._wake.set()

    async def _send_guarded(self, item: Any, bucket: TokenBucket) -> None:
        h = self.host
        try:
            await self._send_item(item, bucket)
        except asyncio.CancelledError:
            raise
        except AuthError as exc:
            await h.outbox.nack(item.id, str(exc))
            h.mark_offline(str(exc))
        except Exception as exc:  # never lose the sender over one item
            h.stats.last_error = f"send {item.kind}: {type(exc).__name__}: {exc}"
            log.exception("uplink_send_error", kind=item.kind, item_id=item.id)
            self._retry_at[item.kind] = h.clock() + self._kind_backoff[item.kind].next_delay()

    async def _send_item(self, item: Any, bucket: TokenBucket) -> None:
        h = self.host
        result = await h.post(item.kind, item.payload, bucket)
        if result.kind == "permanent" and item.kind == "charging_record":
            stripped = without_extensions(item.payload)
            if stripped is not None:
                log.warning(
                    "charging_record_refused_retry_without_extensions",
                    item_id=item.id,
                    record_id=item.payload.get("record_id"),
                    error=result.describe(),
                )
                await h.shape(bucket)
                result = await h.post(item.kind, stripped, bucket)
        kind = result.kind
        backoff = self._class_backoff[bucket]
        kind_backoff = self._kind_backoff[item.kind]
        if kind == "ok" or (kind == "conflict" and item.kind == "charging_record"):
            await h.outbox.ack(item.id)
            backoff.reset()
            kind_backoff.reset()
            self._retry_at.pop(item.kind, None)
            h.stats.sent[item.kind] = h.stats.sent.get(item.kind, 0) + 1
        elif kind in ("permanent", "conflict") or (
            kind == "not_found" and item.kind == "command_status"
        ):
            await self._dead_letter(item, result.describe())
        elif kind == "rate_limited":
            h.stats.rate_limited += 1
            pause = result.retry_after or backoff.next_delay()
            log.warning("rate_limited", kind=item.kind, pause_s=round(pause, 1))
            bucket.pause(pause)
            await h.outbox.nack(item.id, result.describe())
        elif kind == "forbidden":
            log.error("upload_forbidden", kind=item.kind, error=result.describe())
            await h.outbox.nack(item.id, result.describe())
            self._retry_at[item.kind] = h.clock() + FORBIDDEN_PAUSE_S
        elif kind in ("auth", "not_found"):
            await h.outbox.nack(item.id, result.describe())
            h.recover_credentials(result)
        else:  # transient: this endpoint backs off; the others keep going
            await h.outbox.nack(item.id, result.describe())
            delay = kind_backoff.next_delay()
            self._retry_at[item.kind] = h.clock() + delay
            log.warning(
                "upload_retry", kind=item.kind, item_id=item.id, in_s=round(delay, 1),
                error=result.describe(),
            )

    async def _dead_letter(self, item: Any, reason: str) -> None:
        """Keep a permanently refused item in the dead-letter table, visibly."""
        h = self.host
        log.error("upload_rejected", kind=item.kind, item_id=item.id, error=reason)
        await h.outbox.dead_letter(item.id, reason)
        h.stats.dead_lettered += 1
        key = item_key(item)
        h.stats.last_dead_letter = {"kind": item.kind, "key": key, "reason": reason, "at": utc_iso()}
        if item.kind not in NO_ALARM_KINDS:
            await h.outbox.put("event", dead_letter_alarm(item, key, reason, h.connector_ids))
