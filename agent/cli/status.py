"""``charger-agent status`` and ``charger-agent service-mode``: the technician's view on site.

Both run beside the agent (a separate process) and only touch files in the agent's
state directory, found from ``--state-dir DIR``, else ``--config FILE``'s
``[charger] state_dir``, else the default ``/var/lib/charger-agent``.

``status [--json] [--watch [SECONDS]]``
    Prints the agent's snapshot (:mod:`agent.service.status`) as a table, or ``--json`` as
    one JSON object: the snapshot plus ``running`` (bool) and ``age_s``; with no
    snapshot at all ``{"running": false, "age_s": null, "status_file": ..., "error": ...}``.
    ``--watch`` refreshes every SECONDS (default 2): on a terminal it redraws in
    place, into a pipe it appends (tables separated by a blank line; ``--json``: one
    object per line), until Ctrl-C or SIGTERM, then exits 0. A stale or missing
    snapshot is shown as "agent not running" and the watch goes on.

``service-mode on [--minutes N] | off | status [--json]``
    ``on`` writes ``service-mode.json`` (N default 30, 1..480), ``off`` removes it,
    ``status`` shows the file and, when the agent runs, the agent's view (key switch
    included).

Exit codes: 0 ok; 1 agent not running / snapshot stale (``status`` without
``--watch``, ``service-mode status``), or the state directory is not readable or
writable; 2 bad usage or config.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from agent.config import ChargerSection, ConfigError, load_config
from agent.maintenance.service_mode import DEFAULT_MINUTES, MAX_MINUTES, read_file, set_off, set_on
from agent.service.status import fmt_age, is_stale, read_status, render_table, status_path
from agent.utctime import to_iso

EXIT_OK, EXIT_NOT_RUNNING, EXIT_USAGE = 0, 1, 2
DEFAULT_WATCH_S = 2.0
MIN_WATCH_S = 0.1
DEFAULT_STATE_DIR = Path(ChargerSection.model_fields["state_dir"].default)
CLEAR_SCREEN = "\x1b[H\x1b[2J"


# ---------------------------------------------------------------------------- arguments


def _watch_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= MIN_WATCH_S:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"expected at least {MIN_WATCH_S} seconds, got {text!r}")
    return value


def _minutes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole minutes, got {text!r}") from None
    if not 1 <= value <= MAX_MINUTES:
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_MINUTES} minutes, got {value}")
    return value


def _location_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--config", "-c", metavar="FILE", help="agent TOML config (its [charger] state_dir is used)")
    group.add_argument("--state-dir", metavar="DIR", help=f"agent state directory (default {DEFAULT_STATE_DIR})")


def add_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``status`` and ``service-mode`` to ``charger-agent``'s sub-commands.

    Each sets ``func`` to a callable ``(args) -> int`` returning the exit code.
    """
    p = subparsers.add_parser(
        "status", help="show the running agent: connectors, faults, component health, uplink"
    )
    _location_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--watch",
        nargs="?",
        const=DEFAULT_WATCH_S,
        type=_watch_interval,
        metavar="SECONDS",
        help=f"refresh every SECONDS (default {DEFAULT_WATCH_S:g}) until Ctrl-C",
    )
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser(
        "service-mode", help="turn local service mode on/off (allows calibrate_sensor) or show it"
    )
    _location_args(p)
    p.add_argument("action", choices=["on", "off", "status"])
    p.add_argument(
        "--minutes",
        type=_minutes,
        metavar="N",
        help=f"with 'on': minutes until it turns itself off (default {DEFAULT_MINUTES}, max {MAX_MINUTES})",
    )
    p.add_argument("--json", action="store_true", help="with 'status': machine-readable output")
    p.set_defaults(func=cmd_service_mode)


