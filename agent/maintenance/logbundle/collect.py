"""Where the bundle's logs come from: journald (``journalctl``), the log file and its rotated
siblings, and the audit rows' shape.

See :mod:`agent.maintenance.logbundle` for the window-filtering and size rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import IO, Any, Final, Protocol

from agent.redaction import redact_text
from agent.store.credentials import CREDENTIALS_FILENAME
from hal.tasks import stop_task

DEFAULT_UNIT: Final = "charger-agent.service"
_COPY_CHUNK: Final = 1024 * 1024


_RAW_FACTOR: Final = 4  # collected bytes per stream, as a multiple of max_bytes


_PIPE_CHUNK: Final = 64 * 1024


class AuditRecord(Protocol):
    """What :meth:`agent.store.commands.CommandLedger.audit_entries` returns per row."""

    @property
    def id(self) -> int: ...
    @property
    def at(self) -> float: ...
    @property
    def source(self) -> str: ...
    @property
    def command_id(self) -> str | None: ...
    @property
    def command(self) -> str | None: ...
    @property
    def params(self) -> dict[str, Any] | None: ...
    @property
    def outcome(self) -> str: ...
    @property
    def message(self) -> str | None: ...


@dataclass(frozen=True)
class LogSources:
    """Where the agent's logs are. ``journalctl`` is the executable's path (None: no
    journald); ``log_file`` is ``[logging] file`` (None: not configured)."""

    journald_unit: str | None = DEFAULT_UNIT
    log_file: Path | None = None
    journalctl: str | None = None
    journal_timeout_s: float = 120.0

    @classmethod
    def discover(
        cls,
        *,
        journald_unit: str | None = DEFAULT_UNIT,
        log_file: Path | None = None,
        search_path: str | None = None,
        journal_timeout_s: float = 120.0,
    ) -> LogSources:
        """Find ``journalctl`` with :func:`shutil.which` (on ``search_path``, default
        ``$PATH``); journald is not used when there is no unit or no executable."""
        exe = shutil.which("journalctl", path=search_path) if journald_unit else None
        return cls(journald_unit, log_file, exe, journal_timeout_s)


def _journal_time(ts: datetime, *, ceil: bool = False) -> str:
    ts = ts.astimezone(UTC)
    if ceil and ts.microsecond:
        ts = ts.replace(microsecond=0) + timedelta(seconds=1)
    return ts.strftime("%Y-%m-%d %H:%M:%S UTC")


def _is_credentials(name: str) -> bool:
    return PurePosixPath(name).name.startswith(CREDENTIALS_FILENAME)


_JSON_TS = re.compile(rb'"timestamp"\s*:\s*"([^"]{10,40})"')


_LEAD_TS = re.compile(
    rb"^\[?(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d{1,9})?(?:Z|[+-]\d{2}:?\d{2})?)"
)


def _line_time(line: bytes) -> float | None:
    """Unix time of a log line's ISO 8601 stamp (zone-less = UTC), or None."""
    m = _JSON_TS.search(line) or _LEAD_TS.match(line)
    if m is None:
        return None
    try:
        stamp = datetime.fromisoformat(m.group(1).decode().replace(",", "."))
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def _log_files(log_file: Path) -> list[Path]:
    """``log_file`` and its rotated siblings, oldest first (the live file last)."""
    directory, name = log_file.parent, log_file.name
    try:
        siblings = [
            p
            for p in directory.iterdir()
            if p.name != name
            and (p.name.startswith(name + ".") or p.name.startswith(name + "-"))
            and p.is_file()
        ]
    except OSError:
        siblings = []

    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0

    siblings.sort(key=lambda p: (mtime(p), p.name))
    return [*siblings, log_file] if log_file.is_file() else siblings


