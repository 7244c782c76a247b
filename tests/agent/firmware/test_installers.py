"""Installers: application-level A/B with a stand-in release builder, RAUC with a fake ``rauc``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.firmware import boot
from agent.firmware.bundle import open_bundle
from agent.firmware.installers import AppAbInstaller, InstallError, RaucInstaller, choose_installer

from .helpers import FakeBuilder, fake_bundle, fake_release, layout, make_keys, run_current, write_script


def _bundle(tmp_path: Path, version: str = "0.2.0", suffix: str = ".whl"):  # type: ignore[no-untyped-def]
    keys = make_keys(tmp_path / "keys")
    result = fake_bundle(tmp_path, keys, version=version, size=1000, suffix=suffix)
    return open_bundle(result.bundle, tmp_path / f"x-{version}", max_bytes=10**6)


async def test_ab_install_switches_after_building(tmp_path: Path) -> None:
    root, state = tmp_path / "opt", tmp_path / "state"
    layout(root)
    builder = FakeBuilder()
    inst = AppAbInstaller(root, state, builder=builder)
    assert await inst.available()
    outcome = await inst.install(_bundle(tmp_path))
    assert (outcome.release, outcome.previous, outcome.restart) == ("0.2.0", "0.1.0", "agent")
    assert boot.release_of(root) == "0.2.0" and boot.release_of(root, "stable") == "0.1.0"
    assert run_current(root) == (0, "charger-agent 0.2.0")
    st = boot.read_state(state)
    assert st is not None and st["state"] == "pending" and st["previous"] == "0.1.0"
    assert (root / "releases" / "0.2.0" / ".release.json").is_file()


async def test_ab_failed_build_changes_nothing(tmp_path: Path) -> None:
    root, state = tmp_path / "opt", tmp_path / "state"
    layout(root)
    inst = AppAbInstaller(root, state, builder=FakeBuilder(fail="pip install of the new release failed"))
    with pytest.raises(InstallError, match="pip install"):
        await inst.install(_bundle(tmp_path))
    assert boot.release_of(root) == "0.1.0"
    assert not (root / "releases" / "0.2.0").exists()
    assert boot.read_state(state) is None


async def test_ab_needs_the_release_layout(tmp_path: Path) -> None:
    inst = AppAbInstaller(tmp_path / "opt", tmp_path / "state", builder=FakeBuilder())
    assert not await inst.available()
    with pytest.raises(InstallError, match="release layout"):
        await inst.install(_bundle(tmp_path))


async def test_ab_rollback_and_discard(tmp_path: Path) -> None:
    root, state = tmp_path / "opt", tmp_path / "state"
    layout(root)
    inst = AppAbInstaller(root, state, builder=FakeBuilder())
    outcome = await inst.install(_bundle(tmp_path))
    record = {"release": outcome.release, "previous": outcome.previous}
    assert await inst.rollback(record, "not healthy")
    assert run_current(root) == (0, "charger-agent 0.1.0")
    assert await inst.discard(record) == "not healthy"
    assert not (root / "releases" / "0.2.0").exists() and boot.read_state(state) is None


async def test_ab_reinstalling_the_stable_version_keeps_the_rollback_target(tmp_path: Path) -> None:
    root, state = tmp_path / "opt", tmp_path / "state"
    layout(root, "0.2.0")
    fake_release(root, "0.3.0")
    boot.switch_link(root, "stable", "0.2.0")
    boot.switch_link(root, "current", "0.3.0")
    inst = AppAbInstaller(root, state, builder=FakeBuilder())
    bundle = _bundle(tmp_path, "0.2.0")
    outcome = await inst.install(bundle)
    assert outcome.release == f"0.2.0-{bundle.manifest.payload_sha256[:8]}"
    assert (root / "releases" / "0.2.0" / "bin" / "charger-agent").is_file()
    assert run_current(root) == (0, "charger-agent 0.2.0")


async def test_prune_keeps_current_stable_and_newest(tmp_path: Path) -> None:
    root, state = tmp_path / "opt", tmp_path / "state"
    for i, v in enumerate(["0.1.0", "0.2.0", "0.3.0", "0.4.0", "0.5.0"]):
        rel = fake_release(root, v)
        os.utime(rel, (1000 + i, 1000 + i))
    boot.switch_link(root, "stable", "0.1.0")  # oldest, but the rollback target
    boot.switch_link(root, "current", "0.5.0")
    inst = AppAbInstaller(root, state, keep_releases=3, builder=FakeBuilder())
    assert sorted(inst.prune()) == ["0.2.0", "0.3.0"]
    assert sorted(p.name for p in (root / "releases").iterdir()) == ["0.1.0", "0.4.0", "0.5.0"]


async def test_rauc_installer_drives_the_rauc_cli(tmp_path: Path) -> None:
    log = tmp_path / "rauc.log"
    rauc = tmp_path / "bin" / "rauc"
    write_script(rauc, f'echo "$@" >> {log}\ncase "$1 $2" in "install "*) echo installing;; esac\nexit 0')
    inst = RaucInstaller(rauc=str(rauc))
    assert await inst.available()
    bundle = _bundle(tmp_path, suffix=".raucb")
    assert bundle.manifest.kind == "rauc" and inst.accepts("rauc") and not inst.accepts("wheel")
    outcome = await inst.install(bundle)
    assert outcome.restart == "system"
    await inst.mark_good({})
    assert await inst.rollback({}, "unhealthy")
    assert log.read_text().splitlines() == [
        "status",
        f"install {bundle.payload_path}",
        "status mark-good booted",
        "status mark-active other",
        "status mark-bad booted",
    ]
    write_script(rauc, 'echo "signature verification failed" >&2; exit 1')
    with pytest.raises(InstallError, match="rauc install failed.*signature verification failed"):
        await inst.install(bundle)
    assert not await RaucInstaller(rauc=str(tmp_path / "nope")).available()


def test_choose_installer() -> None:
    both = {"rauc": True, "app_ab": True}
    assert choose_installer("auto", "wheel", both) == "app_ab"
    assert choose_installer("auto", "rauc", both) == "rauc"
    assert choose_installer("app_ab", "wheel", both) == "app_ab"
    with pytest.raises(InstallError, match="RAUC bundle"):
        choose_installer("rauc", "wheel", both)
    with pytest.raises(InstallError, match="not available"):
        choose_installer("auto", "rauc", {"rauc": False, "app_ab": True})
    with pytest.raises(InstallError, match="cannot install a rauc bundle"):
        choose_installer("app_ab", "rauc", both)
    with pytest.raises(InstallError, match="release layout"):
        choose_installer("auto", "wheel", {"rauc": True, "app_ab": False})
