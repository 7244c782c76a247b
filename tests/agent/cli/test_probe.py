"""`charger-agent probe` against the simulated charger: real drivers, real transports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from agent.config import load_config
from agent.cli.probe import render_table, run_probe

ROOT = Path(__file__).resolve().parents[3]


def test_probe_json_reads_every_simulated_device() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "probe", "--config", str(ROOT / "config/sim.toml"), "--json"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    kinds = sorted(d["kind"] for d in report["devices"])
    assert kinds == [
        "bidirectional", "contactor", "contactor", "imd", "meter", "meter", "power_modules", "thermal", "vehicle", "vehicle"
    ]
    by_name = {d["name"]: d for d in report["devices"]}
    modules = by_name["connector1.modules"]["readings"]["modules"]
    assert [m["address"] for m in modules] == [0, 1] and all(m["online"] for m in modules)
    assert by_name["connector2.meter"]["readings"]["phases"][0]["voltage"] > 200
    assert by_name["imd.dc1"]["readings"]["resistance_kohm"] > 1000
    assert by_name["thermal"]["readings"]["fans"]["cabinet"]["rpm"] > 0


async def test_a_silent_device_is_reported_while_the_others_are_read() -> None:
    loaded = load_config(ROOT / "config/sim.toml")

    def silence(sim: Any) -> None:
        sim.inject("meter_silence", connector=2)
        sim.inject("module_silence", connector=1, module=1)

    results = await run_probe(loaded, timeout_s=3.0, on_simulator=silence)
    by_name = {r.name: r for r in results}
    assert not by_name["connector2.meter"].ok
    assert "comm_timeout" in (by_name["connector2.meter"].reason or "") or "stale" in (by_name["connector2.meter"].reason or "")
    assert by_name["connector1.meter"].ok and by_name["imd.dc1"].ok and by_name["thermal"].ok
    modules = by_name["connector1.modules"]
    assert not modules.ok and "not answering" in (modules.reason or "")
    assert [m["online"] for m in modules.readings["modules"]] == [True, False]
    text = render_table(results)
    assert "FAIL connector2.meter" in text and "devices answered healthy" in text
