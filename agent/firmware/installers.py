"""Pluggable installers: RAUC when the controller has it, else application-level A/B.

Both implement :class:`Installer`; the :class:`~agent.firmware.manager.FirmwareManager`
picks one per bundle (:func:`choose_installer`) and stores its name in the pending
upgrade record, so the *new* version confirms or rolls back with the same installer.

Size: just above ~500 lines because both installers, their subprocess runner and the
release builder's dependency closure are one job (installing a verified bundle).

:class:`AppAbInstaller` (``releases/<version>/`` venvs, ``current``/``stable`` links,
see :mod:`agent.firmware.boot`):

1. builds the new release beside the running one (:class:`VenvReleaseBuilder`):

   * ``python -m venv --without-pip releases/<version>`` with the running interpreter
     (``--system-site-packages`` when the running venv has it);
   * dependencies are copied, **offline**, from the running release: the closure of
     the new wheel's ``Requires-Dist`` (plus ``pip`` itself, so the new release can
     upgrade again) is resolved against the running environment's installed
     distributions and each one's files are copied by its ``RECORD``;
   * ``python -m pip install --no-index --find-links <bundle deps/> [--find-links
     <[firmware] wheelhouse>] <wheel>``: a dependency the running release does not have
     (or has in a version the new wheel does not accept) must come with the bundle
     (``tools/build-bundle --deps-dir``) or the wheelhouse, never from the network;
   * ``pip check`` and a smoke test -- ``bin/charger-agent --version`` must print the
     new version and ``python -c "import agent.runtime"`` must succeed -- *before*
     anything is switched;

2. arms the boot gate (``firmware-boot.json``), makes sure ``stable`` exists (it points
   at the running release) and switches ``current`` atomically; the agent then exits
   with :data:`~agent.firmware.manager.EXIT_UPGRADE_RESTART` and systemd starts the new
   release;
3. ``mark_good`` (new version healthy): ``stable`` follows, old releases beyond
   ``keep_releases`` are removed (``current`` and ``stable`` never);
   ``rollback``: ``current`` back to the previous release (restart follows);
   ``discard`` (run by the old version after a rollback): removes the failed release.

:class:`RaucInstaller`: ``rauc install <payload.raucb>`` into the inactive slot, then a
system reboot; ``rauc status mark-good booted`` confirms, ``rauc status mark-active
other`` + ``mark-bad booted`` and a reboot roll back; the bootloader's boot counter
covers a slot that cannot start at all. RAUC verifies its own bundle signature with
its keyring in addition to ours.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
import sysconfig
import time
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Awaitable, Callable, Literal, Protocol

import structlog

from agent.firmware import boot
from agent.firmware.bundle import Bundle
from agent.firmware.config import FirmwareConfig

log = structlog.get_logger(__name__)

RELEASE_INFO = ".release.json"
Restart = Literal["agent", "system"]


class InstallError(Exception):
    """Installation failed; nothing was switched. The message is the reason reported."""


@dataclass(frozen=True)
class InstallOutcome:
    release: str  # release directory name (app_ab) or the target version (rauc)
    previous: str | None
    restart: Restart


class Installer(Protocol):
    name: str

    def accepts(self, kind: str) -> bool: ...
    async def available(self) -> bool: ...
    async def install(self, bundle: Bundle) -> InstallOutcome:
        """Install and switch; the caller then restarts as ``outcome.restart`` says."""
        ...

    async def mark_good(self, record: dict[str, Any]) -> None: ...
    async def rollback(self, record: dict[str, Any], reason: str) -> bool:
        """Switch back to the previous version; True when a restart will run it."""
        ...

    async def discard(self, record: dict[str, Any]) -> str | None:
        """After a rollback, in the old version: clean up; return the recorded reason if any."""
        ...


# ----------------------------------------------------------------------------- subprocess


@dataclass(frozen=True)
class CmdResult:
    rc: int
    out: str


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV", "__PYVENV"))}
    env.update(PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1")
    return env


async def run_cmd(argv: list[str], *, cwd: Path | None = None, timeout_s: float = 600.0) -> CmdResult:
    """Run a command, output merged; never raises for a non-zero exit (rc 127 if it cannot start)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=str(cwd) if cwd else None,
            env=_clean_env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        return CmdResult(127, f"cannot run {argv[0]} (in {cwd}): {exc}")
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return CmdResult(124, f"{argv[0]}: timed out after {timeout_s:.0f} s")
    return CmdResult(proc.returncode or 0, out.decode("utf-8", errors="replace"))


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


Runner = Callable[..., Awaitable[CmdResult]]


# ----------------------------------------------------------------------------- dependency closure


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str | None:
    """Distribution name of a ``Requires-Dist`` value; None for extra-only requirements."""
    base, _, marker = req.partition(";")
    if "extra" in marker and re.search(r"\bextra\s*==", marker):
        return None
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", base)
    return _norm(m.group(1)) if m else None


