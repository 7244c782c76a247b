"""``charger-agent sessions``: read the per-session telemetry archive (:mod:`agent.maintenance.archive`).

::

    charger-agent sessions list [--limit N] [--json]                  (--config FILE | --state-dir DIR)
    charger-agent sessions show RECORD_ID [--csv | --json] [--plot FILE.png]  (--config FILE | --state-dir DIR)

The archive is opened read-only, so both commands are safe while the agent runs. ``RECORD_ID``
may be any unique prefix of a record id. ``show`` prints the summary and the first and last
samples; ``--csv`` writes every sample as CSV to stdout (nothing else), ``--json`` the summary
and every sample as one JSON object; ``--plot`` additionally draws power, SOC and temperature
over time into a PNG (needs matplotlib: ``pip install 'charger-agent[plot]'``).

Exit codes: 0 ok; 1 not found (no archive, unknown record, no samples to plot), an unreadable
archive, matplotlib missing or the PNG not writable; 2 bad usage or config (including an
ambiguous record-id prefix).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from agent.maintenance.archive import (
    SAMPLE_COLUMNS,
    ArchiveError,
    ArchiveNotFoundError,
    ArchiveReader,
    SampleRow,
    SessionInfo,
)
from agent.maintenance.archive_export import CSV_COLUMNS, write_csv

__all__ = ["CSV_COLUMNS", "add_parsers", "format_duration", "main", "write_csv"]
from agent.utctime import to_iso

EXIT_OK, EXIT_NOT_FOUND, EXIT_USAGE = 0, 1, 2
#: Samples printed at each end by ``show`` without ``--csv``/``--json``.
HEAD_TAIL: Final = 5
#: A stand-in sim root for configs that use ``{sim_root}``: only the state directory is needed,
#: so no simulator directory is created for it.
_NO_SIM_ROOT: Final = Path("/run/charger-sim")


class _Failure(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- formatting


def format_duration(seconds: float | None) -> str:
    """``1h02m03s``, ``12m05s``, ``45s``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _num(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _stop_reason(info: SessionInfo) -> str:
    if info.is_open:
        return "(open)"
    reason = info.summary.get("stop_reason")
    if reason:
        return str(reason)
    return "(interrupted)" if info.summary.get("interrupted") else "-"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def render_list(sessions: Sequence[SessionInfo]) -> str:
    """The ``sessions list`` table (newest first, as given)."""
    if not sessions:
        return "no sessions archived"
    header = ("RECORD ID", "CONN", "START (UTC)", "DURATION", "kWh", "MAX kW", "STOP REASON", "KEPT")
    rows = [
        (
            s.record_id,
            str(s.connector_id),
            to_iso(s.start_time),
            format_duration(s.duration_s),
            _num(s.summary.get("energy_kwh"), 3),
            _num(s.summary.get("max_power_kw"), 1),
            _stop_reason(s),
            s.resolution,
        )
        for s in sessions
    ]
    return _table(header, rows, right={1, 3, 4, 5})


def _sample_cells(row: SampleRow) -> list[str]:
    return [
        to_iso(row.t),
        row.resolution,
        _num(row.power_kw, 3),
        _num(row.voltage, 1),
        _num(row.current, 2),
        _num(row.soc, 1),
        _num(row.temperature, 1),
        _num(row.energy_kwh, 3),
    ]


def render_show(info: SessionInfo, samples: Sequence[SampleRow], head_tail: int = HEAD_TAIL) -> str:
    """The ``sessions show`` text: summary, then the first and last ``head_tail`` samples."""
    s = info.summary
    soc_start, soc_end = s.get("soc_start"), s.get("soc_end")
    lines = [
        f"record id     {info.record_id}",
        f"connector     {info.connector_id}",
        f"mode          {info.mode or '-'}",
        f"start         {to_iso(info.start_time)}",
        f"end           {to_iso(info.end_time) if info.end_time is not None else '(open)'}",
        f"duration      {format_duration(info.duration_s)}",
        f"energy        {_num(s.get('energy_kwh'), 3)} kWh",
        f"max power     {_num(s.get('max_power_kw'), 2)} kW",
        f"avg power     {_num(s.get('avg_power_kw'), 2)} kW",
        f"soc           {_num(soc_start, 0)} -> {_num(soc_end, 0)} %",
        f"stop reason   {_stop_reason(info)}",
        f"kept          {info.resolution} ({info.samples_1s} samples at 1 s, {info.samples_1min} 1-minute means)",
    ]
    shown = {"energy_kwh", "max_power_kw", "avg_power_kw", "soc_start", "soc_end", "stop_reason", "duration_s"}
    for key in sorted(k for k in s if k not in shown):
        lines.append(f"{key:<13} {s[key]}")
    if not samples:
        lines += ["", "no samples kept (summary only)"]
        return "\n".join(lines)
    header = ("TIME (UTC)", "RES", "kW", "V", "A", "SOC %", "TEMP C", "kWh")
    if len(samples) <= 2 * head_tail:
        rows = [_sample_cells(r) for r in samples]
        title = f"samples ({len(samples)}):"
    else:
        gap = len(samples) - 2 * head_tail
        rows = [
            *(_sample_cells(r) for r in samples[:head_tail]),
            ["...", f"({gap} more)", "", "", "", "", "", ""],
            *(_sample_cells(r) for r in samples[-head_tail:]),
        ]
        title = f"samples (first {head_tail} and last {head_tail} of {len(samples)}; --csv prints all):"
    lines += ["", title, _table(header, rows, right={2, 3, 4, 5, 6, 7})]
    return "\n".join(lines)


def _sample_dict(r: SampleRow) -> dict[str, Any]:
    out: dict[str, Any] = {"t": r.t, "time_utc": to_iso(r.t), "resolution": r.resolution}
    out.update((name, getattr(r, name)) for name in SAMPLE_COLUMNS[2:])
    return out


# --------------------------------------------------------------------------- plot


def render_plot(info: SessionInfo, samples: Sequence[SampleRow], path: Path) -> None:
    """Draw power and SOC (twin y-axes) over temperature, against minutes since the start.

    Raises :class:`RuntimeError` when matplotlib is not installed and :class:`OSError` when
    ``path`` cannot be written. Uses the Agg canvas directly (no display, no pyplot state).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError(
            "--plot needs matplotlib, which is not installed: pip install 'charger-agent[plot]'"
        ) from None

    def series(values: Sequence[float | None]) -> list[float]:
        return [math.nan if v is None else v for v in values]

    x = [(r.t - info.start_time) / 60.0 for r in samples]
    fig = Figure(figsize=(10, 7), dpi=100, layout="constrained")
    ax_power, ax_temp = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    (p_line,) = ax_power.plot(x, series([r.power_kw for r in samples]), color="tab:blue", label="power")
    ax_power.set_ylabel("power (kW)")
    ax_power.grid(True, alpha=0.3)
    ax_soc = ax_power.twinx()
    (s_line,) = ax_soc.plot(x, series([r.soc for r in samples]), color="tab:green", label="SOC")
    ax_soc.set_ylabel("SOC (%)")
    ax_soc.set_ylim(0, 100)
    ax_power.legend(handles=[p_line, s_line], loc="best")
    temps = series([r.temperature for r in samples])
    ax_temp.plot(x, temps, color="tab:red")
    ax_temp.set_ylabel("temperature (°C)")
    ax_temp.grid(True, alpha=0.3)
    if all(math.isnan(t) for t in temps):
        ax_temp.text(0.5, 0.5, "no temperature recorded", transform=ax_temp.transAxes, ha="center", va="center")
    ax_temp.set_xlabel(f"minutes since {to_iso(info.start_time)} (resolution kept: {info.resolution})")
    energy = info.summary.get("energy_kwh")
    energy_text = f"{energy:.3f} kWh" if isinstance(energy, (int, float)) else "energy unknown"
    fig.suptitle(f"Session {info.record_id} - connector {info.connector_id} - {energy_text}")
    fig.savefig(path, format="png")


# --------------------------------------------------------------------------- commands


def _state_dir(args: argparse.Namespace) -> Path:
    if args.state_dir:
        return Path(args.state_dir)
    from agent.config import load_config  # ConfigError propagates: exit 2

    return load_config(args.config, sim_root=_NO_SIM_ROOT).model.charger.state_dir


def _reader(args: argparse.Namespace) -> ArchiveReader:
    try:
        return ArchiveReader.open(_state_dir(args))
    except ArchiveNotFoundError as exc:
        raise _Failure(EXIT_NOT_FOUND, f"{exc} (has the agent run with this state directory?)") from None
    except ArchiveError as exc:
        raise _Failure(EXIT_NOT_FOUND, str(exc)) from None


def _resolve(reader: ArchiveReader, wanted: str) -> SessionInfo:
    info = reader.get_session(wanted)
    if info is not None:
        return info
    matches = reader.find(wanted) if wanted else []
    if not matches:
        raise _Failure(EXIT_NOT_FOUND, f"no archived session with record id {wanted!r}")
    if len(matches) > 1:
        listed = "\n  ".join(matches)
        raise _Failure(EXIT_USAGE, f"record id prefix {wanted!r} is ambiguous:\n  {listed}")
    found = reader.get_session(matches[0])
    if found is None:  # compacted away between the two reads
        raise _Failure(EXIT_NOT_FOUND, f"no archived session with record id {wanted!r}")
    return found


def cmd_list(args: argparse.Namespace) -> int:
    """``sessions list``: the newest sessions as a table (or JSON)."""
    with _reader(args) as reader:
        sessions = reader.list_sessions(args.limit)
    if args.json:
        print(json.dumps([s.as_dict() for s in sessions], indent=2))
    else:
        print(render_list(sessions))
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    """``sessions show``: one session's summary and samples; optionally a CSV, JSON or PNG."""
    with _reader(args) as reader:
        info = _resolve(reader, args.record_id)
        samples = reader.samples(info.record_id)
    if args.csv:
        write_csv(samples, sys.stdout)
    elif args.json:
        print(json.dumps({"session": info.as_dict(), "samples": [_sample_dict(r) for r in samples]}, indent=2))
    else:
        print(render_show(info, samples))
    if args.plot:
        if not samples:
            raise _Failure(EXIT_NOT_FOUND, f"session {info.record_id} keeps no samples to plot (summary only)")
        if not Path(args.plot).parent.is_dir():
            raise _Failure(EXIT_NOT_FOUND, f"cannot write {args.plot}: no such directory")
        try:
            render_plot(info, samples, Path(args.plot))
        except RuntimeError as exc:
            raise _Failure(EXIT_NOT_FOUND, str(exc)) from None
        except OSError as exc:
            raise _Failure(EXIT_NOT_FOUND, f"cannot write {args.plot}: {exc.strerror or exc}") from None
        # stdout may be a CSV or JSON stream: the note goes to stderr
        print(f"plot written to {args.plot}", file=sys.stderr)
    return EXIT_OK


Command = Callable[[argparse.Namespace], int]


def _guarded(command: Command) -> Command:
    """``command`` with its :class:`_Failure` printed to stderr and turned into the exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(command(args))
        except _Failure as exc:
            print(str(exc), file=sys.stderr)
            return exc.code

    run.__doc__ = command.__doc__
    return run


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def add_parsers(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``sessions list`` / ``sessions show`` to the ``charger-agent`` subparsers; return ``sessions``.

    Each leaf sets ``func`` to a callable ``(args) -> exit code``; a config error is raised as
    :class:`agent.config.ConfigError` for the caller to report (``charger-agent`` exits 2).
    """
    sessions = subparsers.add_parser(
        "sessions",
        help="archived per-second telemetry of charging sessions",
        description="Read the session archive (state_dir/archive.db); safe while the agent runs.",
    )
    verbs = sessions.add_subparsers(dest="sessions_command", metavar="{list,show}", required=True)

    def with_source(p: argparse.ArgumentParser) -> None:
        source = p.add_mutually_exclusive_group(required=True)
        source.add_argument("--config", "-c", help="agent config (TOML) naming the state directory")
        source.add_argument("--state-dir", help="the agent's state directory")

    p = verbs.add_parser("list", help="the newest sessions, newest first")
    with_source(p)
    p.add_argument("--limit", "-n", type=_positive, default=50, help="sessions to show (default 50)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_guarded(cmd_list))

    p = verbs.add_parser("show", help="one session: summary and samples")
    with_source(p)
    p.add_argument("record_id", metavar="RECORD_ID", help="record id or a unique prefix of it")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="every sample as CSV on stdout (nothing else)")
    fmt.add_argument("--json", action="store_true", help="summary and every sample as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw power / SOC / temperature over time into FILE.png")
    p.set_defaults(func=_guarded(cmd_show))
    return sessions


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (``python -m agent.cli.sessions sessions ...``), same exit codes."""
    from agent.config import ConfigError

    parser = argparse.ArgumentParser(prog="charger-agent")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help is 0, bad usage 2
        return int(exc.code or 0)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
