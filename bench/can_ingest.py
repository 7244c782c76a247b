"""Benchmark: received power-module frames decoded and applied per second, on one core.

Feeds realistic answer frames straight into the driver's receive path
(``PowerModuleGroup.on_frame``: filter, decode, validate, update the module table) --
no bus, no python-can Notifier, no event-loop hop in the loop -- and reports the
median rate of several runs. From that it computes the CPU share a completely
saturated CAN bus would cost at 125 kbit/s and 1 Mbit/s.

Frame mix per module and poll cycle, as the drivers poll:

* InfyPower: answer to 0x03 (float V/I) and 0x04 (status + temperature);
* Winline: answers to registers 0x0001 (V), 0x0002 (A), 0x0040 (status), 0x0004 (T).

Bits per frame: an extended (29-bit ID) data frame with 8 data bytes is 131 bits on
the wire without stuff bits (SOF 1, ID 11+18, SRR 1, IDE 1, RTR 1, r1/r0 2, DLC 4,
data 64, CRC 15+1, ACK 2, EOF 7, intermission 3). Stuff bits only make frames longer
(up to about 160 bits), i.e. fewer frames per second; 131 bits is therefore the
worst case for the receiver and the figure used for the CPU share.

Usage: ``python bench/can_ingest.py [--modules 6] [--frames 200000] [--runs 5] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import can

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hal.can import infypower_codec as infy
from hal.can import winline_codec as wl
from hal.can.infypower import InfyPowerModules
from hal.can.modules_base import PowerModuleGroup
from hal.can.winline import WinlineModules
from hal.config import CanBusConfig
from hal.context import BuildContext

BITS_PER_FRAME = 131  # extended ID, 8 data bytes, no stuff bits (see module docstring)
BITS_PER_FRAME_STUFFED = 160  # about the longest such frame with worst-case stuffing
BITRATES = (125_000, 1_000_000)
CONTROLLER = 0xF0


def _context() -> BuildContext:
    config = CanBusConfig(interface="virtual", channel="bench-never-opened")
    return BuildContext(can={"main": config}, modbus={}, state_dir=Path(tempfile.gettempdir()))


def _message(arbitration_id: int, data: bytes) -> can.Message:
    return can.Message(arbitration_id=arbitration_id, data=data, is_extended_id=True)


def infypower_setup(modules: int) -> tuple[PowerModuleGroup, list[can.Message]]:
    addresses = list(range(modules))
    driver = InfyPowerModules(
        "bench", InfyPowerModules.Options(bus="main", group=1, addresses=addresses), _context()
    )
    for a in addresses:  # ratings known, as after start()
        driver.on_frame(_message(infy.response_id(infy.Cmd.READ_RATINGS, a, CONTROLLER),
                                 infy.encode_ratings(750, 150, 40.0, 20_000)))
    frames = []
    for step in range(500):  # varying values, so nothing is trivially cached
        for a in addresses:
            frames.append(_message(
                infy.response_id(infy.Cmd.READ_MODULE_VI_FLOAT, a, CONTROLLER),
                infy.encode_vi_float(400.0 + step * 0.1, 20.0 + a + step * 0.01)))
            frames.append(_message(
                infy.response_id(infy.Cmd.READ_STATUS, a, CONTROLLER),
                infy.encode_status(1, 30 + step % 20, {"walk_in"})))
    return driver, frames


def winline_setup(modules: int) -> tuple[PowerModuleGroup, list[can.Message]]:
    addresses = list(range(modules))
    driver = WinlineModules(
        "bench", WinlineModules.Options(bus="main", group=0, addresses=addresses), _context()
    )

    def answer(a: int, register: int, value: float) -> can.Message:
        return _message(wl.build_id(destination=CONTROLLER, source=a, group=0),
                        wl.encode_response(register, value))

    for a in addresses:
        driver.on_frame(answer(a, wl.Reg.RATED_POWER, 20_000.0))
        driver.on_frame(answer(a, wl.Reg.RATED_CURRENT, 40.0))
    frames = []
    for step in range(500):
        for a in addresses:
            frames.append(answer(a, wl.Reg.OUTPUT_VOLTAGE, 400.0 + step * 0.1))
            frames.append(answer(a, wl.Reg.OUTPUT_CURRENT, 20.0 + a + step * 0.01))
            frames.append(answer(a, wl.Reg.STATUS, 1 << 23 if step % 2 else 0))
            frames.append(answer(a, wl.Reg.DC_BOARD_TEMPERATURE, 30.0 + step % 20))
    return driver, frames


SETUPS = {"infypower": infypower_setup, "winline": winline_setup}


def measure(protocol: str, modules: int, frames_per_run: int, runs: int) -> dict[str, Any]:
    driver, frames = SETUPS[protocol](modules)
    feed = driver.on_frame
    cycles, rest = divmod(frames_per_run, len(frames))
    batch = frames * cycles + frames[:rest]
    for msg in frames:  # warm-up
        feed(msg)
    rates = []
    for _ in range(runs):
        began = time.perf_counter()
        for msg in batch:
            feed(msg)
        rates.append(len(batch) / (time.perf_counter() - began))
    garbage = driver.describe()["garbage_frames"]
    if garbage:
        raise RuntimeError(f"{protocol}: {garbage} benchmark frames were rejected as garbage")
    median = statistics.median(rates)
    return {
        "protocol": protocol,
        "modules": modules,
        "frames_per_run": len(batch),
        "runs": runs,
        "median_frames_per_s": round(median),
        "min_frames_per_s": round(min(rates)),
        "max_frames_per_s": round(max(rates)),
        "us_per_frame": round(1e6 / median, 3),
        "cpu_share_full_bus_percent": {
            str(bitrate): round(100.0 * bitrate / BITS_PER_FRAME / median, 2)
            for bitrate in BITRATES
        },
    }


def pin_to_one_core() -> int | None:
    """Run on a single CPU where the OS allows it; returns that CPU or None."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", type=int, default=6, help="modules per group (default 6)")
    parser.add_argument("--frames", type=int, default=200_000, help="frames per run")
    parser.add_argument("--runs", type=int, default=5, help="runs; the median is reported")
    parser.add_argument("--protocol", choices=[*SETUPS, "both"], default="both")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.modules < 1 or args.frames < 1 or args.runs < 1:
        parser.error("--modules, --frames and --runs must be positive")

    cpu = pin_to_one_core()
    protocols = list(SETUPS) if args.protocol == "both" else [args.protocol]
    results = [measure(p, args.modules, args.frames, args.runs) for p in protocols]
    bus_rates = {str(b): round(b / BITS_PER_FRAME, 1) for b in BITRATES}
    report = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "pinned_cpu": cpu,
        "bits_per_frame": BITS_PER_FRAME,
        "full_bus_frames_per_s": bus_rates,
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0

    print(f"CAN power-module receive path (python {report['python']}, {report['machine']}, "
          f"pinned to CPU {cpu})")
    print()
    print(f"{'protocol':<10} {'modules':>7} {'frames/run':>10} {'runs':>4} "
          f"{'median frames/s':>16} {'us/frame':>9}")
    for r in results:
        print(f"{r['protocol']:<10} {r['modules']:>7} {r['frames_per_run']:>10} {r['runs']:>4} "
              f"{r['median_frames_per_s']:>16,} {r['us_per_frame']:>9.2f}")
    print()
    print(f"CPU share of one core for a 100 % loaded bus, {BITS_PER_FRAME} bits/frame "
          f"(no stuff bits = most frames/s; ~{BITS_PER_FRAME_STUFFED} with worst-case stuffing):")
    header = f"{'bitrate':>11} {'frames/s':>9}" + "".join(f" {r['protocol']:>10}" for r in results)
    print(header)
    for bitrate in BITRATES:
        label = f"{bitrate // 1000} kbit/s" if bitrate < 1_000_000 else f"{bitrate // 1_000_000} Mbit/s"
        row = f"{label:>11} {bus_rates[str(bitrate)]:>9,.0f}"
        row += "".join(f" {r['cpu_share_full_bus_percent'][str(bitrate)]:>9.2f}%" for r in results)
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
