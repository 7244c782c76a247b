"""OCPP's UpdateFirmware and GetDiagnostics through the agent's existing paths.

* UpdateFirmware -> the one :class:`agent.firmware.manager.FirmwareManager` (one upgrade at a
  time, whichever channel asked): the location must name a bundle built by
  ``tools/build-bundle`` (``.../charger-agent-<version>.bundle.tar.gz``, the version is read
  from the file name) with its ``.sig`` beside it; the manager downloads, verifies sha256 and
  the ed25519 signature, installs and restarts exactly as for the Tellus command. Its stages
  become FirmwareStatusNotification: Downloading, Downloaded, Installing, Installed (just
  before the restart), DownloadFailed / InstallationFailed.
* GetDiagnostics -> the ``fetch_logs`` log bundle (journal, audit log, session archives,
  redacted config) uploaded to the location (HTTP(S) PUT, same URL rules).
"""

from __future__ import annotations

import asyncio
import re
from datetime import datetime
from typing import Any, Callable

from agent.firmware.manager import FirmwareManager
from agent.firmware.params import FirmwareUpgradeParams

BUNDLE_NAME = re.compile(r"charger-agent-(?P<version>[A-Za-z0-9._+-]+?)\.bundle(\.tar\.gz)?$")
STAGES = {"downloading": "Downloading", "verifying": "Downloaded", "installing": "Installing", "restarting": "Installed"}


class FirmwareFailed(Exception):
    pass


def version_from_location(location: str) -> str:
    name = location.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    match = BUNDLE_NAME.search(name)
    if match is None:
        raise FirmwareFailed(f"location must name a charger-agent-<version>.bundle.tar.gz (got {name!r})")
    return match.group("version")


def firmware_installer(manager: FirmwareManager) -> Callable[[str, Callable[[str], None]], Any]:
    async def install(location: str, progress: Callable[[str], None]) -> None:
        try:
            params = FirmwareUpgradeParams(url=location, version=version_from_location(location))
        except (ValueError, FirmwareFailed) as exc:
            progress("DownloadFailed")
            raise FirmwareFailed(str(exc)) from None
        if manager.busy():
            progress("DownloadFailed")
            raise FirmwareFailed("another firmware upgrade is in progress")
        command_id = f"ocpp-fw-{int(datetime.now().timestamp())}"
        task = asyncio.create_task(manager.run(params, command_id), name=command_id)
        last = None
        stage = "downloading"
        while not task.done():
            pending = manager._pending  # the manager's durable record of the running upgrade
            stage = str(pending.get("stage")) if isinstance(pending, dict) else stage
            status = STAGES.get(stage)
            if status is not None and status != last:
                progress(status)
                last = status
            await asyncio.sleep(0.2)
        await task
        if stage != "restarting":
            progress("DownloadFailed" if stage in ("downloading", "verifying") else "InstallationFailed")
            raise FirmwareFailed(f"firmware upgrade failed while {stage}")

    return install


def diagnostics_uploader(fetch_logs: Callable[[Any, Callable[[int], None]], Any]) -> Callable[[str, str | None, str | None], Any]:
    """``fetch_logs(params, progress)`` is the runtime's log-bundle service."""

    async def upload(location: str, start: str | None, stop: str | None) -> str:
        from agent.maintenance.logbundle import FetchLogsParams

        params = FetchLogsParams.model_validate({"upload_url": location, "since": start, "until": stop})
        details = await fetch_logs(params, lambda _p: None)
        return str(details.get("file_name") or details.get("name") or "diagnostics.tar.gz")

    return upload
