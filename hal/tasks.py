"""Bounded stop of background tasks: the one cancel-and-await used by every device and service.

Contract
--------
:func:`stop_task` cancels a task and waits until it has ended, but never longer than
``attempts * wait_s`` seconds: a task that swallows its cancellation (a library that catches
``CancelledError`` inside a retry loop) is cancelled again up to ``attempts`` times and then
left behind with an error log (``task.did_not_stop``), so a stuck task cannot hang a stop.

* The task's own outcome never escapes: a task that ended with an exception is logged
  (``task.failed``; not with ``report_failures=False``, for a caller that has already
  looked at the outcome) and the stop still succeeds. Only the *caller's* cancellation propagates
  (unlike ``with suppress(CancelledError): await task``, which would swallow it).
* The calling task itself is never cancelled (a loop stopping its own owner is skipped).
* ``None`` and finished tasks are accepted (idempotent stops).

Lives in ``hal`` so that drivers can use it; the agent imports it from here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, Final

import structlog

log = structlog.get_logger(__name__)

#: How often a task that ignores its cancellation is cancelled again.
STOP_CANCEL_ATTEMPTS: Final = 3
#: How long each cancellation is given to take effect, in seconds.
STOP_WAIT_S: Final = 2.0


async def stop_task(
    task: asyncio.Future[Any] | None,
    *,
    attempts: int = STOP_CANCEL_ATTEMPTS,
    wait_s: float = STOP_WAIT_S,
    report_failures: bool = True,
) -> bool:
    """Cancel ``task`` and wait (bounded) until it ended; True when it did.

    Returns True also for ``None``, an already finished task and the calling task (which is
    not touched). False means the task is still running after ``attempts`` cancellations.
    """
    return await stop_tasks(
        () if task is None else (task,),
        attempts=attempts,
        wait_s=wait_s,
        report_failures=report_failures,
    )


async def stop_tasks(
    tasks: Iterable[asyncio.Future[Any] | None],
    *,
    attempts: int = STOP_CANCEL_ATTEMPTS,
    wait_s: float = STOP_WAIT_S,
    report_failures: bool = True,
) -> bool:
    """:func:`stop_task` for several tasks at once (cancelled together, one shared bound)."""
    current = asyncio.current_task()
    pending = {t for t in tasks if t is not None and t is not current}
    ended = [t for t in pending if t.done()]
    pending.difference_update(ended)
    for _ in range(max(1, attempts)):
        if not pending:
            break
        for task in pending:
            task.cancel()
        done, pending = await asyncio.wait(pending, timeout=wait_s)
        ended.extend(done)
    for task in pending:
        name = task.get_name() if isinstance(task, asyncio.Task) else repr(task)
        log.error("task.did_not_stop", task=name, waited_s=max(1, attempts) * wait_s)
    for task in ended if report_failures else ():
        if not task.cancelled() and task.exception() is not None:
            name = task.get_name() if isinstance(task, asyncio.Task) else repr(task)
            log.error("task.failed", task=name, error=repr(task.exception()))
    return not pending
