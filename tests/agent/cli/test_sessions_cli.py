"""``charger-agent sessions list|show``: tables, CSV, JSON, PNG plots and exit codes."""

from __future__ import annotations

import argparse
import csv
import io
import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.maintenance.archive import ArchiveConfig, SessionArchive
from agent.cli.sessions import CSV_COLUMNS, add_parsers, format_duration, main

ROOT = Path(__file__).resolve().parents[3]
T0 = 1_699_999_980.0
DAY = 86_400.0
FULL = "11111111-2222-4333-8444-555555555555"
OLD = "99999999-2222-4333-8444-000000000000"
TWIN_A = "abcd0000-0000-4000-8000-000000000001"
TWIN_B = "abcd0000-0000-4000-8000-000000000002"


@pytest.fixture
async def state(tmp_path: Path) -> Path:
    """An archive with a 20-minute session at 1 s, one reduced to its summary and two twins."""
    a = await SessionArchive.open(tmp_path, ArchiveConfig())
    try:
        await a.begin_session(OLD, 2, T0 - 100 * DAY, "charge")
        for i in range(120):
            a.add_sample(OLD, 2, T0 - 100 * DAY + i, 7.0, 230.0, 30.0, None, None, 0.002 * i)
        await a.end_session(OLD, {"stop_reason": "ev_disconnected"})
        await a.compact(T0)  # OLD is now summary only

        await a.begin_session(FULL, 1, T0, "charge")
        for i in range(1200):
            power = 50.0 if i < 900 else 50.0 - (i - 900) / 10.0
            a.add_sample(FULL, 1, T0 + i, power, 400.0, power * 2.5, 20 + i / 20.0, 35.0 + i / 100.0, i * 0.0125)
        await a.end_session(FULL, {"stop_reason": "soc_target_reached"})
        for n, rid in enumerate((TWIN_A, TWIN_B)):
            await a.begin_session(rid, 1, T0 + 2 * DAY + n * 3600, "charge")
            a.add_sample(rid, 1, T0 + 2 * DAY + n * 3600, 11.0, 230.0, 16.0, None, None, 0.0)
        await a.end_session(TWIN_A, {"stop_reason": "remote_stop"})
        # TWIN_B stays open, as while the agent is charging
    finally:
        await a.close()
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what came before (e.g. the archive's log lines)
    code = main(["sessions", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_add_parsers_plugs_into_an_existing_cli() -> None:
    parser = argparse.ArgumentParser(prog="charger-agent")
    sub = parser.add_subparsers(dest="command")
    add_parsers(sub)
    args = parser.parse_args(["sessions", "show", "abc", "--state-dir", "/x", "--csv"])
    assert args.command == "sessions" and args.record_id == "abc" and args.csv and callable(args.func)


def test_format_duration() -> None:
    assert [format_duration(x) for x in (None, 45, 725, 3723.4)] == ["-", "45s", "12m05s", "1h02m03s"]


def test_list_is_a_readable_table(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "list", "--state-dir", str(state))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["RECORD", "ID", "CONN", "START", "(UTC)", "DURATION", "kWh", "MAX", "kW", "STOP", "REASON", "KEPT"]
    body = lines[2:]
    assert [line.split()[0] for line in body] == [TWIN_B, TWIN_A, FULL, OLD]  # newest first
    full = next(line for line in body if line.startswith(FULL)).split()
    assert full[1:] == ["1", "2023-11-14T22:13:00Z", "19m59s", "14.988", "50.0", "soc_target_reached", "1s"]
    old = next(line for line in body if line.startswith(OLD)).split()
    assert old[-2:] == ["ev_disconnected", "summary"]
    assert "(open)" in next(line for line in body if line.startswith(TWIN_B))


def test_list_limit_and_json(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "list", "--state-dir", str(state), "--limit", "2", "--json")
    assert code == 0
    data = json.loads(out)
    assert [d["record_id"] for d in data] == [TWIN_B, TWIN_A]
    assert data[1]["start_time"] == "2023-11-16T22:13:00Z" and data[1]["resolution"] == "1s"
    assert data[0]["end_time"] is None


def test_list_with_a_config_file_finds_the_state_dir(
    state: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (ROOT / "config" / "sim.toml").read_text()
    assert 'state_dir = "state/sim"' in text
    config = tmp_path_factory.mktemp("cfg") / "agent.toml"
    config.write_text(text.replace('state_dir = "state/sim"', f'state_dir = "{state}"'))
    code, out, _ = run(capsys, "list", "--config", str(config))
    assert code == 0 and FULL in out


def test_bad_config_and_bad_usage_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[charger]\nserial_number = 1\n")
    code, _, err = run(capsys, "list", "--config", str(bad))
    assert code == 2 and str(bad) in err
    assert run(capsys, "list")[0] == 2  # neither --config nor --state-dir
    assert run(capsys, "list", "--state-dir", "x", "--config", "y")[0] == 2
    assert run(capsys, "list", "--state-dir", "x", "--limit", "0")[0] == 2
    assert run(capsys, "show", "--state-dir", "x")[0] == 2  # no record id
    assert run(capsys, "show", "r", "--state-dir", "x", "--csv", "--json")[0] == 2


def test_missing_archive_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "list", "--state-dir", str(tmp_path))
    assert code == 1 and "no session archive" in err
    assert not list(tmp_path.iterdir())


def test_show_prints_summary_and_first_and_last_samples(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "show", FULL, "--state-dir", str(state))
    assert code == 0
    assert f"record id     {FULL}" in out
    assert "energy        14.988 kWh" in out and "stop reason   soc_target_reached" in out
    assert "soc           20 -> 80 %" in out and "kept          1s (1200 samples at 1 s, 0 1-minute means)" in out
    assert "first 5 and last 5 of 1200" in out and "(1190 more)" in out
    assert "2023-11-14T22:13:00Z" in out and "2023-11-14T22:32:59Z" in out


def test_show_accepts_a_unique_prefix(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "show", OLD[:8], "--state-dir", str(state))
    assert code == 0 and OLD in out and "no samples kept (summary only)" in out


def test_show_unknown_record_exits_1_and_ambiguous_prefix_2(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "show", "no-such-record", "--state-dir", str(state))
    assert code == 1 and "no archived session" in err
    code, _, err = run(capsys, "show", "abcd", "--state-dir", str(state))
    assert code == 2 and TWIN_A in err and TWIN_B in err


def test_show_csv_has_every_sample_and_only_csv(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "show", FULL, "--state-dir", str(state), "--csv")
    assert code == 0
    rows = list(csv.reader(io.StringIO(out)))
    assert tuple(rows[0]) == CSV_COLUMNS == (
        "t_unix", "time_utc", "resolution", "power_kw", "voltage", "current", "soc", "temperature", "energy_kwh",
    )
    assert len(rows) == 1 + 1200
    first = dict(zip(rows[0], rows[1]))
    assert first == {
        "t_unix": "1699999980.000", "time_utc": "2023-11-14T22:13:00Z", "resolution": "1s", "power_kw": "50",
        "voltage": "400", "current": "125", "soc": "20", "temperature": "35", "energy_kwh": "0",
    }
    assert dict(zip(rows[0], rows[-1]))["energy_kwh"] == "14.988"


def test_show_csv_leaves_unknown_values_empty(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "show", TWIN_A, "--state-dir", str(state), "--csv")
    row = dict(zip(*list(csv.reader(io.StringIO(out)))))
    assert code == 0 and row["soc"] == "" and row["temperature"] == "" and row["power_kw"] == "11"


async def test_show_csv_keeps_full_precision(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = await SessionArchive.open(tmp_path, ArchiveConfig())
    a.add_sample("big", 1, T0, 349.987, 987.6, 354.37, 99.9, -12.3, 1234.567)
    await a.close()
    code, out, _ = run(capsys, "show", "big", "--state-dir", str(tmp_path), "--csv")
    row = dict(zip(*list(csv.reader(io.StringIO(out)))))
    assert code == 0 and (row["power_kw"], row["voltage"], row["current"]) == ("349.987", "987.6", "354.37")
    assert (row["soc"], row["temperature"], row["energy_kwh"]) == ("99.9", "-12.3", "1234.567")


def test_show_json(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "show", FULL, "--state-dir", str(state), "--json")
    data: dict[str, Any] = json.loads(out)
    assert code == 0 and data["session"]["record_id"] == FULL
    assert data["session"]["summary"]["stop_reason"] == "soc_target_reached"
    assert len(data["samples"]) == 1200 and data["samples"][0]["resolution"] == "1s"
    assert data["samples"][-1]["time_utc"] == "2023-11-14T22:32:59Z"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def test_show_plot_writes_a_png(state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "curve.png"
    code, out, err = run(capsys, "show", FULL, "--state-dir", str(state), "--csv", "--plot", str(target))
    assert code == 0 and f"plot written to {target}" in err
    assert out.startswith("t_unix,")  # stdout stays a clean CSV stream
    assert png_size(target) == (1000, 700) and target.stat().st_size > 20_000


def test_plot_of_a_summary_only_session_exits_1(state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "none.png"
    code, _, err = run(capsys, "show", OLD, "--state-dir", str(state), "--plot", str(target))
    assert code == 1 and "no samples" in err and not target.exists()


def test_plot_into_a_missing_directory_exits_1(state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "show", FULL, "--state-dir", str(state), "--plot", str(tmp_path / "no" / "x.png"))
    assert code == 1 and "cannot write" in err


def test_plot_without_matplotlib_says_how_to_install_it(
    state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    code, _, err = run(capsys, "show", FULL, "--state-dir", str(state), "--plot", str(tmp_path / "x.png"))
    assert code == 1 and "pip install 'charger-agent[plot]'" in err


async def test_cli_reads_while_the_agent_is_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = await SessionArchive.open(tmp_path, ArchiveConfig())
    try:
        await a.begin_session(FULL, 1, T0, "charge")
        for i in range(30):
            a.add_sample(FULL, 1, T0 + i, 20.0, 400.0, 50.0, 50.0, 30.0, i * 0.005)
        await a.flush()
        code, out, _ = run(capsys, "list", "--state-dir", str(tmp_path))
        assert code == 0 and "(open)" in out
        a.add_sample(FULL, 1, T0 + 30, 20.0, 400.0, 50.0, 50.0, 30.0, 0.15)
        await a.flush()
        code, out, _ = run(capsys, "show", FULL, "--state-dir", str(tmp_path), "--csv")
        assert code == 0 and len(out.splitlines()) == 1 + 31
    finally:
        await a.close()
