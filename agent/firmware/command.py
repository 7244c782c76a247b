"""The ``firmware_upgrade`` command spec for the dispatcher.

Device scope, risk ``low`` on purpose: the dispatcher's medium-risk rule would *reject*
it during a session, while the spec asks to *defer* the install until idle -- the
:class:`~agent.firmware.manager.FirmwareManager` does that (and still downloads and
verifies meanwhile). The manager reports ``accepted`` itself, then keeps both channels
in step until ``completed``/``failed``.
"""

from __future__ import annotations

from agent.commands.dispatcher import CommandContext, CommandSpec
from agent.charging.connector import Rejected
from agent.firmware.manager import FirmwareManager, FirmwareRejected
from agent.firmware.params import FirmwareUpgradeParams


def firmware_command_spec(manager: FirmwareManager) -> CommandSpec:
    async def firmware_upgrade(ctx: CommandContext) -> None:
        params: FirmwareUpgradeParams = ctx.params
        try:
            expiry = ctx.expiry.timestamp() if ctx.expiry is not None else None
            manager.submit(ctx.command_id, params, expiry=expiry)
        except FirmwareRejected as exc:
            raise Rejected(str(exc)) from None

    return CommandSpec("firmware_upgrade", FirmwareUpgradeParams, "device", firmware_upgrade, "low")
