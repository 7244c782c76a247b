"""The whole path with a real bundle built from this source tree by tools/build-bundle.

Keys from tools/keygen, the bundle from tools/build-bundle, served over HTTP on
127.0.0.1, downloaded, verified and installed by AppAbInstaller into a real venv
(dependencies copied offline from the running environment, pip --no-index), the
``current`` link switched; ``<root>/current/bin/charger-agent --version`` then shows
the new version, and the new version's health gate reports success.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.firmware import boot
from agent.firmware.manager import PENDING_KEY

from .helpers import ROOT, FileServer, Keys, Rig, layout

pytestmark = pytest.mark.slow
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}


def _tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(ROOT / "tools" / name), *args], capture_output=True, text=True, env=CLEAN_ENV, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _keygen(directory: Path) -> Keys:
    out = _tool("keygen", "--out", str(directory), "--name", "fw").stdout
    public = re.search(r'public_key = "([^"]+)"', out)
    assert public, out
    assert (directory / "fw.pem").stat().st_mode & 0o777 == 0o600
    return Keys(directory / "fw.pem", public.group(1))


def _build(keys: Keys, out: Path, version: str, *extra: str) -> dict[str, object]:
    result = json.loads(_tool("build-bundle", "--version", version, "--key", str(keys.private_pem), "--out", str(out), *extra).stdout)
    assert Path(str(result["bundle"])).is_file()
    return result


@pytest.fixture
async def server():  # type: ignore[no-untyped-def]
    srv = await FileServer().start()
    yield srv
    await srv.stop()


async def test_real_bundle_installs_and_runs(tmp_path: Path, server: FileServer) -> None:
    keys = _keygen(tmp_path / "keys")
    built = _build(keys, tmp_path / "dist", "0.2.0", "--base-url", server.base + "/fw")
    bundle = Path(str(built["bundle"]))
    server.add(bundle.name, bundle.read_bytes())
    p = built["params"]
    assert isinstance(p, dict) and p["url"] == f"{server.base}/fw/{bundle.name}" and p["checksum"] == built["sha256"]

    rig = Rig(tmp_path, keys)
    layout(rig.root, "0.1.0")
    manager = rig.manager("0.1.0", health_timeout_s=120)  # the real installers
    await manager.run(params_from(p), "cmd-real")
    assert rig.restarts == ["agent"], rig.statuses.calls[-1]
    assert boot.release_of(rig.root) == "0.2.0" and boot.release_of(rig.root, "stable") == "0.1.0"

    # the new release is a self-contained venv with the new version
    version = subprocess.run(
        [str(rig.root / "current" / "bin" / "charger-agent"), "--version"], capture_output=True, text=True, cwd=tmp_path,
        env=CLEAN_ENV,
    )
    assert version.returncode == 0 and version.stdout.strip() == "charger-agent 0.2.0", version.stdout + version.stderr
    where = subprocess.run(
        [str(rig.root / "current" / "bin" / "python"), "-c", "import agent, aiohttp; print(agent.__file__); print(aiohttp.__file__)"],
        capture_output=True, text=True, cwd=tmp_path, env=CLEAN_ENV,
    )
    assert where.returncode == 0, where.stderr
    release = (rig.root / "releases" / "0.2.0").resolve()
    assert all(Path(line).resolve().is_relative_to(release) for line in where.stdout.split()), where.stdout

    # systemd restarts it: the launcher (the new release's own boot module here) counts the start
    pre = subprocess.run(
        [str(rig.root / "current" / "bin" / "python"), "-m", "agent.firmware.boot",
         "--install-root", str(rig.root), "--state-dir", str(rig.state)],
        capture_output=True, text=True, cwd=tmp_path, env={**CLEAN_ENV, "INVOCATION_ID": "real-1"},
    )
    assert pre.returncode == 0 and "counted" in pre.stderr, pre.stderr
    new = rig.manager("0.2.0", health_timeout_s=120)
    await new.after_start(lambda: True)
    assert rig.statuses.last()[:3] == ("cmd-real", "completed", "firmware 0.2.0 installed and running")
    assert [s["status"] for s in rig.outbox.firmware()][-1] == "success"
    assert boot.release_of(rig.root, "stable") == "0.2.0"
    assert await rig.kv.get(PENDING_KEY) is None


async def test_real_bundle_with_an_unmet_dependency_fails_offline(tmp_path: Path, server: FileServer) -> None:
    """pip never reaches for the network: a dependency the running release lacks fails the install."""
    src = tmp_path / "src"
    for part in ("agent", "hal"):
        shutil.copytree(ROOT / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = (ROOT / "pyproject.toml").read_text()
    (src / "pyproject.toml").write_text(pyproject.replace('dependencies = [\n', 'dependencies = [\n  "no-such-package-xyz>=1",\n', 1))
    keys = _keygen(tmp_path / "keys")
    built = _build(keys, tmp_path / "dist", "0.2.0", "--source", str(src), "--base-url", server.base + "/fw")
    bundle = Path(str(built["bundle"]))
    server.add(bundle.name, bundle.read_bytes())
    rig = Rig(tmp_path, keys)
    layout(rig.root, "0.1.0")
    await rig.manager("0.1.0").run(params_from(built["params"]), "cmd-dep")
    cid, status, message, _ = rig.statuses.last()
    assert status == "failed" and message is not None and "pip install of the new release failed" in message
    assert "no-such-package-xyz" in message
    assert rig.restarts == [] and boot.release_of(rig.root) == "0.1.0"
    assert not (rig.root / "releases" / "0.2.0").exists()


async def test_new_dependency_shipped_in_the_bundle_installs_offline(tmp_path: Path, server: FileServer) -> None:
    """A dependency the running release lacks comes with the bundle (--deps-dir) and installs offline."""
    from agent.firmware.build import build_wheel

    dep = tmp_path / "tinydep"
    (dep / "tinydep").mkdir(parents=True)
    (dep / "tinydep" / "__init__.py").write_text("VALUE = 42\n")
    (dep / "pyproject.toml").write_text('[project]\nname = "tinydep"\nversion = "1.0"\n')
    build_wheel(dep, tmp_path / "wheels", "1.0")
    src = tmp_path / "src"
    for part in ("agent", "hal"):
        shutil.copytree(ROOT / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = (ROOT / "pyproject.toml").read_text()
    (src / "pyproject.toml").write_text(pyproject.replace("dependencies = [\n", 'dependencies = [\n  "tinydep>=1",\n', 1))
    keys = _keygen(tmp_path / "keys")
    built = _build(
        keys, tmp_path / "dist", "0.2.0", "--source", str(src), "--deps-dir", str(tmp_path / "wheels"),
        "--base-url", server.base + "/fw",
    )
    bundle = Path(str(built["bundle"]))
    server.add(bundle.name, bundle.read_bytes())
    rig = Rig(tmp_path, keys)
    layout(rig.root, "0.1.0")
    await rig.manager("0.1.0").run(params_from(built["params"]), "cmd-deps")
    assert rig.restarts == ["agent"], rig.statuses.last()
    proc = subprocess.run(
        [str(rig.root / "current" / "bin" / "python"), "-c", "import tinydep, agent; print(tinydep.VALUE, agent.__version__)"],
        capture_output=True, text=True, cwd=tmp_path, env=CLEAN_ENV,
    )
    assert proc.stdout.split() == ["42", "0.2.0"], proc.stderr


def params_from(p: object):  # type: ignore[no-untyped-def]
    from agent.firmware.params import FirmwareUpgradeParams

    assert isinstance(p, dict)
    return FirmwareUpgradeParams.model_validate(p)


def test_build_bundle_refuses_a_bad_version(tmp_path: Path) -> None:
    keys = _keygen(tmp_path / "keys")
    proc = subprocess.run(
        [str(ROOT / "tools" / "build-bundle"), "--version", "latest", "--key", str(keys.private_pem), "--out", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "PEP 440" in proc.stderr
    assert sys.executable  # the tools run with the project venv