def resolve_state_dir(args: argparse.Namespace) -> Path:
    """``--state-dir``, else the config's ``[charger] state_dir``, else the default.

    Raises :class:`ConfigError` for a config that cannot be loaded.
    """
    if getattr(args, "state_dir", None):
        return Path(args.state_dir)
    if getattr(args, "config", None):
        # a placeholder sim root: only state_dir is needed, and without it a config using
        # {sim_root} with an empty [sim] root would create a temporary directory per call
        loaded = load_config(args.config, sim_root=Path(tempfile.gettempdir()) / "charger-sim-unused")
        return Path(loaded.model.charger.state_dir)
    return DEFAULT_STATE_DIR


def _config_problem(exc: ConfigError) -> int:
    for line in exc.problems:
        print(line, file=sys.stderr)
    return EXIT_USAGE


# ---------------------------------------------------------------------------- status


def _snapshot(state_dir: Path) -> tuple[dict[str, Any] | None, float | None, str | None]:
    """``(snapshot, age_s, problem)``; ``problem`` says why the agent is not shown as running."""
    path = status_path(state_dir)
    try:
        snapshot, age = read_status(state_dir)
    except PermissionError:
        return None, None, f"cannot read {path}: permission denied (run with sudo or as the agent's group)"
    except OSError as exc:
        return None, None, f"cannot read {path}: {exc.strerror or exc}"
    if snapshot is None:
        if age is None:
            return None, None, f"agent not running (no status snapshot at {path})"
        return None, age, f"agent not running (unreadable status snapshot at {path}, {fmt_age(age)} old)"
    if is_stale(age):
        seen = snapshot.get("taken_at_iso") or "unknown time"
        ago = f", {fmt_age(age)} ago" if age is not None else ""
        return snapshot, age, f"agent not running (last seen {seen}{ago})"
    return snapshot, age, None


def _json_document(state_dir: Path, snapshot: dict[str, Any] | None, age: float | None, problem: str | None) -> dict[str, Any]:
    doc: dict[str, Any] = dict(snapshot or {})
    doc["running"] = problem is None
    doc["age_s"] = None if age is None else round(age, 3)
    doc["status_file"] = str(status_path(state_dir))
    if problem is not None:
        doc["error"] = problem
    return doc


def _frame(state_dir: Path, as_json: bool) -> tuple[str, bool]:
    """One rendering: ``(text, running)``."""
    snapshot, age, problem = _snapshot(state_dir)
    if as_json:
        return json.dumps(_json_document(state_dir, snapshot, age, problem), separators=(",", ":")), problem is None
    if problem is not None or snapshot is None:
        return f"charger-agent: {problem}", False
    return render_table(snapshot, age_s=age), True


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def watch(state_dir: Path, interval_s: float, *, as_json: bool, out: TextIO) -> int:
    """Refresh until Ctrl-C/SIGTERM (exit 0) or a closed pipe (exit 0)."""
    tty = out.isatty()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            text, _running = _frame(state_dir, as_json)
            if as_json:
                out.write(text + "\n")
            elif tty:
                stamp = time.strftime("%H:%M:%S")
                out.write(f"{CLEAR_SCREEN}every {interval_s:g} s, Ctrl-C to quit   {stamp}\n\n{text}\n")
            else:
                out.write(text + "\n\n")
            out.flush()
            time.sleep(interval_s)
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        # the reader went away (`status --watch | head`): stop quietly; point the fd at
        # /dev/null so the interpreter's final flush does not raise again
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out.fileno())
            os.close(devnull)
        return EXIT_OK
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_status(args: argparse.Namespace) -> int:
    try:
        state_dir = resolve_state_dir(args)
    except ConfigError as exc:
        return _config_problem(exc)
    if args.watch is not None:
        return watch(state_dir, args.watch, as_json=args.json, out=sys.stdout)
    text, running = _frame(state_dir, args.json)
    print(text, file=sys.stdout if running or args.json else sys.stderr)
    return EXIT_OK if running else EXIT_NOT_RUNNING


# ---------------------------------------------------------------------------- service mode


