"""Agent footprint: the agent ALONE, idle / one connector charging / both charging.

    python bench/agent_footprint.py [--window 60] [--sample 10] [--json] [--keep]

Setup: the two-process bench of ``config/bench-udp.toml`` (a copy with its own multicast
port, loopback ports and directories). The simulated charger runs in its own process
(``charger-agent sim``), the platform emulator in this one, and the agent as
``charger-agent run`` with ``$NOTIFY_SOCKET`` pointing at a datagram socket this script
reads (as systemd would), so the figures are the agent process only: CAN over
``udp_multicast``, Modbus over loopback TCP, contactor/pilot/hwmon files.

Measured, in this order:

* **READY**: from just before the agent's exec to its ``READY=1`` datagram;
* **idle**: both vehicles plugged in and waiting (no session), after the plug-in burst;
* **one charging**: ``start_charging`` on connector 1 (DC), once its telemetry says charging;
* **two charging**: then connector 2 (AC) too;
* **import time**: ``import agent.cli.main, agent.runtime`` in a fresh interpreter (median of
  5), beside the interpreter's own start-up.

Each state is measured for ``--window`` seconds, sampled every ``--sample`` seconds from
/proc/<pid>/stat (utime + stime, all threads) and /proc/<pid>/status (VmRSS). Reported:
the median of the per-sample CPU shares (percent of one core) and the median RSS (MiB).
Goals on the build machine (not asserted anywhere): idle <= 0.5 %, two charging <= 1.5 %,
RSS <= 45 MiB, READY <= 1.5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _agent_proc import (
    ROOT,
    AgentUnderTest,
    BenchFailed,
    describe_source,
    filesystem_of,
    quiet_logs,
    source_state,
)

from agent.emulator.operator_models import RequestKind

BENCH_UDP = ROOT / "config" / "bench-udp.toml"
CLK_TCK = os.sysconf("SC_CLK_TCK")
GOALS = {"idle": 0.5, "two_charging": 1.5, "rss_mib": 45.0, "ready_s": 1.5}


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def derive_config(workdir: Path) -> Path:
    """bench-udp.toml with this run's own multicast group/port, loopback ports and dirs."""
    text = BENCH_UDP.read_text()
    replacements = [
        (r'^channel = "239\.[0-9.]+"', f'channel = "239.74.{random.randrange(1, 255)}.{random.randrange(1, 255)}"'),
        (r"options = \{ port = \d+, hop_limit = 0 \}",
         f"options = {{ port = {_free_port(socket.SOCK_DGRAM)}, hop_limit = 0 }}"),
        (r"^tcp_port = 15030", f"tcp_port = {_free_port()}"),
        (r"^tcp_port = 15031", f"tcp_port = {_free_port()}"),
        (r"^control_port = \d+", f"control_port = {_free_port()}"),
        (r'^root = "/tmp/charger-sim-udp"', f'root = "{workdir / "sim"}"'),
        (r'^state_dir = "[^"]*"', f'state_dir = "{workdir / "state"}"'),
    ]
    for pattern, value in replacements:
        text, n = re.subn(pattern, value, text, count=1, flags=re.M)
        if n != 1:
            raise BenchFailed(f"config/bench-udp.toml no longer matches {pattern!r}")
    path = workdir / "bench-udp.toml"
    path.write_text(text)
    return path


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), seconds."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def telemetry_states(aut: AgentUnderTest) -> dict[int, str]:
    states: dict[int, str] = {}
    for r in aut.emulator.received(kind=RequestKind.TELEMETRY):
        for b in r.body if isinstance(r.body, list) else [r.body]:
            if r.accepted and isinstance(b, dict) and "connector_id" in b:
                states[int(b["connector_id"])] = str(b.get("state"))
    return states


