"""``charger-agent`` command line. Exit codes: 0 ok, 1 runtime failure, 2 bad usage or config."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from agent import __version__
from agent.config import ConfigError, LoadedConfig, load_config

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _load(args: argparse.Namespace) -> LoadedConfig:
    sim_root = getattr(args, "sim_root", None)
    loaded = load_config(args.config, sim_root=Path(sim_root) if sim_root else None)
    cfg = loaded.model
    if getattr(args, "platform_url", None):
        try:
            cfg.platform.url = args.platform_url
        except ValueError as exc:
            raise ConfigError([f"--platform-url: {exc.errors()[0]['msg'].removeprefix('Value error, ')}"]) from None  # type: ignore[attr-defined]
    if getattr(args, "ocpp_url", None):
        from agent.channels.ocpp.config import check_ocpp_url

        if cfg.ocpp is None:
            raise ConfigError([f"--ocpp-url: {loaded.path} has no [ocpp] section to override"])
        try:
            cfg.ocpp.url = check_ocpp_url(args.ocpp_url)
        except ValueError as exc:
            raise ConfigError([f"--ocpp-url: expected {exc}"]) from None
    if getattr(args, "state_dir", None):
        cfg.charger.state_dir = Path(args.state_dir)
    return loaded


def _setup_logging(loaded: LoadedConfig | None, args: argparse.Namespace) -> None:
    from agent.service import logs

    level = getattr(args, "log_level", None) or (loaded.model.logging.level if loaded else "info")
    fmt = loaded.model.logging.format if loaded else "auto"
    file = loaded.model.logging.file if loaded else None
    logs.configure(level=level, fmt=fmt, file=file)


def _run_until_signal(main: Callable[[asyncio.Event], Any]) -> Any:
    """Run ``main(stop_event)``; SIGINT/SIGTERM set the event instead of killing the loop."""

    async def runner() -> Any:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await main(stop)

    return asyncio.run(runner())


# ---------------------------------------------------------------------------- commands


def cmd_probe(args: argparse.Namespace) -> int:
    from agent.cli.probe import render_json, render_table, run_probe

    loaded = _load(args)
    _setup_logging(loaded, argparse.Namespace(log_level=args.log_level or "warning"))
    results = asyncio.run(run_probe(loaded, timeout_s=args.timeout))
    print(render_json(results) if args.json else render_table(results))
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILURE


def cmd_sim(args: argparse.Namespace) -> int:
    from agent.cli.sim import SimulatedCharger

    loaded = _load(args)
    _setup_logging(loaded, args)
    cfg = loaded.model
    root = loaded.sim_root or Path(cfg.sim.root if cfg.sim and cfg.sim.root else "/run/charger-sim")

    async def main(stop: asyncio.Event) -> int:
        async with SimulatedCharger(cfg, root) as sim:
            print(f"simulated charger running: files under {root}, control on http://127.0.0.1:{sim.control_port}", flush=True)
            for name, link in cfg.modbus.items():
                where = f"127.0.0.1:{link.tcp_port}" if link.transport == "tcp" else str(link.port)
                print(f"  modbus link {name}: {link.transport} {where}", flush=True)
            for name, bus in cfg.can.items():
                opts = f" options {bus.options}" if bus.options else ""
                print(f"  can bus {name}: {bus.interface} {bus.channel}{opts}", flush=True)
            await stop.wait()
        return EXIT_OK

    return int(_run_until_signal(main))


def cmd_emulator(args: argparse.Namespace) -> int:
    from agent.emulator.cli import main as emulator_main

    forwarded = list(args.emulator_args)
    if forwarded[:1] == ["--"]:  # `charger-agent emulator -- --port 8080`: argparse keeps the "--"
        forwarded = forwarded[1:]
    return int(emulator_main(forwarded))


def cmd_run(args: argparse.Namespace) -> int:
    from agent.firmware.boot import EXIT_UPGRADE_RESTART, check_boot

    loaded = _load(args)
    _setup_logging(loaded, args)
    # boot gate of a pending A/B upgrade, before the heavy imports (see agent.firmware.boot)
    decision = check_boot(loaded.model.firmware.install_root, loaded.model.charger.state_dir)
    if decision.action == "rolled_back":
        print(f"charger-agent: {decision.reason}; exiting so that the previous release starts", file=sys.stderr, flush=True)
        return EXIT_UPGRADE_RESTART
    from agent.runtime import run_agent

    return int(_run_until_signal(lambda stop: run_agent(loaded, stop)))


def cmd_demo(args: argparse.Namespace) -> int:
    if args.ocpp:
        from agent.cli.demo_ocpp import run_ocpp_demo

        return int(asyncio.run(run_ocpp_demo(Path(args.config), duration_s=min(args.duration, 20.0))))
    from agent.cli.demo import run_demo

    return int(asyncio.run(run_demo(Path(args.config), duration_s=args.duration)))


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="charger-agent",
        description="EV-charger firmware agent: hardware drivers, connector state machines, platform uplink.",
    )
    parser.add_argument("--version", action="version", version=f"charger-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", required=True, help="TOML config file (see config/)")
        p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override [logging] level")

    p = sub.add_parser("run", help="run the agent (charging, uplink, commands)")
    with_config(p)
    p.add_argument("--platform-url", help="API base ending in /v1 (overrides [platform] url)")
    p.add_argument("--ocpp-url", help="CSMS WebSocket URL (overrides [ocpp] url)")
    p.add_argument("--state-dir", help="state directory (overrides [charger] state_dir)")
    p.add_argument("--sim-root", help="simulator file root (overrides [sim] root)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("probe", help="read every configured device once and report (wiring check)")
    with_config(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, default=6.0, help="seconds each device gets to answer (default 6)")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("sim", help="run only the simulated devices of a config (bench on vcan0)")
    with_config(p)
    p.add_argument("--sim-root", help="simulator file root (overrides [sim] root)")
    p.set_defaults(func=cmd_sim)

    p = sub.add_parser("emulator", help="run the local platform emulator (see: charger-agent emulator -- --help)")
    p.add_argument("emulator_args", nargs=argparse.REMAINDER, help="arguments for the emulator")
    p.set_defaults(func=cmd_emulator)

    from agent.cli import sessions as sessions_cli, status as status_cli

    status_cli.add_parsers(sub)
    sessions_cli.add_parsers(sub)

    p = sub.add_parser("demo", help="emulator + agent on simulated hardware, with a live display")
    p.add_argument("--config", "-c", default="config/sim.toml")
    p.add_argument("--duration", type=float, default=25.0, help="seconds of charging before the stop command")
    p.add_argument("--ocpp", action="store_true", help="the OCPP 1.6-J channel against a local CSMS: card tap, transaction, remote stop")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
