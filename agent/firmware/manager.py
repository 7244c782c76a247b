"""``firmware_upgrade`` end to end, with both report channels kept in step.

Sequence (platform-api §8.3/§8.6). Firmware status (outbox ``firmware_status``, target
version) / command status (reporter):

==========================================  ===============================================
``downloading`` 0, 10, ... 100 % (*)        ``accepted`` "downloading firmware X"
(verify: sha256, then ed25519, then the manifest's hashes; a failure ends here)
``downloading`` 100 "verified; scheduled    ``accepted`` "... scheduled for T" (``install_at``)
for T" / "... deferred: charging session    ``accepted`` "... deferred: charging session active"
active"                                     (``details.deferred = true``)
``upgrading`` "installing X (app_ab)"       ``accepted`` "installing X"
``upgrading`` "restarting into X"           ``accepted`` "restarting into X"
-- restart: the NEW version runs :meth:`FirmwareManager.after_start` --
``success`` 100 "X running and online"      ``completed`` (details: version, previous_version,
                                            installer)
``failed`` "<reason>"                       ``failed`` "<reason>" (any step; after a rollback
                                            the OLD version reports it once it runs again)
==========================================  ===============================================

(*) every 10 %, but at most one progress report per ``progress_interval_s`` (2 s): a
download that finishes in a second reports 0 and 100 only.

Each ``accepted`` with a new message is its own command-status report (the ledger
de-duplicates identical repeats only): at most five per upgrade, within the 60/min budget.

Nothing is installed while a charging session runs: the install waits (the download
does not) until no connector is in a session, then takes every connector out of service
(``hold_charging``) for the install and the restart, re-checking that no session started
in between.

Persistence: the KV key :data:`PENDING_KEY` holds the pending upgrade (command id,
versions, stage, installer, release, deadline, reason) from ``accepted`` until the
final report. After a restart :meth:`after_start` reads it:

* running version == target and the stage is ``installing``/``restarting``: the health
  gate. Healthy = ``is_healthy()`` (the runtime passes "a heartbeat succeeded since
  start", i.e. online with a fresh token) before the deadline -> ``mark_good``, report
  ``success``/``completed``. Otherwise the reason is stored, the installer rolls back
  and the agent restarts into the old version;
* running version != target: the new version was rolled back (by itself or by the boot
  gate, :mod:`agent.firmware.boot`) or never started -> ``failed`` with the recorded
  reason, the failed release is removed;
* any earlier stage: the agent stopped before installing -> ``failed`` "interrupted".
  The partial download is kept, so a new command for the same file resumes it.

Why one module of ~510 lines: the upgrade state machine (download, verify, hold, install,
health gate, rollback) persists one record through every step.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

import structlog

from agent.firmware.boot import EXIT_UPGRADE_RESTART
from agent.firmware.config import FirmwareConfig
from agent.firmware.params import FirmwareUpgradeParams
from agent.utctime import to_iso

if TYPE_CHECKING:
    from agent.firmware.bundle import Bundle
    from agent.firmware.installers import InstallOutcome, Installer

# The bundle, download and installer modules (tarfile, the release builder) are imported
# where an upgrade needs them: most agent processes never run one (resident memory).

log = structlog.get_logger(__name__)

PENDING_KEY = "firmware_upgrade"
#: the version the last successful upgrade installed (the charger firmware version from then on)
INSTALLED_KEY = "firmware_installed_version"
__all__ = ["EXIT_UPGRADE_RESTART", "PENDING_KEY", "FirmwareManager", "FirmwareRejected"]
ACTIVE_STAGES = ("installing", "restarting")


class FirmwareRejected(Exception):
    """The command cannot be started (report ``rejected`` with this message)."""


class KVLike(Protocol):
    async def get(self, key: str, default: Any = None) -> Any: ...
    async def set(self, key: str, value: Any) -> None: ...
    async def delete(self, key: str) -> bool: ...


class OutboxLike(Protocol):
    async def put(self, kind: Any, payload: Any, *, key: str | None = None) -> int: ...


CommandStatus = Callable[[str, str, "str | None", "dict[str, Any] | None"], None]


class FirmwareManager:
    """Runs one upgrade at a time. Create once per agent process.

    ``any_session()`` -- True while any connector is in a session;
    ``request_restart(kind)`` -- ``"agent"``: stop and exit with
    :data:`EXIT_UPGRADE_RESTART`; ``"system"``: stop and reboot the controller;
    ``hold_charging(reason)`` -- take every connector out of service (``reason``) or
    back (``None``); returns False (holding nothing) when a session prevented it.
    """

    def __init__(
        self,
        config: FirmwareConfig,
        *,
        state_dir: Path,
        kv: KVLike,
        outbox: OutboxLike,
        command_status: CommandStatus,
        running_version: str,
        any_session: Callable[[], bool],
        request_restart: Callable[[str], Awaitable[None]],
        hold_charging: Callable[[str | None], Awaitable[bool]] | None = None,
        installers: dict[str, Installer] | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        poll_s: float = 1.0,
        download_backoff_s: float = 1.0,
        progress_interval_s: float = 2.0,
    ) -> None:
        self.cfg = config
        self.state_dir = Path(state_dir)
        self.kv = kv
        self.outbox = outbox
        self.command_status = command_status
        self.running_version = running_version
        self.any_session = any_session
        self.request_restart = request_restart
        self.hold_charging = hold_charging
        self.clock = clock
        self.sleep = sleep
        self.poll_s = poll_s
        self.download_backoff_s = download_backoff_s
        self.progress_interval_s = progress_interval_s
        self.download_dir = Path(config.download_dir) if config.download_dir else self.state_dir / "firmware"
        self._installers: dict[str, Installer] | None = installers or None
        self._task: asyncio.Task[None] | None = None
        self._pending: dict[str, Any] | None = None
        self._gate_running = False
        self._holding = False
        #: set by :meth:`load` and by a successful upgrade (None: never upgraded here)
        self.installed_version: str | None = None

    @property
    def installers(self) -> dict[str, Installer]:
        """The installers by name: those given, else ``app_ab`` and ``rauc`` built on first use."""
        if self._installers is None:
            from agent.firmware.installers import default_installers

            self._installers = default_installers(self.cfg, self.state_dir, clock=self.clock)
        return self._installers

    # ------------------------------------------------------------------ queries

    async def load(self) -> dict[str, Any] | None:
        """Read the pending upgrade record (call before interrupted commands are closed)."""
        record = await self.kv.get(PENDING_KEY)
        self._pending = record if isinstance(record, dict) and record.get("command_id") else None
        installed = await self.kv.get(INSTALLED_KEY)
        self.installed_version = installed if isinstance(installed, str) and installed else None
        return self._pending

    def alive_command_ids(self) -> set[str]:
        """Command ids this manager will still finish (spare them when closing interrupted commands)."""
        return {str(self._pending["command_id"])} if self._pending else set()

    def busy(self) -> bool:
        return (self._task is not None and not self._task.done()) or self._gate_running or self._pending is not None

    # ------------------------------------------------------------------ command entry

    def submit(
        self, command_id: str, params: FirmwareUpgradeParams, *, expiry: float | None = None
    ) -> asyncio.Task[None]:
        """Start the upgrade in the background (reports ``accepted`` at once).

        ``expiry`` (Unix time, the command's): checked again when the installation actually
        starts after a deferral; passed by then, the command ends ``rejected`` "expired"
        and nothing is installed.

        Raises :class:`FirmwareRejected` when it cannot start (no key configured, another
        upgrade in progress).
        """
        if not self.cfg.public_key:
            raise FirmwareRejected("firmware_upgrade: no [firmware] public_key configured, updates cannot be verified")
        if self.busy():
            other = (self._pending or {}).get("version") or "another version"
            raise FirmwareRejected(f"firmware_upgrade: an upgrade to {other} is already in progress")
        self.command_status(command_id, "accepted", f"downloading firmware {params.version}", None)
        self._task = asyncio.create_task(
            self.run(params, command_id, accepted=True, expiry=expiry), name=f"firmware-{command_id}"
        )
        return self._task

    async def run(
        self,
        params: FirmwareUpgradeParams,
        command_id: str,
        *,
        accepted: bool = False,
        expiry: float | None = None,
    ) -> None:
        """The whole upgrade up to the restart. Never raises (except cancellation)."""
        from agent.firmware.bundle import BundleError
        from agent.firmware.download import DownloadError
        from agent.firmware.installers import InstallError, choose_installer

        version = params.version
        record: dict[str, Any] = {
            "command_id": command_id,
            "version": version,
            "from_version": self.running_version,
            "stage": "downloading",
            "started_at": self.clock(),
        }
        if expiry is not None:
            record["expiry"] = expiry
        try:
            if version == self.running_version:
                await self._fw(version, "success", 100, f"version {version} is already running")
                self.command_status(command_id, "completed", f"version {version} is already running", {"version": version})
                return
            if not accepted:
                self.command_status(command_id, "accepted", f"downloading firmware {version}", None)
            self._pending = record
            await self.kv.set(PENDING_KEY, record)
            bundle_file = await self._download(params)
            record["stage"] = "verifying"
            await self.kv.set(PENDING_KEY, record)
            bundle = await self._verify(params, bundle_file)
            available = {name: await inst.available() for name, inst in self.installers.items()}
            installer_name = choose_installer(self.cfg.installer, bundle.manifest.kind, available)
            installer = self.installers[installer_name]
            record["installer"] = installer_name
            await self._wait_install_at(params, record)
            await self._wait_idle(record)
            if record.get("expiry") is not None and float(record["expiry"]) <= self.clock():
                await self._expired(record)
                return
            record["stage"] = "installing"
            await self.kv.set(PENDING_KEY, record)
            await self._fw(version, "upgrading", None, f"installing {version} ({installer_name})")
            self.command_status(command_id, "accepted", f"installing {version}", {"installer": installer_name})
            outcome = await installer.install(bundle)
            record["release"] = outcome.release
            try:
                await self._after_switch(record, outcome, installer_name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # switched but cannot go on: switch back before reporting
                reason = f"after installing: {type(exc).__name__}: {exc}"
                log.exception("firmware_after_switch_failed", version=version)
                await installer.rollback(record, reason)
                await installer.discard(record)
                raise InstallError(reason) from None
        except asyncio.CancelledError:
            await self._release_hold()
            raise
        except (DownloadError, BundleError, InstallError, OSError) as exc:
            await self._release_hold()
            reason = str(exc) if not isinstance(exc, DownloadError) else f"download failed: {exc}"
            if isinstance(exc, OSError) and not isinstance(exc, InstallError):
                reason = f"{type(exc).__name__}: {exc}"
            await self._fail(record, reason)
        except Exception as exc:  # a bug must still end the command
            log.exception("firmware_upgrade_error", command_id=command_id)
            await self._release_hold()
            await self._fail(record, f"internal error: {type(exc).__name__}: {exc}")

    async def _after_switch(self, record: dict[str, Any], outcome: InstallOutcome, installer_name: str) -> None:
        """Record the switch durably, report it, restart into the new version."""
        version = str(record["version"])
        record.update(
            stage="restarting",
            release=outcome.release,
            previous=outcome.previous,
            restart=outcome.restart,
            deadline=self.clock() + self.cfg.health_timeout_s,
            health_timeout_s=self.cfg.health_timeout_s,
            installed_at=self.clock(),
        )
        await self.kv.set(PENDING_KEY, record)
        await self._fw(version, "upgrading", None, f"installed; restarting into {version}")
        self.command_status(str(record["command_id"]), "accepted", f"restarting into {version}", {"installer": installer_name})
        log.warning("firmware_restart", version=version, restart=outcome.restart)
        await self.request_restart(outcome.restart)

    # ------------------------------------------------------------------ steps

    async def _fw(self, version: str, status: str, progress: int | None, message: str | None) -> None:
        body: dict[str, Any] = {"firmware_version": version, "status": status}
        if progress is not None:
            body["progress"] = int(progress)
        if message:
            body["message"] = message[:500]
        await self.outbox.put("firmware_status", body)

    async def _download(self, params: FirmwareUpgradeParams) -> Path:
        from agent.firmware.download import download

        version = params.version
        await self._fw(version, "downloading", 0, "Downloading...")

        last = [self.clock()]

        async def progress(percent: int) -> None:
            # every 10 % (the downloader's step), but not faster than progress_interval_s: a
            # fast download would otherwise queue ten reports in the shared 60/min budget
            now = self.clock()
            if percent == 100 or (percent > 0 and now - last[0] >= self.progress_interval_s):
                last[0] = now
                await self._fw(version, "downloading", percent, "Downloading...")

        dest = self.download_dir / f"charger-agent-{version}.bundle"
        return await download(
            params.url,
            dest,
            max_bytes=self.cfg.max_bundle_bytes,
            progress=progress,
            ca_file=self.cfg.ca_file,
            attempts=self.cfg.download_attempts,
            read_timeout_s=self.cfg.download_read_timeout_s,
            backoff_s=self.download_backoff_s,
            sleep=self.sleep,
        )

    async def _verify(self, params: FirmwareUpgradeParams, path: Path) -> Bundle:
        """sha256 (when given), then the signature, then the manifest: nothing else runs before."""
        from agent.firmware.bundle import BundleError, check_checksum, load_public_key, open_bundle, verify_signature
        from agent.firmware.download import DownloadError, fetch_small, redact, sibling_url

        try:
            if params.checksum:
                await asyncio.to_thread(check_checksum, path, params.checksum)
            signature = params.signature
            if signature is None:
                try:
                    signature = await fetch_small(sibling_url(params.url, ".sig"), ca_file=self.cfg.ca_file)
                except DownloadError as exc:
                    raise BundleError(
                        f"no signature: params.signature is missing and {redact(params.url)}.sig could not be fetched ({exc})"
                    ) from None
            assert self.cfg.public_key is not None
            key = load_public_key(self.cfg.public_key)
            await asyncio.to_thread(verify_signature, path, signature, key)
            extract = self.download_dir / f"bundle-{params.version}"
            bundle = await asyncio.to_thread(open_bundle, path, extract, max_bytes=self.cfg.max_bundle_bytes)
            if bundle.manifest.version != params.version:
                raise BundleError(
                    f"bundle is version {bundle.manifest.version}, the command asked for {params.version}"
                )
            return bundle
        except BundleError:
            for leftover in (path, self.download_dir / f"bundle-{params.version}"):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
            raise

    async def _wait_install_at(self, params: FirmwareUpgradeParams, record: dict[str, Any]) -> None:
        if params.install_at is None:
            return
        at = params.install_at.timestamp()
        if at <= self.clock():
            return
        when = to_iso(at)
        record["stage"] = "scheduled"
        await self.kv.set(PENDING_KEY, record)
        await self._fw(params.version, "downloading", 100, f"verified; installation scheduled for {when}")
        self.command_status(record["command_id"], "accepted", f"verified; installation scheduled for {when}", {"install_at": when})
        while (left := at - self.clock()) > 0:
            await self.sleep(min(left, 60.0))

    async def _wait_idle(self, record: dict[str, Any]) -> None:
        """Return with no session running and (when possible) charging held off."""
        reported = False
        while True:
            if not self.any_session():
                if self.hold_charging is None:
                    return
                if await self.hold_charging("firmware_upgrade"):
                    if not self.any_session():
                        self._holding = True
                        return
                    await self.hold_charging(None)
            if not reported:
                reported = True
                message = "verified; installation deferred until no charging session is active"
                record["stage"] = "deferred"
                await self.kv.set(PENDING_KEY, record)
                log.info("firmware_install_deferred", version=record["version"], reason="session_active")
                await self._fw(record["version"], "downloading", 100, message)
                self.command_status(
                    record["command_id"], "accepted", "installation deferred: a charging session is active",
                    {"deferred": True, "reason": "session_active"},
                )
            await self.sleep(self.poll_s)

    async def _release_hold(self) -> None:
        if self._holding and self.hold_charging is not None:
            self._holding = False
            try:
                await self.hold_charging(None)
            except Exception:
                log.exception("firmware_release_hold_failed")

    async def _expired(self, record: dict[str, Any]) -> None:
        """The command's ``expiry`` passed while the installation waited: do not start it."""
        version = str(record.get("version", "?"))
        log.warning("firmware_install_expired", version=version, command_id=record.get("command_id"))
        await self._release_hold()
        await self._fw(version, "failed", None, "expired before the installation could start")
        self.command_status(str(record["command_id"]), "rejected", "expired", {"version": version, "deferred": True})
        await self.kv.delete(PENDING_KEY)
        self._pending = None
        self._cleanup_downloads(version)

    async def _fail(self, record: dict[str, Any], reason: str) -> None:
        version = str(record.get("version", "?"))
        log.error("firmware_upgrade_failed", version=version, reason=reason, command_id=record.get("command_id"))
        await self._fw(version, "failed", None, reason)
        self.command_status(
            str(record["command_id"]),
            "failed",
            reason,
            {"version": version, "running_version": self.running_version},
        )
        await self.kv.delete(PENDING_KEY)
        self._pending = None
        self._cleanup_downloads(version)

    def _cleanup_downloads(self, version: str) -> None:
        """Remove a finished version's bundle and extraction (a ``.part`` stays for resuming)."""
        shutil.rmtree(self.download_dir / f"bundle-{version}", ignore_errors=True)
        (self.download_dir / f"charger-agent-{version}.bundle").unlink(missing_ok=True)

    # ------------------------------------------------------------------ after a restart

    async def after_start(self, is_healthy: Callable[[], bool]) -> None:
        """Finish a pending upgrade in the freshly started process (run as a background task)."""
        record = await self.load()
        if record is None:
            return
        version = str(record.get("version"))
        stage = str(record.get("stage"))
        installer = self.installers.get(str(record.get("installer") or "app_ab"))
        if stage not in ACTIVE_STAGES and stage != "rolled_back":
            await self._fail(record, f"interrupted by an agent restart while {stage}; {self.running_version} is still running")
            return
        if installer is None:
            await self._fail(record, f"unknown installer {record.get('installer')!r} in the pending upgrade record")
            return
        if self.running_version == version and stage in ACTIVE_STAGES:
            self._gate_running = True
            try:
                await self._gate(record, installer, is_healthy)
            finally:
                self._gate_running = False
            return
        # the old version runs again: the new one was rolled back, or never took over
        recorded = await installer.discard(record)
        reason = record.get("reason") or recorded
        if not reason:
            reason = (
                "installation interrupted by an agent restart"
                if stage == "installing"
                else f"version {version} did not start"
            )
        await self._fail(record, f"{reason}; {self.running_version} is running")

    async def _gate(self, record: dict[str, Any], installer: Installer, is_healthy: Callable[[], bool]) -> None:
        version = str(record["version"])
        timeout = float(record.get("health_timeout_s") or self.cfg.health_timeout_s)
        deadline = float(record.get("deadline") or (self.clock() + timeout))
        log.info("firmware_health_gate", version=version, seconds_left=round(deadline - self.clock(), 1))
        while not is_healthy():
            if self.clock() >= deadline:
                why = (
                    f"version {version} did not become healthy (no successful heartbeat) "
                    f"within {timeout:.0f} s"
                )
                previous = record.get("previous") or record.get("from_version")
                record.update(stage="rolled_back", reason=f"{why}; rolled back to {previous}")
                await self.kv.set(PENDING_KEY, record)
                log.error("firmware_rollback", version=version, reason=why)
                if await installer.rollback(record, why):
                    await self.request_restart(str(record.get("restart") or "agent"))
                else:
                    await self._fail(record, f"{why}; rollback to {previous} impossible")
                return
            await self.sleep(min(self.poll_s, max(0.0, deadline - self.clock())))
        await installer.mark_good(record)
        await self.kv.set(INSTALLED_KEY, version)
        self.installed_version = version
        previous = record.get("previous") or record.get("from_version")
        await self._fw(version, "success", 100, f"version {version} running and online")
        self.command_status(
            str(record["command_id"]),
            "completed",
            f"firmware {version} installed and running",
            {"version": version, "previous_version": previous, "installer": record.get("installer")},
        )
        await self.kv.delete(PENDING_KEY)
        self._pending = None
        self._cleanup_downloads(version)
        log.warning("firmware_upgrade_succeeded", version=version, previous=previous)
