"""tools/install into a temporary root (``--root``): release tree, ``current``, config, units,
the service user, idempotence, upgrade, ``--uninstall`` and ``--purge``.

The release venv gets the project wheel from a wheelhouse (``--wheelhouse``, the offline
path) built once per module from this source tree; ``PIP_NO_DEPS=1`` (read by pip itself)
leaves the third-party dependencies out to keep the test fast -- the tree, not the
dependency resolution, is under test here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "tools" / "install"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
HAS_SYSUSERS = shutil.which("systemd-sysusers") is not None
HAS_SYSTEMCTL = shutil.which("systemctl") is not None
IS_ROOT = os.geteuid() == 0

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from a clean copy of the tree (the build writes build/)."""
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns(".git", ".venv", "*.egg-info", "build", "dist", "state", "__pycache__", ".*_cache")
    for name in ("pyproject.toml", "README.md", "agent", "hal"):
        item = REPO / name
        if item.is_dir():
            shutil.copytree(item, src / name, ignore=ignore)
        else:
            shutil.copy(item, src / name)
    out = tmp_path_factory.mktemp("wheelhouse")
    proc = subprocess.run(
        # the build backend (setuptools, wheel) is in the test extra: no package index needed
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
         "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, f"cannot build the project wheel: {proc.stderr[-800:]}"
    assert list(out.glob(f"charger_agent-{VERSION}-*.whl"))
    return out


def install(root: Path, wheelhouse: Path | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [str(INSTALL), "--root", str(root), *args]
    if wheelhouse is not None:
        cmd += ["--wheelhouse", str(wheelhouse)]
    env = {**os.environ, "PIP_NO_DEPS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file and symlink below root: mtime, size, link target (directories' own mtimes
    aside: systemd-sysusers takes its lock file in /etc even when it changes nothing)."""
    out = {}
    for path in root.rglob("*"):
        if path.name == ".pwd.lock" or (path.is_dir() and not path.is_symlink()):
            continue
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_mtime_ns, st.st_size, os.readlink(path) if path.is_symlink() else "")
    return out


def test_install_tree_idempotence_upgrade_uninstall(tmp_path: Path, wheelhouse: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/group").write_text("root:x:0:\ndialout:x:20:\ngpio:x:997:\nsystemd-journal:x:996:\n")
    (root / "etc/polkit-1/rules.d").mkdir(parents=True)  # polkit is installed on this target
    first = install(root, wheelhouse, "--can", "--bench")

    opt = root / "opt/charger-agent"
    release = opt / "releases" / VERSION
    # the versioned release: a venv with the project and its console script
    assert (release / ".installed").is_file()
    assert (release / "bin/charger-agent").is_file() and os.access(release / "bin/charger-agent", os.X_OK)
    out = subprocess.run(
        [str(release / "bin/python"), "-c", "import agent, importlib.metadata as m; print(m.version('charger-agent'))"],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == VERSION
    assert (release / "share/charger-agent/systemd/charger-agent.service").is_file()
    assert (release / "share/doc/charger-agent/README.md").is_file()
    # current -> releases/<version>, relative (valid inside the root and once booted)
    assert (opt / "current").is_symlink() and os.readlink(opt / "current") == f"releases/{VERSION}"
    assert (opt / "current/bin/charger-agent").exists()
    assert not list(opt.glob(".current.*")), "temporary symlink left behind"
    assert os.readlink(opt / "stable") == f"releases/{VERSION}"  # first install: also the rollback target

    # config from the example, only readable by root and the service group
    config = root / "etc/charger-agent/agent.toml"
    assert config.read_text() == (REPO / "config/example-dc.toml").read_text()
    assert (config.stat().st_mode & 0o777) == 0o640
    assert (config.parent.stat().st_mode & 0o777) == 0o750

    # units
    unit = root / "etc/systemd/system/charger-agent.service"
    assert unit.read_text() == (REPO / "systemd/charger-agent.service").read_text()
    for name in ("80-can0.network", "80-vcan0.netdev", "80-vcan0.network"):
        assert (root / "etc/systemd/network" / name).read_text() == (REPO / "systemd" / name).read_text()
    assert (root / "etc/polkit-1/rules.d/50-charger-agent.rules").is_file()
    if HAS_SYSTEMCTL:
        wants = root / "etc/systemd/system/multi-user.target.wants/charger-agent.service"
        assert wants.is_symlink(), first.stdout

    # the service user, in the root's own account files, in the groups that exist there
    conf = (root / "etc/sysusers.d/charger-agent.conf").read_text()
    assert 'u charger-agent - "EV charger agent" /var/lib/charger-agent /usr/sbin/nologin' in conf
    assert "m charger-agent gpio" in conf and "m charger-agent dialout" in conf
    assert "m charger-agent systemd-journal" in conf  # fetch_logs reads the unit's journal
    if HAS_SYSUSERS:
        passwd = (root / "etc/passwd").read_text()
        assert any(line.startswith("charger-agent:") and line.endswith(":/usr/sbin/nologin") for line in passwd.splitlines())
        groups = {line.split(":")[0]: line.split(":")[3] for line in (root / "etc/group").read_text().splitlines()}
        assert "charger-agent" in groups["gpio"] and "charger-agent" in groups["dialout"]
        if IS_ROOT:
            gid = int(next(l for l in (root / "etc/group").read_text().splitlines() if l.startswith("charger-agent:")).split(":")[2])
            assert config.stat().st_gid == gid and config.stat().st_uid == 0
            # the agent updates itself (agent/firmware A/B): it owns /opt/charger-agent
            uid = int(next(l for l in passwd.splitlines() if l.startswith("charger-agent:")).split(":")[2])
            assert all(p.lstat().st_uid == uid for p in [opt, opt / "releases", release, release / "bin/python", opt / "current"])

    # -- idempotent: a second run changes nothing, keeps an edited config
    config.write_text(config.read_text() + "\n# edited on site\n")
    before = snapshot(root)
    second = install(root, wheelhouse, "--can", "--bench")
    assert "already installed" in second.stdout
    assert "kept /etc/charger-agent/agent.toml" in second.stdout
    assert snapshot(root) == before

    # -- upgrade: a new release directory, current switched, the old one kept for a rollback
    install(root, wheelhouse, "--release", f"{VERSION}-next", "--read-only-code")
    if IS_ROOT:
        assert (opt / "releases" / f"{VERSION}-next").stat().st_uid == 0 and opt.stat().st_uid == 0
    assert os.readlink(opt / "current") == f"releases/{VERSION}-next"
    assert os.readlink(opt / "stable") == f"releases/{VERSION}", "stable is confirmed by the agent, not the installer"
    assert (release / ".installed").is_file()
    assert config.read_text().endswith("# edited on site\n")

    # -- uninstall keeps state and config
    (root / "var/lib/charger-agent").mkdir(parents=True)
    (root / "var/lib/charger-agent/agent.db").write_text("state")
    install(root, None, "--uninstall")
    assert not opt.exists()
    assert not unit.exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants/charger-agent.service").exists()
    assert not list((root / "etc/systemd/network").glob("80-*"))
    assert not (root / "etc/polkit-1/rules.d/50-charger-agent.rules").exists()
    assert config.is_file() and (root / "var/lib/charger-agent/agent.db").is_file()

    # -- purge removes them and the user
    install(root, None, "--uninstall", "--purge")
    assert not config.parent.exists() and not (root / "var/lib/charger-agent").exists()
    if HAS_SYSUSERS:
        assert "charger-agent" not in (root / "etc/passwd").read_text()
        assert "charger-agent" not in (root / "etc/group").read_text()
        assert "dialout:x:20:" in (root / "etc/group").read_text()


def test_installed_unit_verifies(tmp_path: Path, wheelhouse: Path) -> None:
    """systemd-analyze verify on the installed tree: the real ExecStart binary, the real paths."""
    analyze = shutil.which("systemd-analyze")
    host_units = Path("/usr/lib/systemd/system")
    if analyze is None or not host_units.is_dir():
        pytest.skip("systemd-analyze or the host's unit directory is missing")
    root = tmp_path / "root"
    install(root, wheelhouse)
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
    proc = subprocess.run([analyze, "verify", "--man=no", f"--root={root}", "charger-agent.service"], capture_output=True, text=True)
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and output == "", output


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    proc = install(root, None, "--dry-run", "--can")
    assert not root.exists() or not any(root.iterdir())
    assert "dry run" in proc.stdout
    assert f"-m venv {root}/opt/charger-agent/releases/{VERSION}" in proc.stdout
    assert "mv -T" in proc.stdout and "80-can0.network" in proc.stdout


def test_usage_errors(tmp_path: Path) -> None:
    assert install(tmp_path, None, "--bogus", check=False).returncode == 2
    assert install(tmp_path, None, "--purge", check=False).returncode == 1
    proc = install(tmp_path, None, "--release", "../escape", check=False)
    assert proc.returncode == 1 and "plain directory name" in proc.stderr
    assert subprocess.run([str(INSTALL), "--help"], capture_output=True, text=True).returncode == 0