def wheel_requirements(wheel: Path) -> list[str]:
    """Names of the non-extra ``Requires-Dist`` of a wheel."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next((n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1), None)
        if meta is None:
            raise InstallError(f"{wheel.name}: no METADATA in the wheel")
        text = zf.read(meta).decode("utf-8", errors="replace")
    names = []
    for line in text.splitlines():
        if not line.strip():
            break  # end of headers
        if line.startswith("Requires-Dist:"):
            name = _req_name(line.split(":", 1)[1])
            if name:
                names.append(name)
    return names


def dependency_closure(roots: list[str], site_dirs: list[Path]) -> dict[str, metadata.Distribution]:
    """Installed distributions (in ``site_dirs``) needed by ``roots``, transitively."""
    installed: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions(path=[str(p) for p in site_dirs]):
        name = dist.metadata["Name"]
        if name:
            installed.setdefault(_norm(name), dist)
    todo = list(roots)
    found: dict[str, metadata.Distribution] = {}
    while todo:
        name = todo.pop()
        if name in found or name not in installed:
            continue  # absent: pip will say so if it is really required
        found[name] = installed[name]
        for req in installed[name].requires or []:
            dep = _req_name(req)
            if dep and dep not in found:
                todo.append(dep)
    return found


def copy_distributions(dists: dict[str, metadata.Distribution], dest_site: Path) -> int:
    """Copy each distribution's files (by RECORD) into ``dest_site``; returns files copied."""
    copied = 0
    for name, dist in sorted(dists.items()):
        files = dist.files
        if files is None:
            raise InstallError(f"cannot copy dependency {name}: it has no RECORD; configure [firmware] wheelhouse")
        base = Path(str(dist.locate_file("")))
        for f in files:
            if f.parts and f.parts[0] == "..":
                continue  # scripts in bin/: not needed (python -m works)
            src = base / f
            if not src.is_file():
                continue
            dst = dest_site / f
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            copied += 1
    return copied


# ----------------------------------------------------------------------------- release builder


class VenvReleaseBuilder:
    """Build ``releases/<name>`` as a self-contained venv holding the bundle's wheel."""

    def __init__(
        self,
        *,
        python: str | None = None,
        source_site: list[Path] | None = None,
        wheelhouse: Path | None = None,
        smoke_imports: tuple[str, ...] = ("agent.runtime",),
        timeout_s: float = 900.0,
        runner: Runner = run_cmd,
    ) -> None:
        self.python = python or sys.executable
        if source_site is None:
            paths = sysconfig.get_paths()
            source_site = list(dict.fromkeys(Path(paths[k]) for k in ("purelib", "platlib")))
        self.source_site = source_site
        self.wheelhouse = wheelhouse
        self.smoke_imports = smoke_imports
        self.timeout_s = timeout_s
        self.runner = runner

    def _system_site(self) -> bool:
        cfg = Path(sys.prefix) / "pyvenv.cfg"
        try:
            text = cfg.read_text(encoding="utf-8")
        except OSError:
            return False
        return bool(re.search(r"^include-system-site-packages\s*=\s*true", text, re.M | re.I))

    async def _must(self, argv: list[str], what: str, cwd: Path) -> str:
        res = await self.runner(argv, cwd=cwd, timeout_s=self.timeout_s)
        if res.rc != 0:
            raise InstallError(f"{what} failed (exit {res.rc}): {_tail(res.out)}")
        return res.out

    async def __call__(self, bundle: Bundle, target: Path) -> None:
        wheel = bundle.payload_path
        version = bundle.manifest.version
        target.parent.mkdir(parents=True, exist_ok=True)
        argv = [self.python, "-m", "venv", "--without-pip"]
        if self._system_site():
            argv.append("--system-site-packages")
        await self._must([*argv, str(target)], "creating the release venv", target.parent)
        py = target / "bin" / "python"
        site_out = await self._must(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], "locating site-packages", target
        )
        site = Path(site_out.strip().splitlines()[-1])
        roots = ["pip", *wheel_requirements(wheel)]
        dists = dependency_closure(roots, self.source_site)
        if "pip" not in dists:
            raise InstallError("pip is not installed in the running release: cannot install offline")
        count = await asyncio.to_thread(copy_distributions, dists, site)
        log.info("firmware_deps_copied", distributions=sorted(dists), files=count)
        install = [str(py), "-m", "pip", "install", "--no-index", "--no-cache-dir", "--no-warn-script-location"]
        for links in (bundle.deps_dir, self.wheelhouse):
            if links is not None:
                install += ["--find-links", str(links)]
        await self._must([*install, str(wheel)], "pip install of the new release", target)
        await self._must([str(py), "-m", "pip", "check"], "dependency check (pip check)", target)
        out = await self._must([str(target / "bin" / "charger-agent"), "--version"], "smoke test (charger-agent --version)", target)
        if version not in out.split():
            raise InstallError(f"smoke test: the new release reports {out.strip()!r}, expected version {version}")
        if self.smoke_imports:
            code = "; ".join(f"import {m}" for m in self.smoke_imports)
            await self._must([str(py), "-c", code], f"smoke test (import {', '.join(self.smoke_imports)})", target)