def _agent_service_view(state_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The running agent's ``service_mode`` status, or ``(None, why not)``."""
    snapshot, _age, problem = _snapshot(state_dir)
    if problem is not None or snapshot is None:
        return None, problem
    view = snapshot.get("service_mode")
    return (view if isinstance(view, dict) else None), None


def _service_on(state_dir: Path, minutes: int) -> int:
    try:
        content = set_on(state_dir, minutes)
    except OSError as exc:
        print(f"charger-agent: cannot write service mode in {state_dir}: {exc.strerror or exc} (run with sudo?)", file=sys.stderr)
        return EXIT_NOT_RUNNING
    print(f"service mode ON until {to_iso(content.until)} ({minutes} min), by {content.by}")
    _view, problem = _agent_service_view(state_dir)
    if problem is not None:
        print(f"note: {problem}; it applies service mode when it starts", file=sys.stderr)
    return EXIT_OK


def _service_off(state_dir: Path) -> int:
    try:
        existed = set_off(state_dir)
    except OSError as exc:
        print(f"charger-agent: cannot remove the service-mode file in {state_dir}: {exc.strerror or exc} (run with sudo?)", file=sys.stderr)
        return EXIT_NOT_RUNNING
    print("service mode OFF" if existed else "service mode was not on (no service-mode file)")
    view, _problem = _agent_service_view(state_dir)
    if view is not None and view.get("key_switch"):
        print("note: the key switch is on and still holds service mode ON", file=sys.stderr)
    return EXIT_OK


def _service_status(state_dir: Path, as_json: bool) -> int:
    now = time.time()
    content, error = read_file(state_dir)
    active = content is not None and content.effective_until > now
    view, problem = _agent_service_view(state_dir)
    file_doc: dict[str, Any] = {
        "active": active,
        "until": content.effective_until if content else None,
        "until_iso": to_iso(content.effective_until) if content else None,
        "by": content.by if content else None,
        "at": content.at if content else None,
        "error": error,
    }
    on = bool(view.get("on")) if view is not None else active
    if as_json:
        doc = {"on": on, "agent_running": problem is None, "file": file_doc, "agent": view}
        if problem is not None:
            doc["error"] = problem
        print(json.dumps(doc, separators=(",", ":")))
        return EXIT_OK if problem is None else EXIT_NOT_RUNNING

    print(f"service mode: {'ON' if on else 'OFF'}" + ("" if problem is None else " (from the file only: agent not running)"))
    if content is not None:
        state = f"{fmt_age(content.effective_until - now)} left" if active else "expired"
        print(f"  file: until {file_doc['until_iso']} ({state}), by {content.by}")
    elif error is not None:
        print(f"  file: ignored: {error}")
    else:
        print("  file: none")
    if view is not None:
        key = view.get("key_switch")
        key_text = "not configured" if key is None else ("ON" if key else "off")
        if view.get("key_switch_error"):
            key_text += f" (unreadable: {view['key_switch_error']})"
        print(f"  key switch: {key_text}")
    if problem is not None:
        print(f"charger-agent: {problem}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    return EXIT_OK


def cmd_service_mode(args: argparse.Namespace) -> int:
    if args.minutes is not None and args.action != "on":
        print("charger-agent: --minutes is only valid with 'service-mode on'", file=sys.stderr)
        return EXIT_USAGE
    if args.json and args.action != "status":
        print("charger-agent: --json is only valid with 'service-mode status'", file=sys.stderr)
        return EXIT_USAGE
    try:
        state_dir = resolve_state_dir(args)
    except ConfigError as exc:
        return _config_problem(exc)
    if args.action == "on":
        return _service_on(state_dir, args.minutes or DEFAULT_MINUTES)
    if args.action == "off":
        return _service_off(state_dir)
    return _service_status(state_dir, args.json)


# ---------------------------------------------------------------------------- standalone


def main(argv: list[str] | None = None) -> int:
    """``python -m agent.cli.status status|service-mode ...`` (same as ``charger-agent``)."""
    parser = argparse.ArgumentParser(prog="charger-agent")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_parsers(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
