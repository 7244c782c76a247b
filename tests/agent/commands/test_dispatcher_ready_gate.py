"""The dispatcher waits for ``ready`` (a soft reset in progress) before it handles a command."""

from __future__ import annotations

import asyncio
from typing import Any

from agent.commands.dispatcher import CommandContext, CommandSpec, Dispatcher
from agent.commands.params import NoParams
from agent.store import Store


class Sink:
    def __init__(self) -> None:
        self.reported: list[tuple[str, str]] = []

    def command_status(self, command_id: str, status: str, message: str | None = None, details: Any = None) -> None:
        self.reported.append((command_id, status))


async def test_a_command_arriving_during_a_rebuild_runs_only_once_ready(store: Store) -> None:
    ready = asyncio.Event()
    seen_during_rebuild: list[bool] = []

    async def run(ctx: CommandContext) -> None:
        seen_during_rebuild.append(not ready.is_set())
        ctx.completed()

    spec = CommandSpec(name="ping", params=NoParams, scope="device", run=run)
    sink = Sink()
    dispatcher = Dispatcher(store.ledger, sink, {}, {"ping": spec}, ready=ready.wait)
    delivery = asyncio.create_task(dispatcher.deliver({"command_id": "c-1", "command": "ping"}, "heartbeat", None))
    await asyncio.sleep(0.1)
    assert not delivery.done() and sink.reported == []  # held while the stack is rebuilt
    ready.set()
    await asyncio.wait_for(delivery, 5)
    assert sink.reported == [("c-1", "completed")]
    assert seen_during_rebuild == [False]