ReleaseBuilder = Callable[[Bundle, Path], Awaitable[None]]


# ----------------------------------------------------------------------------- application-level A/B


def release_dir_name(version: str) -> str:
    name = re.sub(r"[^0-9A-Za-z._+-]", "_", version)
    if not name or name.startswith(".") or ".." in name:
        raise InstallError(f"version {version!r} cannot name a release directory")
    return name


class AppAbInstaller:
    name = "app_ab"

    def __init__(
        self,
        install_root: Path,
        state_dir: Path,
        *,
        keep_releases: int = 3,
        health_timeout_s: float = 600.0,
        max_boot_attempts: int = 3,
        builder: ReleaseBuilder | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(install_root)
        self.state_dir = Path(state_dir)
        self.keep_releases = keep_releases
        self.health_timeout_s = health_timeout_s
        self.max_boot_attempts = max_boot_attempts
        self.builder: ReleaseBuilder = builder or VenvReleaseBuilder()
        self.clock = clock

    @property
    def releases(self) -> Path:
        return self.root / boot.RELEASES

    def accepts(self, kind: str) -> bool:
        return kind == "wheel"

    async def available(self) -> bool:
        return boot.release_of(self.root, "current") is not None

    async def install(self, bundle: Bundle) -> InstallOutcome:
        previous = boot.release_of(self.root, "current")
        if previous is None or not (self.releases / previous).is_dir():
            raise InstallError(
                f"{self.root}/current is not a link to a release in {self.releases}: "
                "the agent was not installed with the A/B release layout"
            )
        stable = boot.release_of(self.root, "stable")
        name = release_dir_name(bundle.manifest.version)
        if name in (previous, stable):
            name = f"{name}-{bundle.manifest.payload_sha256[:8]}"
            if name in (previous, stable):
                raise InstallError(f"release {name} is already installed and in use")
        target = self.releases / name
        if target.exists():
            await asyncio.to_thread(shutil.rmtree, target)
        self.releases.mkdir(parents=True, exist_ok=True)
        started = self.clock()
        try:
            await self.builder(bundle, target)
            (target / RELEASE_INFO).write_text(
                json.dumps(
                    {
                        "version": bundle.manifest.version,
                        "payload_sha256": bundle.manifest.payload_sha256,
                        "installed_at": self.clock(),
                    }
                ),
                encoding="utf-8",
            )
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, target, True)
            raise
        try:
            boot.arm(
                self.root,
                self.state_dir,
                target=name,
                previous=previous,
                health_timeout_s=self.health_timeout_s,
                max_boots=self.max_boot_attempts,
                now=self.clock(),
            )
            if stable is None or not (self.releases / stable).is_dir():
                boot.switch_link(self.root, "stable", previous)  # the running release is the known-good one
            boot.switch_link(self.root, "current", name)
        except OSError as exc:
            boot.clear_state(self.state_dir)
            await asyncio.to_thread(shutil.rmtree, target, True)
            raise InstallError(f"switching to release {name} failed: {exc}") from None
        log.warning(
            "firmware_release_switched", release=name, previous=previous, build_s=round(self.clock() - started, 1)
        )
        return InstallOutcome(release=name, previous=previous, restart="agent")

    async def mark_good(self, record: dict[str, Any]) -> None:
        boot.mark_healthy(self.root, self.state_dir)
        await asyncio.to_thread(self.prune)

    async def rollback(self, record: dict[str, Any], reason: str) -> bool:
        if boot.read_state(self.state_dir) is None:  # gate file lost: rebuild it from the record
            previous = record.get("previous")
            if not previous:
                return False
            boot.arm(
                self.root,
                self.state_dir,
                target=str(record.get("release")),
                previous=str(previous),
                health_timeout_s=0,
                max_boots=0,
            )
        return boot.rollback(self.root, self.state_dir, reason)

    async def discard(self, record: dict[str, Any]) -> str | None:
        state = boot.read_state(self.state_dir)
        reason = str(state.get("reason")) if state and state.get("state") in ("rolled_back", "rollback_failed") else None
        in_use = {boot.release_of(self.root, "current"), boot.release_of(self.root, "stable")}
        release = record.get("release")
        if not release and record.get("version"):  # stopped mid-build: remove only an unfinished dir
            candidate = release_dir_name(str(record["version"]))
            if not (self.releases / candidate / RELEASE_INFO).exists():
                release = candidate
        if isinstance(release, str) and release and release not in in_use:
            await asyncio.to_thread(shutil.rmtree, self.releases / release, True)
        boot.clear_state(self.state_dir)
        return reason

    def prune(self) -> list[str]:
        """Remove the oldest releases beyond ``keep_releases``; never ``current`` or ``stable``."""
        if not self.releases.is_dir():
            return []
        keep = {boot.release_of(self.root, "current"), boot.release_of(self.root, "stable")}

        def installed_at(p: Path) -> float:
            try:
                return float(json.loads((p / RELEASE_INFO).read_text(encoding="utf-8"))["installed_at"])
            except (OSError, ValueError, KeyError, TypeError):
                return p.stat().st_mtime

        dirs = sorted((p for p in self.releases.iterdir() if p.is_dir()), key=installed_at, reverse=True)
        removed: list[str] = []
        kept = len([d for d in dirs if d.name in keep])
        for d in dirs:
            if d.name in keep:
                continue
            if kept < self.keep_releases:
                kept += 1
                continue
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
        if removed:
            log.info("firmware_releases_pruned", removed=removed)
        return removed


