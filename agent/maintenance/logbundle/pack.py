"""Packing the bundle: filter, redact and compress into one bounded ``tar.gz`` (in a worker
thread), with its ``MANIFEST.txt``; :func:`build_bundle` is the entry point.

See :mod:`agent.maintenance.logbundle` for the layout and the size contract.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import re
import secrets as _secrets
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Final

import structlog

from agent.maintenance.logbundle.collect import (
    AuditRecord,
    LogSources,
    _RAW_FACTOR,
    _TailWriter,
    _collect_journald,
    _count_newlines,
    _is_credentials,
    _line_time,
    _log_files,
)
from agent.maintenance.logbundle.collect import _COPY_CHUNK
from agent.maintenance.logbundle.config_redaction import _Masker, redact_config
from agent.maintenance.logbundle.params import BundleError, DEFAULT_MAX_BYTES
from agent.utctime import to_iso

log = structlog.get_logger(__name__)


MANIFEST_NAME: Final = "MANIFEST.txt"




_MAX_PACK_ATTEMPTS: Final = 4  # shrinking attempts before the logs are emptied


@dataclass
class _Stream:
    """A line-oriented bundle member on disk that may be cut from its oldest lines."""

    name: str
    path: Path
    origin: str
    lines: int
    dropped_collecting: int = 0

    @property
    def size(self) -> int:
        return self.path.stat().st_size


@dataclass
class _Cut:
    offset: int = 0
    lines: int = 0


@dataclass(frozen=True)
class Bundle:
    """A packed bundle on disk. ``files`` are the member names in archive order."""

    path: Path
    size: int
    sha256: str
    files: tuple[str, ...]
    since: datetime
    until: datetime
    truncated: bool = False
    notes: tuple[str, ...] = field(default=())

    def details(self) -> dict[str, Any]:
        """The command-status ``details`` for this bundle."""
        return {
            "size": self.size,
            "sha256": self.sha256,
            "files": list(self.files),
            "since": to_iso(self.since.timestamp(), millis=True),
            "until": to_iso(self.until.timestamp(), millis=True),
            "truncated": self.truncated,
        }

    def remove(self) -> None:
        """Delete the bundle file (missing is fine)."""
        self.path.unlink(missing_ok=True)


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}.{n}"
    taken.add(candidate)
    return candidate


def _member_name(name: str, index: int) -> str:
    base = PurePosixPath(name.replace("\\", "/")).name.lstrip(".")
    base = re.sub(r"[^A-Za-z0-9._+-]", "_", base)[:120]
    return base or f"file-{index}"


@dataclass
class _Plan:
    """Everything the packing thread needs (staging already holds the journald capture)."""

    since: datetime
    until: datetime
    sources: LogSources
    audit: list[dict[str, Any]]
    config_path: Path | None
    extra_files: list[tuple[str, bytes]]
    staging: Path
    dest: Path
    max_bytes: int
    masker: _Masker
    known_secrets: tuple[str, ...]
    journal: _TailWriter | None
    notes: list[str]
    stop: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        """Raise :class:`_Stopped` once the awaiting task was cancelled."""
        if self.stop.is_set():
            raise _Stopped


class _Stopped(Exception):
    """The packing thread gave up because :func:`build_bundle` was cancelled."""


def _collect_files(plan: _Plan, cap: int, taken: set[str]) -> list[_Stream]:
    streams: list[_Stream] = []
    log_file = plan.sources.log_file
    if log_file is None:
        return streams
    lo, hi = plan.since.timestamp(), plan.until.timestamp()
    files = _log_files(log_file)
    if not files:
        plan.notes.append(f"log file {log_file}: not found")
    for path in files:
        if _is_credentials(path.name):
            plan.notes.append(f"{path.name}: credentials file, never included")
            continue
        try:
            if path.stat().st_mtime < lo:
                plan.notes.append(f"{path.name}: last written before the window, skipped")
                continue
            gz = path.name.endswith(".gz")
            stem = path.name[:-3] if gz else path.name
            writer = _TailWriter(plan.staging, f"file-{len(streams)}", cap)
            keep = True
            plan.check()
            with gzip.open(path, "rb") if gz else path.open("rb") as fh:
                for n, line in enumerate(fh):
                    if n & 0xFFF == 0:
                        plan.check()
                    stamp = _line_time(line)
                    if stamp is not None:
                        keep = lo <= stamp < hi
                    if keep:
                        writer.write(plan.masker.line(line))
            name = _unique(f"logs/{_member_name(stem, len(streams))}", taken)
            dest = plan.staging / f"stream-{len(taken)}"
            kept = writer.finish(dest)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            plan.notes.append(f"{path.name}: could not be read ({exc})")
            continue
        if kept == 0 and writer.dropped_lines == 0:
            plan.notes.append(f"{path.name}: no lines in the window")
            dest.unlink()
            continue
        streams.append(_Stream(name, dest, f"log file {path}", kept, writer.dropped_lines))
    return streams


def _plan_cut(stream: _Stream, keep: int | None) -> _Cut:
    size = stream.size
    if keep is None or keep >= size:
        return _Cut()
    offset = size - max(keep, 0)
    with stream.path.open("rb") as fh:
        fh.seek(offset - 1)
        while True:
            block = fh.read(64 * 1024)
            if not block:
                offset = size
                break
            nl = block.find(b"\n")
            if nl >= 0:
                offset = fh.tell() - len(block) + nl + 1
                break
    return _Cut(offset, _count_newlines(stream.path, 0, offset))


def _manifest(
    plan: _Plan,
    members: list[tuple[str, int, str]],
    streams: list[_Stream],
    cuts: list[_Cut],
    dropped_extras: list[str],
) -> bytes:
    lines = [
        "charger-agent log bundle (fetch_logs)",
        f"created: {to_iso(time.time(), millis=True)}",
        (
            f"window: {to_iso(plan.since.timestamp(), millis=True)} .. {to_iso(plan.until.timestamp(), millis=True)}"
            " (UTC, end exclusive)"
        ),
        f"size limit: {plan.max_bytes} bytes compressed",
        "",
        "files:",
    ]
    lines += [f"  {name}  {size} bytes  {what}" for name, size, what in members]
    cut_notes = []
    for stream, cut in zip(streams, cuts):
        dropped = stream.dropped_collecting + cut.lines
        if dropped:
            cut_notes.append(f"{stream.name}: {dropped} oldest lines dropped to fit the size limit")
    cut_notes += [f"{name}: left out to fit the size limit" for name in dropped_extras]
    notes = [*cut_notes, *plan.notes]
    if notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in notes]
    lines += [
        "",
        "never included: the device credentials file, access tokens; values of secret-looking",
        "keys, bearer tokens, URL user-info and signed query parameters are replaced by ***",
        "",
    ]
    return "\n".join(lines).encode()


def _tarinfo(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(mtime)
    info.mode = 0o644
    info.uname = info.gname = ""
    return info


def _pack(plan: _Plan) -> Bundle:
    """The worker-thread part of :func:`build_bundle`."""
    taken: set[str] = {MANIFEST_NAME}
    cap = _RAW_FACTOR * plan.max_bytes
    streams: list[_Stream] = []
    if plan.journal is not None:
        dest = plan.staging / "stream-journal"
        kept = plan.journal.finish(dest, plan.masker.line)
        unit = plan.sources.journald_unit
        if kept or plan.journal.dropped_lines:
            streams.append(
                _Stream(
                    _unique("logs/journal.jsonl", taken),
                    dest,
                    f"journald unit {unit} (journalctl -o json)",
                    kept,
                    plan.journal.dropped_lines,
                )
            )
        else:
            plan.notes.append(f"journald: no entries of unit {unit} in the window")
    streams += _collect_files(plan, cap, taken)

    fixed: list[tuple[str, bytes, str]] = []
    if plan.config_path is not None:
        try:
            text = plan.config_path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            plan.notes.append(f"config {plan.config_path}: could not be read ({exc.strerror})")
        else:
            red = redact_config(text, known_secrets=plan.known_secrets)
            fixed.append(
                (
                    _unique(f"config/{_member_name(plan.config_path.name, 0)}", taken),
                    red.encode(),
                    f"running config {plan.config_path}, secrets redacted",
                )
            )
    if plan.audit:
        audit_path = plan.staging / "stream-audit"
        with audit_path.open("wb") as fh:
            for row in plan.audit:
                fh.write(json.dumps(row, ensure_ascii=False, default=str).encode() + b"\n")
        streams.append(
            _Stream(
                _unique("audit/commands.jsonl", taken),
                audit_path,
                "command audit log (JSON lines)",
                len(plan.audit),
            )
        )
    else:
        plan.notes.append("command audit log: no entries in the window")

    extras: list[tuple[str, bytes]] = []
    for i, (raw_name, data) in enumerate(plan.extra_files):
        if _is_credentials(raw_name):
            plan.notes.append(f"{_member_name(raw_name, i)}: credentials file, never included")
            continue
        extras.append((_unique(f"sessions/{_member_name(raw_name, i)}", taken), data))
    dropped_extras: list[str] = []

    budget: int | None = None
    attempts = 0
    partial = plan.staging / "bundle.partial"
    while True:
        plan.check()
        cuts = [_Cut() for _ in streams]
        if budget is not None:
            total = sum(s.size for s in streams)
            cuts = [_plan_cut(s, (s.size * budget) // total if total else 0) for s in streams]
        members: list[tuple[str, int, str]] = []
        for s, c in zip(streams, cuts):
            kept_lines = s.lines - c.lines
            members.append((s.name, s.size - c.offset, f"{s.origin}, {kept_lines} lines"))
        members += [(n, len(d), w) for n, d, w in fixed]
        members += [(n, len(d), "session archive") for n, d in extras]
        manifest = _manifest(plan, members, streams, cuts, dropped_extras)
        now = time.time()
        with tarfile.open(partial, "w:gz", compresslevel=6, format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_tarinfo(MANIFEST_NAME, len(manifest), now), io.BytesIO(manifest))
            for s, c in zip(streams, cuts):
                with s.path.open("rb") as fh:
                    fh.seek(c.offset)
                    tar.addfile(_tarinfo(s.name, s.size - c.offset, now), fh)
            for name, data, _ in fixed:
                tar.addfile(_tarinfo(name, len(data), now), io.BytesIO(data))
            for name, data in extras:
                tar.addfile(_tarinfo(name, len(data), now), io.BytesIO(data))
        size = partial.stat().st_size
        if size <= plan.max_bytes:
            break
        kept = sum(s.size - c.offset for s, c in zip(streams, cuts))
        attempts += 1
        if kept > 0:
            shrink = int(kept * plan.max_bytes / size * 0.9)
            budget = 0 if attempts >= _MAX_PACK_ATTEMPTS or kept < 4096 else min(shrink, kept - 1)
        elif extras:
            dropped_extras.append(extras.pop(0)[0])
        else:
            partial.unlink(missing_ok=True)
            raise BundleError(
                f"the bundle cannot be made smaller than {size} bytes "
                f"(limit {plan.max_bytes} bytes) even without logs"
            )

    digest = hashlib.sha256()
    with partial.open("rb") as fh:
        while block := fh.read(_COPY_CHUNK):
            digest.update(block)
    os.replace(partial, plan.dest)
    truncated = bool(dropped_extras) or any(
        s.dropped_collecting or c.lines for s, c in zip(streams, cuts)
    )
    files = (
        MANIFEST_NAME,
        *(s.name for s in streams),
        *(n for n, _, _ in fixed),
        *(n for n, _ in extras),
    )
    return Bundle(
        plan.dest,
        size,
        digest.hexdigest(),
        files,
        plan.since,
        plan.until,
        truncated,
        tuple(plan.notes),
    )


def _audit_row(entry: AuditRecord, masker: _Masker) -> dict[str, Any]:
    return {
        "id": entry.id,
        "at": to_iso(entry.at, millis=True),
        "source": entry.source,
        "command_id": entry.command_id,
        "command": entry.command,
        "params": None if entry.params is None else masker.tree(entry.params),
        "outcome": entry.outcome,
        "message": None if entry.message is None else masker.text(entry.message),
    }


async def build_bundle(
    *,
    since: datetime,
    until: datetime,
    sources: LogSources,
    audit_entries: Iterable[AuditRecord],
    config_path: Path | None,
    extra_files: Sequence[tuple[str, bytes]] = (),
    workdir: Path,
    max_bytes: int = DEFAULT_MAX_BYTES,
    known_secrets: Sequence[str] = (),
) -> Bundle:
    """Collect and pack the bundle into ``workdir/logs-<until>-<random>.tar.gz``.

    Layout (member names; empty sources are left out and named in the manifest)::

        MANIFEST.txt            window, every member with size and origin, cuts, notes
        logs/journal.jsonl      journald entries of the unit (journalctl -o json)
        logs/<file>             [logging] file and rotated siblings, window-filtered,
                                oldest first (a .gz sibling is stored decompressed)
        audit/commands.jsonl    one JSON object per audit row: id, at (ISO), source,
                                command_id, command, params (redacted), outcome, message
        config/<name>.toml      the running config, redacted (:func:`redact_config`)
        sessions/<name>         ``extra_files`` (session archives), as given; a name is
                                reduced to its last path component

    ``since``/``until`` must be time-zone aware with ``since < until``; ``audit_entries``
    are the rows of that window (the caller queries the store). Raises
    :class:`BundleError` when the bundle cannot be made to fit ``max_bytes``.
    """
    if since.tzinfo is None or until.tzinfo is None:
        raise ValueError("since and until must be time-zone aware")
    if until <= since:
        raise ValueError("until must be after since")
    if max_bytes < 1024:
        raise ValueError("max_bytes must be at least 1024")
    since, until = since.astimezone(UTC), until.astimezone(UTC)
    masker = _Masker(known_secrets)
    audit = [_audit_row(e, masker) for e in audit_entries]
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    staging = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=".logbundle-", dir=workdir))
    dest = workdir / f"logs-{until:%Y%m%dT%H%M%SZ}-{_secrets.token_hex(3)}.tar.gz"
    notes: list[str] = []
    try:
        journal: _TailWriter | None = None
        if sources.journalctl and sources.journald_unit:
            journal, jnotes = await _collect_journald(
                sources, since, until, staging, _RAW_FACTOR * max_bytes
            )
            notes += jnotes
        elif sources.journald_unit:
            notes.append("journald: journalctl not found, not collected")
        plan = _Plan(
            since,
            until,
            sources,
            audit,
            config_path,
            list(extra_files),
            staging,
            dest,
            max_bytes,
            masker,
            tuple(known_secrets),
            journal,
            notes,
        )
        work = asyncio.ensure_future(asyncio.to_thread(_pack, plan))
        try:
            bundle = await asyncio.shield(work)
        except asyncio.CancelledError:
            plan.stop.set()  # let the thread stop before its staging files are removed
            (finished,) = await asyncio.gather(work, return_exceptions=True)
            if isinstance(finished, Bundle):  # it was done already: nobody will upload it
                finished.remove()
            raise
    finally:
        await asyncio.shield(asyncio.to_thread(shutil.rmtree, staging, True))
    log.info(
        "logbundle.built",
        path=str(bundle.path),
        size=bundle.size,
        files=len(bundle.files),
        truncated=bundle.truncated,
    )
    return bundle