class _TailWriter:
    """Append-only byte sink that keeps about the newest ``cap`` bytes (in chunk files) and
    counts the complete lines it had to drop."""

    def __init__(self, directory: Path, stem: str, cap: int) -> None:
        self._dir = directory
        self._stem = stem
        self._cap = max(cap, 1)
        self._chunk = max(self._cap // 4, 64 * 1024)
        self._parts: list[Path] = []
        self._sizes: list[int] = []
        self._clean: list[bool] = []  # does the part start at a line boundary?
        self._at_line_start = True
        self._fh: IO[bytes] | None = None
        self._seq = 0
        self.dropped_lines = 0
        self.lines = 0

    def write(self, data: bytes) -> None:
        if self._fh is None or self._sizes[-1] >= self._chunk:
            self._rotate()
        assert self._fh is not None
        self._fh.write(data)
        self._sizes[-1] += len(data)
        self.lines += data.count(b"\n")
        if data:
            self._at_line_start = data.endswith(b"\n")
        while len(self._parts) > 1 and sum(self._sizes) - self._sizes[0] >= self._cap:
            path = self._parts.pop(0)
            self._sizes.pop(0)
            self._clean.pop(0)
            self.dropped_lines += _count_newlines(path, 0, None)
            path.unlink()

    def _rotate(self) -> None:
        if self._fh is not None:
            self._fh.close()
        path = self._dir / f"{self._stem}.part{self._seq:06d}"
        self._seq += 1
        self._fh = path.open("wb")
        self._parts.append(path)
        self._sizes.append(0)
        self._clean.append(self._at_line_start)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def _kept_lines(self) -> Iterator[bytes]:
        """The kept bytes as whole lines (a line may span parts; the last may lack "\n")."""
        carry = b""
        for path in self._parts:
            with path.open("rb") as fh:
                for line in fh:
                    line, carry = carry + line, b""
                    if line.endswith(b"\n"):
                        yield line
                    else:
                        carry = line
        if carry:
            yield carry

    def finish(self, dest: Path, transform: Callable[[bytes], bytes] | None = None) -> int:
        """Write the kept bytes to ``dest`` (through ``transform`` line by line, if given)
        and delete the parts; the partial line at the start of the oldest kept part (when
        older parts were dropped mid-line) is dropped too. Returns the lines written."""
        self.close()
        kept = 0
        skip_partial = bool(self._clean) and not self._clean[0]
        with dest.open("wb") as out:
            for line in self._kept_lines():
                if skip_partial:
                    skip_partial = False
                    self.dropped_lines += 1
                    continue
                out.write(transform(line) if transform else line)
                kept += 1
        for path in self._parts:
            path.unlink()
        self._parts, self._sizes, self._clean = [], [], []
        return kept


def _count_newlines(path: Path, start: int, end: int | None) -> int:
    count = 0
    with path.open("rb") as fh:
        fh.seek(start)
        remaining = None if end is None else end - start
        while remaining is None or remaining > 0:
            block = fh.read(_COPY_CHUNK if remaining is None else min(_COPY_CHUNK, remaining))
            if not block:
                break
            count += block.count(b"\n")
            if remaining is not None:
                remaining -= len(block)
    return count


async def _collect_journald(
    sources: LogSources, since: datetime, until: datetime, staging: Path, cap: int
) -> tuple[_TailWriter | None, list[str]]:
    """Run journalctl and keep its newest ``cap`` bytes of output (raw, not yet redacted)."""
    assert sources.journalctl is not None and sources.journald_unit is not None
    args = [
        sources.journalctl,
        "-u", sources.journald_unit,
        "--since", _journal_time(since),
        "--until", _journal_time(until, ceil=True),
        "-o", "json",
        "--no-pager",
    ]  # fmt: skip
    try:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        return None, [f"journald: journalctl could not be started ({exc.strerror or exc})"]
    assert proc.stdout is not None and proc.stderr is not None
    notes: list[str] = []
    writer = _TailWriter(staging, "journal.raw", cap)
    err_buf = bytearray()

    async def drain_stderr(stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(4096):
            if len(err_buf) < 2048:
                err_buf.extend(chunk[: 2048 - len(err_buf)])

    err_task = asyncio.create_task(drain_stderr(proc.stderr))
    try:
        async with asyncio.timeout(sources.journal_timeout_s):
            while chunk := await proc.stdout.read(_PIPE_CHUNK):
                await asyncio.to_thread(writer.write, chunk)
            rc = await proc.wait()
            await err_task
        if rc != 0:
            notes.append(f"journald: journalctl exited with status {rc}")
    except TimeoutError:
        notes.append(
            f"journald: journalctl did not finish within {sources.journal_timeout_s:g} s; "
            f"the output read so far is included"
        )
    finally:
        writer.close()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
        await stop_task(err_task)
    err = err_buf.decode("utf-8", "replace").strip()
    if err:
        notes.append("journald: journalctl said: " + redact_text(" ".join(err.split()))[:300])
    return writer, notes
