"""Log bundle: the running config is redacted, keeping its layout, or re-rendered when that cannot
be proven complete.
"""

from __future__ import annotations

import tomllib

from agent.maintenance.logbundle import redact_config

CONFIG = """\
# Tellus charger. Old platform token = "cmt-tok-0001"
[charger]
serial_number = "TP-1"
state_dir = "/var/lib/charger-agent"

[platform]
url = "https://agent:pw-in-url-0002@api.example.com/v1"
api_key = "cfg-key-0003"
"auth-token" = 'cfg-tok-0004'
proxy = { host = "p.example", password = "cfg-pw-0005" }
signatures = [
  "cfg-sig-0006",   # multi-line array
  "cfg-sig-0007",
]
long_poll_wait_s = 30
client.secret = \"\"\"
cfg-sec-0008
\"\"\"

[secrets]
pin = 12345678

[[connectors]]
id = 1
meter = { driver = "acrel", private_key = { pem = "cfg-pem-0009" } }
"""


CONFIG_SECRETS = [
    "cmt-tok-0001",
    "pw-in-url-0002",
    "cfg-key-0003",
    "cfg-tok-0004",
    "cfg-pw-0005",
    "cfg-sig-0006",
    "cfg-sig-0007",
    "cfg-sec-0008",
    "12345678",
    "cfg-pem-0009",
]


def test_redact_config_keeps_layout_and_replaces_every_secret() -> None:
    out = redact_config(CONFIG)
    for secret in CONFIG_SECRETS:
        assert secret not in out
    assert out.startswith("# Tellus charger. Old platform token = ***\n[charger]\n")
    assert "  # multi-line array" not in out  # it was inside the secret value
    parsed = tomllib.loads(out)
    assert parsed["charger"] == {"serial_number": "TP-1", "state_dir": "/var/lib/charger-agent"}
    assert parsed["platform"] == {
        "url": "https://api.example.com/v1",
        "api_key": "***",
        "auth-token": "***",
        "proxy": {"host": "p.example", "password": "***"},
        "signatures": "***",
        "long_poll_wait_s": 30,
        "client": {"secret": "***"},
    }
    assert parsed["secrets"] == {"pin": "***"}
    assert parsed["connectors"] == [{"id": 1, "meter": {"driver": "acrel", "private_key": "***"}}]


def test_redact_config_rewrites_when_a_secret_would_survive_in_a_comment() -> None:
    text = 'password = "hunter2hunter2"\n# previously hunter2hunter2, changed in March\nport = 8\n'
    out = redact_config(text)
    assert "hunter2hunter2" not in out
    assert out.startswith("# config re-written after redaction")
    assert tomllib.loads(out) == {"password": "***", "port": 8}


def test_redact_config_refuses_text_that_is_not_toml() -> None:
    out = redact_config('token = "unterminated-secret\n')
    assert "unterminated-secret" not in out
    assert out.startswith("# config not included: not valid TOML")
