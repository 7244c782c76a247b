"""Config loading: shipped configs are valid; every problem is one readable line; exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
SIM = (ROOT / "config" / "sim.toml").read_text()


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "config").glob("*.toml")))
def test_shipped_configs_are_valid(name: str) -> None:
    loaded = load_config(ROOT / "config" / name)
    assert loaded.model.connectors


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return info.value.problems


def test_misspelt_driver_option_names_file_key_and_suggestion(tmp_path: Path) -> None:
    text = SIM.replace("link = \"dc_meter\"\nunit_id = 1\npoll_interval_s", "link = \"dc_meter\"\nunit_id = 1\npol_interval_s")
    lines = problems(tmp_path, text)
    assert lines == [f"{tmp_path / 'agent.toml'}: connectors[0].meter.pol_interval_s: unknown key (did you mean 'poll_interval_s'?)"]


def test_misspelt_core_key_and_bad_range_reported_together(tmp_path: Path) -> None:
    text = SIM.replace("heartbeat_interval_s = 30", "heartbeat_intervall_s = 30").replace("group = 1", "group = 99")
    lines = problems(tmp_path, text)
    assert any("platform.heartbeat_intervall_s: unknown key (did you mean 'heartbeat_interval_s'?)" in l for l in lines)
    assert any("connectors[0].power_modules.group:" in l and "99" in l for l in lines)
    assert all(l.startswith(str(tmp_path / "agent.toml") + ": ") for l in lines)


def test_unknown_driver_lists_the_choices(tmp_path: Path) -> None:
    lines = problems(tmp_path, SIM.replace('driver = "infypower"', 'driver = "infypwr"'))
    assert lines == [
        f"{tmp_path / 'agent.toml'}: connectors[0].power_modules.driver: unknown power_modules driver 'infypwr' (expected one of: infypower, winline)"
    ]


def test_cross_references_are_checked(tmp_path: Path) -> None:
    text = SIM.replace('bus = "modules"', 'bus = "can9"').replace('imd = "dc1"', 'imd = "dc9"')
    lines = problems(tmp_path, text)
    assert any("connectors[0].power_modules.bus: expected the name of a [can.<name>] bus (modules), got 'can9'" in l for l in lines)
    assert any("connectors[0].imd:" in l and "'dc9'" in l for l in lines)


def test_insecure_platform_url_is_refused(tmp_path: Path) -> None:
    lines = problems(tmp_path, SIM.replace("http://127.0.0.1:8080/v1", "http://platform.example.com/v1"))
    assert len(lines) == 1 and "platform.url" in lines[0] and "https" in lines[0]


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    assert "not valid TOML" in problems(tmp_path, "x = [")[0]
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")


def test_cli_prints_one_line_per_problem_and_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, SIM.replace("unit_id = 3", "unit_id = 3\nunitid = 4"))
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "probe", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"{path}: imd.dc1.unitid: unknown key (did you mean 'unit_id'?)"
    assert "Traceback" not in proc.stderr


def _fans(loaded_text: str, tmp_path: Path) -> list[float]:
    cfg = load_config(write(tmp_path, loaded_text)).model
    assert cfg.thermal is not None
    return [fan.low_fraction for fan in cfg.thermal.options.fans]


def test_charging_fan_low_fraction_is_every_fans_default(tmp_path: Path) -> None:
    """[charging] fan_low_fraction sets the share of expected rpm below which a fan is
    fan_low (hence F-0601) for every fan without its own low_fraction."""
    assert "fan_low_fraction" not in SIM and "low_fraction" not in SIM
    assert _fans(SIM, tmp_path) == [0.7]
    text = SIM.replace("[charging]\n", "[charging]\nfan_low_fraction = 0.45\n", 1)
    assert _fans(text, tmp_path) == [0.45]
    own = text.replace("nominal_rpm = 1800 }", "nominal_rpm = 1800, low_fraction = 0.6 }", 1)
    assert _fans(own, tmp_path) == [0.6]


def test_bad_fan_low_fraction_is_one_problem_line(tmp_path: Path) -> None:
    text = SIM.replace("[charging]\n", "[charging]\nfan_low_fraction = 1.5\n", 1)
    lines = problems(tmp_path, text)
    assert len(lines) == 1 and "charging.fan_low_fraction" in lines[0], lines
def test_component_health_is_on_in_the_sim_and_dc_examples() -> None:
    for name in ("sim.toml", "example-dc.toml"):
        assert load_config(ROOT / "config" / name).model.platform.send_component_health, name
    sim = load_config(ROOT / "config" / "sim.toml").model
    assert sim.health.bidirectional_max_cycles is not None  # the V2G stage's rating, configured


def test_firmware_version_and_default_log_target_are_optional(tmp_path: Path) -> None:
    sim = load_config(ROOT / "config" / "sim.toml").model
    assert sim.charger.firmware_version is None and sim.diagnostics.log_upload_url is None
    text = SIM.replace('manufacturer = "charger-agent"', 'manufacturer = "charger-agent"\nfirmware_version = "260420.0107"')
    text += '\n[diagnostics]\nlog_upload_url = "https://uploads.example.com/b.tar.gz"\n'
    model = load_config(write(tmp_path, text)).model
    assert model.charger.firmware_version == "260420.0107"
    assert model.diagnostics.log_upload_url == "https://uploads.example.com/b.tar.gz"


def test_a_temporary_sim_root_is_removed_when_the_process_exits(tmp_path: Path) -> None:
    script = (
        "from agent.config import load_config\n"
        "root = load_config('config/sim.toml').sim_root\n"
        "print(root, root.is_dir())\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    assert Path(out[0]).parent == tmp_path and Path(out[0]).name.startswith("charger-sim-")
    assert out[1] == "True"  # created for the run ...
    assert list(tmp_path.iterdir()) == []  # ... and gone once the process has exited


def test_a_temporary_sim_root_is_removed_at_once_when_the_file_has_problems(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    bad = tmp_path / "bad.toml"
    bad.write_text(SIM.replace("[sim]\n", "[sim]\nno_such_key = 1\n", 1))
    with pytest.raises(ConfigError, match="sim.no_such_key"):
        load_config(bad)
    assert list((tmp_path / "tmp").iterdir()) == []
    good = load_config(ROOT / "config" / "sim.toml").sim_root
    assert good is not None and good.parent == tmp_path / "tmp" and good.is_dir()
