"""hal.tasks.stop_task: cancel-and-await, bounded against a swallowed cancellation."""

from __future__ import annotations

import asyncio

import pytest
import structlog.testing

from hal.tasks import stop_task, stop_tasks


async def _forever() -> None:
    await asyncio.sleep(3600)


async def _stubborn(release: asyncio.Event) -> None:
    """Swallows every cancellation until ``release`` is set."""
    while not release.is_set():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            continue


async def test_stop_task_cancels_and_waits() -> None:
    task = asyncio.create_task(_forever())
    await asyncio.sleep(0)
    assert await stop_task(task) is True
    assert task.cancelled()


async def test_none_and_finished_tasks_are_accepted() -> None:
    done = asyncio.create_task(asyncio.sleep(0))
    await done
    assert await stop_task(None) is True
    assert await stop_task(done) is True
    assert await stop_tasks([None, done]) is True


async def test_swallowed_cancellation_does_not_hang_the_stop() -> None:
    release = asyncio.Event()
    task = asyncio.create_task(_stubborn(release))
    await asyncio.sleep(0)
    assert await stop_task(task, attempts=2, wait_s=0.05) is False
    assert not task.done()
    release.set()
    task.cancel()
    await asyncio.wait({task}, timeout=1.0)
    assert task.done()


async def test_a_failed_task_does_not_raise_from_stop() -> None:
    async def boom() -> None:
        raise RuntimeError("bug")

    task = asyncio.create_task(boom())
    await asyncio.sleep(0)
    assert await stop_task(task) is True
    assert isinstance(task.exception(), RuntimeError)


async def test_failures_are_logged_unless_the_caller_handled_them() -> None:
    async def boom() -> None:
        raise RuntimeError("bug")

    for report, expected in ((True, ["task.failed"]), (False, [])):
        task = asyncio.create_task(boom(), name="boom")
        await asyncio.sleep(0)
        with structlog.testing.capture_logs() as logs:
            assert await stop_task(task, report_failures=report) is True
        assert [e["event"] for e in logs] == expected, report


async def test_the_calling_task_is_not_cancelled() -> None:
    other = asyncio.create_task(_forever())
    await asyncio.sleep(0)
    me = asyncio.current_task()
    assert await stop_tasks([me, other]) is True
    assert other.cancelled()


async def test_the_callers_cancellation_propagates() -> None:
    release = asyncio.Event()
    stubborn = asyncio.create_task(_stubborn(release))
    await asyncio.sleep(0)
    stopper = asyncio.create_task(stop_task(stubborn, attempts=100, wait_s=10.0))
    await asyncio.sleep(0.01)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    release.set()
    stubborn.cancel()
    await asyncio.wait({stubborn}, timeout=1.0)
