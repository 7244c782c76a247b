"""The systemd units in systemd/: ``systemd-analyze verify`` and ``security`` where the tool exists.

``verify`` runs against a throw-away root (``--root``) holding the unit where it is
installed (/etc/systemd/system), a stub executable at the ExecStart path (the real one
exists only after tools/install) and a copy of the host's unit directory (the targets the
unit is ordered against). ``verify`` exits 0 even for unknown keys and unparsable values,
so its output must be empty too.

systemd-networkd files (.network, .netdev) cannot be verified by systemd-analyze; their
keys are checked against what networkd documents for these sections.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "systemd"
SERVICE = UNITS / "charger-agent.service"
ANALYZE = shutil.which("systemd-analyze")
HOST_UNITS = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()), None)
MAX_EXPOSURE = 2.0

needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed here")


def parse_unit(path: Path) -> configparser.RawConfigParser:
    """A systemd unit's sections and keys (of a repeated key the last value wins: check the text)."""
    parser = configparser.RawConfigParser(strict=False, interpolation=None, delimiters=("=",), comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path, encoding="utf-8")
    return parser


def exec_start(path: Path) -> str:
    match = re.search(r"^ExecStart=[-+!@:]*(\S+)", path.read_text(), re.M)
    assert match, f"{path} has no ExecStart="
    return match.group(1)


def make_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    shutil.copy(SERVICE, unit_dir / SERVICE.name)
    stub = root / exec_start(SERVICE).lstrip("/")
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    if HOST_UNITS is not None:  # sysinit.target, multi-user.target, network-online.target, ...
        shutil.copytree(HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    return root


@needs_analyze
@pytest.mark.skipif(HOST_UNITS is None, reason="no systemd unit directory to verify against")
def test_service_unit_verifies_cleanly(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    assert ANALYZE is not None
    proc = subprocess.run(
        [ANALYZE, "verify", "--man=no", f"--root={root}", SERVICE.name],
        capture_output=True, text=True, timeout=120,
    )
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, output
    assert output == "", f"systemd-analyze verify complained:\n{output}"


@needs_analyze
@pytest.mark.skipif(HOST_UNITS is None, reason="no systemd unit directory to verify against")
def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above would notice a mistake: a typo'd key and a bad value produce output."""
    root = make_root(tmp_path)
    unit = root / "etc/systemd/system" / SERVICE.name
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=strickt\nProtectSytem=yes"))
    assert ANALYZE is not None
    proc = subprocess.run(
        [ANALYZE, "verify", "--man=no", f"--root={root}", SERVICE.name], capture_output=True, text=True, timeout=120
    )
    output = proc.stdout + proc.stderr
    assert "ProtectSytem" in output and "strickt" in output


@needs_analyze
def test_security_exposure_at_most_2(tmp_path: Path) -> None:
    assert ANALYZE is not None
    proc = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--no-pager", str(SERVICE)],
        capture_output=True, text=True, timeout=120,
    )
    output = proc.stdout + proc.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, f"no exposure level in the output (exit {proc.returncode}):\n{output[-2000:]}"
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n" + "\n".join(
        line for line in output.splitlines() if line.startswith("✗")
    )


# ---------------------------------------------------------------------------- the unit's contract


def test_service_unit_contract() -> None:
    unit = parse_unit(SERVICE)
    svc = unit["Service"]
    text = SERVICE.read_text()
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert svc["Restart"] == "always"
    assert re.search(r"^WatchdogSec=\d+", text, re.M)
    assert unit["Unit"]["StartLimitIntervalSec"] and unit["Unit"]["StartLimitBurst"]
    assert svc["User"] == "charger-agent"
    assert svc["ExecStart"].startswith("/opt/charger-agent/current/bin/charger-agent run --config /etc/charger-agent/agent.toml")
    for key, value in {
        "StateDirectory": "charger-agent",
        "LogsDirectory": "charger-agent",
        "ConfigurationDirectory": "charger-agent",
        "RuntimeDirectory": "charger-agent",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
    }.items():
        assert svc[key] == value, key
    families = set(svc["RestrictAddressFamilies"].split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_CAN"}
    assert "SystemCallFilter=@system-service" in text
    assert re.search(r"^DeviceAllow=char-gpiochip rw$", text, re.M)
    assert re.search(r"^CapabilityBoundingSet=$", text, re.M), "no capabilities at all"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


# ---------------------------------------------------------------------------- networkd files

NETWORKD_KEYS = {
    # systemd.netdev(5) / systemd.network(5), the sections and keys these files may use
    "NetDev": {"Name", "Kind", "Description", "MTUBytes"},
    "Match": {"Name", "Type", "Driver", "Path"},
    "Link": {"RequiredForOnline", "ActivationPolicy", "MTUBytes"},
    "Network": {"Description", "ConfigureWithoutCarrier", "LinkLocalAddressing"},
    "CAN": {"BitRate", "SamplePoint", "RestartSec", "DataBitRate", "FDMode", "TripleSampling", "BusErrorReporting", "Termination"},
}


@pytest.mark.parametrize("name", ["80-can0.network", "80-vcan0.netdev", "80-vcan0.network"])
def test_networkd_files(name: str) -> None:
    path = UNITS / name
    unit = parse_unit(path)
    for section in unit.sections():
        assert section in NETWORKD_KEYS, f"{name}: unexpected section [{section}]"
        unknown = set(unit[section]) - NETWORKD_KEYS[section]
        assert not unknown, f"{name}: unexpected keys in [{section}]: {unknown}"
    if name.endswith(".netdev"):
        assert unit["NetDev"]["Kind"] == "vcan" and unit["NetDev"]["Name"] == "vcan0"
    else:
        # CAN has no IP: the link must not hold network-online.target back
        assert unit["Link"]["RequiredForOnline"] == "no"
    if name == "80-can0.network":
        assert unit["Match"]["Name"] == "can0"
        assert unit["CAN"]["BitRate"] == "125000"  # InfyPower / Winline modules
    if name == "80-vcan0.network":
        assert not unit.has_section("CAN"), "vcan has no bit rate"
        assert "tools/install" in path.read_text()  # tools/install --uninstall recognises its files by this