# ----------------------------------------------------------------------------- RAUC


class RaucInstaller:
    name = "rauc"

    def __init__(
        self,
        *,
        reboot_command: list[str] | None = None,
        rauc: str = "rauc",
        runner: Runner = run_cmd,
        timeout_s: float = 3600.0,
    ) -> None:
        self.rauc = rauc
        self.runner = runner
        self.timeout_s = timeout_s
        self.reboot_command = reboot_command or ["systemctl", "reboot"]

    def accepts(self, kind: str) -> bool:
        return kind == "rauc"

    async def available(self) -> bool:
        if shutil.which(self.rauc) is None:
            return False
        res = await self.runner([self.rauc, "status"], timeout_s=60.0)
        return res.rc == 0

    async def install(self, bundle: Bundle) -> InstallOutcome:
        res = await self.runner([self.rauc, "install", str(bundle.payload_path)], timeout_s=self.timeout_s)
        if res.rc != 0:
            raise InstallError(f"rauc install failed (exit {res.rc}): {_tail(res.out)}")
        return InstallOutcome(release=bundle.manifest.version, previous=None, restart="system")

    async def mark_good(self, record: dict[str, Any]) -> None:
        res = await self.runner([self.rauc, "status", "mark-good", "booted"], timeout_s=60.0)
        if res.rc != 0:
            log.error("rauc_mark_good_failed", output=_tail(res.out))

    async def rollback(self, record: dict[str, Any], reason: str) -> bool:
        ok = True
        for argv in ([self.rauc, "status", "mark-active", "other"], [self.rauc, "status", "mark-bad", "booted"]):
            res = await self.runner(argv, timeout_s=60.0)
            if res.rc != 0:
                log.error("rauc_rollback_step_failed", argv=argv, output=_tail(res.out))
                ok = False
        return ok

    async def discard(self, record: dict[str, Any]) -> str | None:
        return None


def default_installers(
    cfg: FirmwareConfig,
    state_dir: Path,
    *,
    clock: Callable[[], float] = time.time,
    builder: ReleaseBuilder | None = None,
) -> dict[str, Installer]:
    """The installers by name as ``cfg`` configures them: ``app_ab`` (its releases built by
    ``builder``, by default a :class:`VenvReleaseBuilder` on ``cfg.wheelhouse``) and ``rauc``."""
    return {
        "app_ab": AppAbInstaller(
            cfg.install_root,
            state_dir,
            keep_releases=cfg.keep_releases,
            health_timeout_s=cfg.health_timeout_s,
            max_boot_attempts=cfg.max_boot_attempts,
            builder=builder or VenvReleaseBuilder(wheelhouse=cfg.wheelhouse),
            clock=clock,
        ),
        "rauc": RaucInstaller(reboot_command=cfg.reboot_command),
    }


def choose_installer(setting: str, kind: str, available: dict[str, bool]) -> str:
    """Installer name for a bundle of ``kind`` under ``[firmware] installer = setting``."""
    if setting == "rauc" or (setting == "auto" and kind == "rauc"):
        if kind != "rauc":
            raise InstallError("the bundle carries a wheel, but [firmware] installer = \"rauc\" needs a RAUC bundle")
        if not available.get("rauc"):
            raise InstallError("the bundle is a RAUC image but `rauc` is not available on this controller")
        return "rauc"
    if kind != "wheel":
        raise InstallError(f"[firmware] installer = \"{setting}\" cannot install a {kind} bundle")
    if not available.get("app_ab"):
        raise InstallError("application-level A/B needs the release layout (install_root/current -> releases/<version>)")
    return "app_ab"
