"""UpdateFirmware through the one firmware manager, GetDiagnostics through the log bundle."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent.channels.ocpp.services import FirmwareFailed, diagnostics_uploader, firmware_installer, version_from_location


def test_version_from_location() -> None:
    assert version_from_location("https://fw.example.com/dist/charger-agent-0.2.0.bundle.tar.gz") == "0.2.0"
    assert version_from_location("https://fw.example.com/charger-agent-1.4.0-rc1.bundle.tar.gz?sig=abc") == "1.4.0-rc1"
    with pytest.raises(FirmwareFailed):
        version_from_location("https://fw.example.com/firmware.bin")


class FakeManager:
    def __init__(self, stages: list[str], busy: bool = False) -> None:
        self.stages = stages
        self._busy = busy
        self._pending: dict[str, Any] | None = None
        self.params: Any = None

    def busy(self) -> bool:
        return self._busy

    async def run(self, params: Any, command_id: str) -> None:
        self.params = params
        for stage in self.stages:
            self._pending = {"stage": stage, "command_id": command_id}
            await asyncio.sleep(0.3)
        self._pending = None


async def test_firmware_stages_become_firmware_status_notifications() -> None:
    manager = FakeManager(["downloading", "verifying", "installing", "restarting"])
    seen: list[str] = []
    await firmware_installer(manager)("https://fw.example.com/charger-agent-0.2.0.bundle.tar.gz", seen.append)  # type: ignore[arg-type]
    assert seen == ["Downloading", "Downloaded", "Installing", "Installed"]
    assert manager.params.version == "0.2.0" and manager.params.url.endswith(".bundle.tar.gz")


async def test_firmware_failures() -> None:
    seen: list[str] = []
    with pytest.raises(FirmwareFailed):
        await firmware_installer(FakeManager(["downloading"]))("https://fw.example.com/charger-agent-0.2.0.bundle.tar.gz", seen.append)  # type: ignore[arg-type]
    assert seen[-1] == "DownloadFailed"
    seen.clear()
    with pytest.raises(FirmwareFailed):
        await firmware_installer(FakeManager(["downloading", "verifying", "installing"]))("https://fw.example.com/charger-agent-0.2.0.bundle.tar.gz", seen.append)  # type: ignore[arg-type]
    assert seen[-1] == "InstallationFailed"
    seen.clear()
    with pytest.raises(FirmwareFailed):  # one upgrade at a time, whichever channel asked
        await firmware_installer(FakeManager([], busy=True))("https://fw.example.com/charger-agent-0.2.0.bundle.tar.gz", seen.append)  # type: ignore[arg-type]
    assert seen == ["DownloadFailed"]
    seen.clear()
    with pytest.raises(FirmwareFailed):  # plain http to a remote host is refused like for the platform command
        await firmware_installer(FakeManager([]))("http://fw.example.com/charger-agent-0.2.0.bundle.tar.gz", seen.append)  # type: ignore[arg-type]
    assert seen == ["DownloadFailed"]


async def test_diagnostics_go_through_fetch_logs() -> None:
    calls: list[Any] = []

    async def fetch_logs(params: Any, progress: Any) -> dict[str, Any]:
        calls.append(params)
        return {"file_name": "bundle.tar.gz"}

    name = await diagnostics_uploader(fetch_logs)("https://logs.example.com/upload", "2026-01-01T00:00:00Z", None)
    assert name == "bundle.tar.gz"
    assert calls[0].upload_url == "https://logs.example.com/upload" and calls[0].since is not None and calls[0].until is not None
