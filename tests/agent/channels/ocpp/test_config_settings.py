"""[ocpp] validation, --ocpp-url, configuration keys and their persistence."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.channels.ocpp.config import OcppSection
from agent.channels.ocpp.settings import Settings
from agent.cli.main import _load, build_parser
from agent.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[4]


def _config(tmp_path: Path, ocpp: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text((REPO / "config" / "sim.toml").read_text() + "\n" + ocpp + "\n")
    return path


def test_no_section_means_no_channel(tmp_path: Path) -> None:
    assert load_config(REPO / "config" / "sim.toml").model.ocpp is None


def test_valid_section_and_defaults(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, '[ocpp]\nurl = "wss://csms.example.com/ocpp/"\npassword = "pw"')).model
    assert cfg.ocpp is not None and cfg.ocpp.url == "wss://csms.example.com/ocpp"
    assert cfg.ocpp.charge_point_id is None and cfg.ocpp.read_password() == "pw"


@pytest.mark.parametrize(
    ("section", "key", "expected"),
    [
        ('url = "ws://csms.example.com/ocpp"', "ocpp.url", "plain ws:// is accepted only for a loopback CSMS"),
        ('url = "https://csms.example.com/ocpp"', "ocpp.url", "wss://"),
        ('url = "ws://127.0.0.1:9000/ocpp"\npassword = "a"\npassword_file = "/x"', "ocpp", "either password or password_file"),
        ('url = "ws://127.0.0.1:9000/ocpp"\ncharge_point_id = "has space"', "ocpp.charge_point_id", "pattern"),
        ('url = "ws://127.0.0.1:9000/ocpp"\npasword = "x"', "ocpp.pasword", "did you mean 'password'"),
    ],
)
def test_bad_sections_are_one_line_each(tmp_path: Path, section: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_config(tmp_path, "[ocpp]\n" + section))
    lines = [p for p in err.value.problems if f": {key}:" in p]
    assert lines and expected in lines[0], err.value.problems


def test_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    section = OcppSection(url="ws://localhost:1/ocpp", password_file=secret)
    assert section.read_password() == "s3cret"


def test_ocpp_url_override(tmp_path: Path) -> None:
    path = _config(tmp_path, '[ocpp]\nurl = "wss://csms.example.com/ocpp"')
    parser = build_parser()
    loaded = _load(parser.parse_args(["run", "-c", str(path), "--ocpp-url", "ws://127.0.0.1:9/x"]))
    assert loaded.model.ocpp is not None and loaded.model.ocpp.url == "ws://127.0.0.1:9/x"
    with pytest.raises(ConfigError) as err:
        _load(parser.parse_args(["run", "-c", str(path), "--ocpp-url", "ws://example.com/x"]))
    assert err.value.problems[0].startswith("--ocpp-url: expected")
    with pytest.raises(ConfigError) as err:
        _load(parser.parse_args(["run", "-c", str(REPO / "config" / "sim.toml"), "--ocpp-url", "ws://127.0.0.1:9/x"]))
    assert "no [ocpp] section" in err.value.problems[0]


def test_settings_change_rules_and_persistence() -> None:
    stored: dict[str, str] = {}
    s = Settings(2, ["Core"], {}, stored.__setitem__)
    assert s.change("HeartbeatInterval", "120") == "Accepted" and stored == {"HeartbeatInterval": "120"}
    assert s.change("NumberOfConnectors", "3") == "Rejected"
    assert s.change("HeartbeatInterval", "-1") == "Rejected"
    assert s.change("MeterValuesSampledData", "Energy.Active.Import.Register,Bogus") == "Rejected"
    assert s.change("LocalAuthorizeOffline", "FALSE") == "Accepted" and s.get_bool("LocalAuthorizeOffline") is False
    assert s.change("Nope", "1") == "NotSupported"
    again = Settings(2, ["Core"], stored, lambda k, v: None)
    assert again.get_int("HeartbeatInterval") == 120
    known, unknown = again.get(["NumberOfConnectors", "AuthorizationKey", "Nope"])
    assert known == [{"key": "NumberOfConnectors", "readonly": True, "value": "2"}]
    assert unknown == ["AuthorizationKey", "Nope"]


def test_stored_readonly_or_invalid_values_are_ignored() -> None:
    s = Settings(2, ["Core"], {"NumberOfConnectors": "9", "HeartbeatInterval": "x"}, lambda k, v: None)
    assert s.get_int("NumberOfConnectors") == 2 and s.get_int("HeartbeatInterval") == 300


def test_readers_cross_checked_against_connectors(tmp_path: Path) -> None:
    ok = load_config(_config(tmp_path, '[ocpp]\nurl = "ws://127.0.0.1:1/o"\nreaders = [{ connector = 1, driver = "pcsc", reader_name = "ACR122" }]'))
    assert ok.model.ocpp is not None and ok.model.ocpp.readers[0].reader_name == "ACR122"
    with pytest.raises(ConfigError) as err:
        load_config(_config(tmp_path, '[ocpp]\nurl = "ws://127.0.0.1:1/o"\nreaders = [{ connector = 9 }]'))
    assert any("ocpp.readers[0].connector: expected one of the connector ids [1, 2], got 9" in p for p in err.value.problems)