async def sample_state(aut: AgentUnderTest, window: float, step: float) -> dict[str, Any]:
    """CPU share per ``step`` and RSS over ``window`` seconds; medians."""
    pid = aut.pid
    shares: list[float] = []
    rss: list[float] = []
    t_prev, c_prev = time.monotonic(), cpu_seconds(pid)
    end = t_prev + window
    while time.monotonic() < end - 1e-3:
        await asyncio.sleep(min(step, end - time.monotonic()))
        if aut.proc is not None and aut.proc.returncode is not None:
            raise BenchFailed(f"the agent exited during the measurement; log: {aut.log_path}")
        t, c = time.monotonic(), cpu_seconds(pid)
        shares.append((c - c_prev) / (t - t_prev) * 100.0)
        rss.append(rss_mib(pid))
        t_prev, c_prev = t, c
    return {
        "cpu_pct_median": statistics.median(shares),
        "cpu_pct_samples": [round(x, 3) for x in shares],
        "rss_mib_median": statistics.median(rss),
        "rss_mib_max": max(rss),
    }


def import_time(runs: int = 5) -> dict[str, float]:
    """Median wall time of a bare interpreter and of importing what ``run`` imports."""

    def timed(code: str) -> float:
        out = subprocess.run(
            [sys.executable, "-c", f"import time; t = time.perf_counter(); {code}; print(time.perf_counter() - t)"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout
        return float(out.strip().splitlines()[-1])

    def startup() -> float:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        return time.perf_counter() - t

    return {
        "interpreter_s": statistics.median(startup() for _ in range(runs)),
        "import_s": statistics.median(timed("import agent.cli.main, agent.runtime") for _ in range(runs)),
    }


class NotifyListener:
    """The ``$NOTIFY_SOCKET`` end: records when each sd_notify message arrived."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.ready_at: float | None = None
        self.messages: list[str] = []

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._read)

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            text = data.decode(errors="replace")
            self.messages.append(text)
            if self.ready_at is None and "READY=1" in text.splitlines():
                self.ready_at = time.monotonic()

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


def runtime_directory(workdir: Path) -> Path:
    """A directory on a tmpfs, as systemd's ``/run/charger-agent`` is."""
    for base in (Path("/run"), Path("/dev/shm")):
        if base.is_dir() and filesystem_of(base) == "tmpfs" and os.access(base, os.W_OK):
            return Path(tempfile.mkdtemp(prefix="charger-footprint-", dir=base))
    path = workdir / "run"
    path.mkdir()
    return path


async def start_simulator(config: Path, workdir: Path) -> asyncio.subprocess.Process:
    log = (workdir / "sim.log").open("w")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "sim", "--config", str(config), "--log-level", "warning",
        stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL, cwd=str(ROOT),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 30
    while "can bus modules" not in (workdir / "sim.log").read_text():
        if proc.returncode is not None or time.monotonic() > deadline:
            raise BenchFailed(f"the simulator did not start; log: {workdir / 'sim.log'}")
        await asyncio.sleep(0.05)
    return proc


async def measure(window: float, step: float, keep: bool) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="charger-footprint-"))
    config = derive_config(workdir)
    sim = await start_simulator(config, workdir)
    notify = NotifyListener(workdir / "notify.sock")
    notify.start()
    result: dict[str, Any] = {}
    measured = False
    try:
        # as systemd runs it: sd_notify socket and RuntimeDirectory= on a tmpfs (the 1 s
        # snapshot goes there); /dev/shm stands in for /run where /run is not a tmpfs
        runtime_dir = runtime_directory(workdir)
        result["runtime_dir"] = f"{runtime_dir} ({filesystem_of(runtime_dir)})"
        env = {"NOTIFY_SOCKET": str(notify.path), "RUNTIME_DIRECTORY": str(runtime_dir)}
        async with AgentUnderTest(config=config, workdir=workdir, keep=keep, extra_env=env) as aut:
            await aut.until("READY=1 from the agent", lambda: notify.ready_at is not None, 60, 0.01)
            assert aut.exec_at is not None and notify.ready_at is not None
            result["ready_s"] = notify.ready_at - aut.exec_at
            await aut.wait_registered()
            await aut.wait_plugged(1)
            await aut.wait_plugged(2)
            await asyncio.sleep(5.0)  # the plug-in burst (events, telemetry) passes
            result["idle"] = await sample_state(aut, window, step)
            store = aut.emulator.context.store
            for cid, key in ((1, "one_charging"), (2, "two_charging")):
                command = aut.emulator.queue_command(
                    command="start_charging", connector_id=cid, params={"transaction_id": f"bench-{cid}"}
                )
                await aut.until(
                    f"start_charging accepted on connector {cid}",
                    lambda c=command: any(s.status == "accepted" for s in store.command(c).statuses), 60,
                )
                await aut.until(
                    f"telemetry 'charging' on connector {cid}",
                    lambda c=cid: telemetry_states(aut).get(c) == "charging", 90,
                )
                await asyncio.sleep(3.0)  # the session-start burst passes
                result[key] = await sample_state(aut, window, step)
            result["charging_at_end"] = telemetry_states(aut)
            result["rss_mib_end"] = rss_mib(aut.pid)
        measured = True
    finally:
        notify.close()
        if "runtime_dir" in result and not str(result["runtime_dir"]).startswith(str(workdir)):
            shutil.rmtree(str(result["runtime_dir"]).split(" (")[0], ignore_errors=True)
        if sim.returncode is None:
            sim.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(sim.wait(), 20)
            except TimeoutError:
                sim.kill()
                await sim.wait()
        # only once the simulator has stopped writing its files; a failed run keeps its logs
        if measured and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    result["workdir"] = str(workdir) if keep else None
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window", type=float, default=60.0, help="seconds per state (default 60)")
    parser.add_argument("--sample", type=float, default=10.0, help="CPU sample length, s (default 10)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, state, config)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    quiet_logs()
    source = source_state()
    try:
        r = asyncio.run(measure(args.window, args.sample, args.keep))
    except BenchFailed as exc:
        print(f"BENCHMARK FAILED: {exc}", file=sys.stderr)
        return 1
    r["imports"] = import_time()
    meta = {
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "filesystem": filesystem_of(Path(tempfile.gettempdir())),
        "loadavg_end": os.getloadavg(),
        "agent_source": source,
    }
    if args.json:
        print(json.dumps({"meta": meta, "result": r}, indent=2))
        return 0
    print(
        f"agent_footprint: the agent alone (simulator in its own process, CAN over udp_multicast, "
        f"Modbus over loopback TCP); {args.window:g} s per state, {args.sample:g} s samples; "
        f"Python {meta['python']}, {meta['cpus']} CPUs, load {meta['loadavg_end'][0]:.2f}; "
        f"{describe_source(source)}"
    )
    print(f"{'state':<34}{'CPU % of one core':>18}{'RSS MiB':>10}   goal")
    for key, label, goal in (
        ("idle", "idle (both plugged, waiting)", f"<= {GOALS['idle']} %"),
        ("one_charging", "one connector charging (DC)", ""),
        ("two_charging", "two connectors charging (DC + AC)", f"<= {GOALS['two_charging']} %"),
    ):
        s = r[key]
        print(f"{label:<34}{s['cpu_pct_median']:>18.2f}{s['rss_mib_median']:>10.1f}   {goal}"
              f"   (samples {s['cpu_pct_samples']})")
    print(f"{'RSS max over all states':<34}{'':>18}{max(r[k]['rss_mib_max'] for k in ('idle', 'one_charging', 'two_charging')):>10.1f}   <= {GOALS['rss_mib']} MiB")
    print(f"{'start to READY=1':<34}{r['ready_s']:>17.2f}s{'':>10}   <= {GOALS['ready_s']} s")
    imp = r["imports"]
    print(f"{'import agent.cli.main + runtime':<34}{imp['import_s']:>17.3f}s   (bare interpreter start {imp['interpreter_s']:.3f} s)")
    charging = r["charging_at_end"]
    ok = charging.get(1) == "charging" and charging.get(2) == "charging"
    print(f"{'both still charging at the end':<34}{'yes' if ok else 'NO':>18}")
    print(f"status snapshot written to {r.get('runtime_dir')}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
