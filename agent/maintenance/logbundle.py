"""The ``fetch_logs`` bundle: collect, redact, pack into one ``tar.gz``, upload.

Contract
--------
* **Parameters.** :class:`FetchLogsParams` accepts ``upload_url`` (``https://``; plain
  ``http://`` only to a loopback host) and an optional window ``since``/``until``
  (time-zone-aware ISO 8601 date-times). ``until`` defaults to the moment of validation and
  ``since`` to 24 h before ``until``; ``until <= since`` is refused naming ``until``.
  The window is half-open: ``since <= t < until``.
* **Content** (see :func:`build_bundle` for the layout): agent logs from journald when a
  ``journalctl`` executable and a unit are known (``journalctl -u UNIT --since .. --until ..
  -o json --no-pager``, an asyncio subprocess with a time limit), plus the configured log file
  and its rotated siblings (``agent.log.1``, ``agent.log.2.gz``, ``agent.log-20250101``...)
  filtered to the window; the command audit rows as JSON lines; the session archives the
  caller hands over; the running config with its secrets redacted (:func:`redact_config`);
  and ``MANIFEST.txt`` saying what is in the bundle and what was left out or cut.
* **Window filtering of log files.** A line carrying a time stamp (a structlog JSON line's
  ``"timestamp"`` or a line starting with an ISO 8601 date-time; a stamp without a zone is
  UTC) is kept when the stamp is inside the window; a line without one (a traceback, a
  continuation) follows the line before it; lines before the first stamp of a file are
  kept. A rotated file last written before ``since`` is skipped unread.
* **Never included.** The credentials file (any name starting with ``credentials.json``,
  wherever it comes from), secret-looking values: every text line goes through
  :func:`redact_text` (bearer/basic tokens, URL user-info, secret-looking query parameters
  and ``key=value``/JSON keys), structured data through key-based redaction, and every
  ``known_secrets`` string (e.g. the device secret and the current access token) is replaced
  by ``***`` wherever it appears.
* **Bounded size.** The compressed bundle is at most ``max_bytes`` (default 50 MiB). While
  collecting, each log stream keeps only its newest ``4 * max_bytes`` bytes; if the packed
  bundle is still too large the log and audit streams are cut from their oldest lines
  (each keeping the same share of its newest bytes) and packed again; only when the logs are
  empty and it still does not fit are session archives dropped, first ones first. Every cut
  is counted in ``MANIFEST.txt`` and :attr:`Bundle.truncated` is set.
* **Blocking work off the event loop.** Reading, filtering, redacting and compressing run in
  a worker thread; only the ``journalctl`` pipe is read on the loop. Staging files live in a
  temporary directory under ``workdir`` that is removed whatever happens (cancellation
  included, which also kills ``journalctl``).
* **Upload** (:func:`upload`): one streaming ``PUT`` (or ``POST``) of the file with
  ``Content-Type: application/gzip`` and an exact ``Content-Length`` (no chunked encoding:
  pre-signed object-store URLs refuse it), TLS verification always on (``ca_file`` only adds
  a trust anchor), redirects not followed, proxies from the environment ignored. A 2xx
  answer is success; anything else raises :class:`UploadError` with a readable reason that
  never contains the URL's query or user-info. ``progress`` receives percentages: 10..90
  while the body is sent (about every 10 %), and 100 once the server has accepted it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import re
import secrets as _secrets
import shutil
import ssl
import tarfile
import tempfile
import threading
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from pathlib import Path, PurePosixPath
from typing import IO, Any, Final, Literal, Protocol
from urllib.parse import urlsplit

import aiohttp
import structlog
from pydantic import Field, ValidationInfo, field_validator, model_validator

from agent.commands.params import Params
from agent.netaddr import is_loopback_host
from agent.redaction import CONFIG_SECRET_KEYS, REDACTED, redact_text, redact_tree, safe_url
from agent.store.credentials import CREDENTIALS_FILENAME
from agent.utctime import to_iso, utc_now
from hal.tasks import stop_task

log = structlog.get_logger(__name__)

DEFAULT_UNIT: Final = "charger-agent.service"
DEFAULT_MAX_BYTES: Final = 50 * 1024 * 1024
DEFAULT_WINDOW: Final = timedelta(hours=24)
DEFAULT_UPLOAD_TIMEOUT_S: Final = 900.0
MANIFEST_NAME: Final = "MANIFEST.txt"
_RAW_FACTOR: Final = 4  # collected bytes per stream, as a multiple of max_bytes
_PIPE_CHUNK: Final = 64 * 1024
_COPY_CHUNK: Final = 1024 * 1024
_MAX_PACK_ATTEMPTS: Final = 4  # shrinking attempts before the logs are emptied


class UploadError(Exception):
    """The bundle could not be uploaded; ``str(exc)`` is a reason fit for a command status.

    ``status`` is the HTTP status when the server answered; ``details`` is filled by
    :func:`collect_and_upload` with the bundle's :meth:`Bundle.details`."""

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.details: dict[str, Any] | None = None


class BundleError(Exception):
    """The bundle could not be built (e.g. it cannot be made to fit ``max_bytes``)."""


# ---------------------------------------------------------------------------------------
# Parameters


def check_upload_url(url: str) -> None:
    """Raise ``ValueError`` unless ``url`` is ``https://host/...`` or ``http://`` to a loopback
    host (``localhost``, ``127.0.0.0/8``, ``::1``). The message never echoes the query."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        raise ValueError("an https:// URL (could not parse it)") from None
    if any(c.isspace() for c in url):
        raise ValueError("an https:// URL without white space")
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"an https:// URL with a host (got {safe_url(url)!r})")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError(
            f"an https:// URL (plain http is accepted only to a loopback host, "
            f"got {safe_url(url)!r})"
        )


def _aware_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("a date-time with a time zone (e.g. 2025-03-15T10:30:00Z)")
    return value.astimezone(UTC)


class FetchLogsParams(Params):
    """``fetch_logs`` parameters. After validation ``since`` and ``until`` are always set
    (UTC): ``until`` defaults to now, ``since`` to ``until - 24 h``."""

    upload_url: str = Field(..., min_length=1, max_length=4096)
    since: datetime | None = None
    until: datetime | None = Field(None, validate_default=True)

    @field_validator("upload_url")
    @classmethod
    def _upload_target(cls, value: str) -> str:
        check_upload_url(value)
        return value

    @field_validator("since")
    @classmethod
    def _since_aware(cls, value: datetime | None) -> datetime | None:
        return _aware_utc(value)

    @field_validator("until")
    @classmethod
    def _until_after_since(cls, value: datetime | None, info: ValidationInfo) -> datetime:
        defaulted = value is None
        until = utc_now() if value is None else _aware_utc(value)
        assert until is not None
        since = info.data.get("since")
        if isinstance(since, datetime) and until <= since:
            if defaulted:
                raise ValueError(
                    f"must be after since ({to_iso(since.timestamp(), millis=True)}); until defaults to "
                    f"now ({to_iso(until.timestamp(), millis=True)})"
                )
            raise ValueError(f"must be after since ({to_iso(since.timestamp(), millis=True)})")
        return until

    @model_validator(mode="after")
    def _default_since(self) -> FetchLogsParams:
        if self.since is None and self.until is not None:
            self.since = self.until - DEFAULT_WINDOW
        return self

    def window(self) -> tuple[datetime, datetime]:
        """``(since, until)``, both set and in UTC once the model is validated."""
        if self.since is None or self.until is None:
            raise RuntimeError("FetchLogsParams was not validated")
        return self.since, self.until


# ---------------------------------------------------------------------------------------
# Redaction

class _Masker:
    """Text and structured-data redaction plus the caller's known secret strings."""

    def __init__(self, known_secrets: Iterable[str]) -> None:
        self._known = sorted({s for s in known_secrets if len(s) >= 4}, key=len, reverse=True)
        self._known_b = [s.encode() for s in self._known]

    def text(self, text: str) -> str:
        for s in self._known:
            text = text.replace(s, REDACTED)
        return redact_text(text)

    def line(self, line: bytes) -> bytes:
        for s in self._known_b:
            line = line.replace(s, REDACTED.encode())
        return redact_text(line.decode("utf-8", "surrogateescape")).encode(
            "utf-8", "surrogateescape"
        )

    def tree(self, value: Any) -> Any:
        """Replace values under secret-looking keys (:data:`CONFIG_SECRET_KEYS`) by ``***``."""
        return redact_tree(value, keys=CONFIG_SECRET_KEYS, text=self.text)


# -- config (TOML) ----------------------------------------------------------------------

_TOML_TOKEN = re.compile(
    r"(?P<nl>\r?\n)|(?P<ws>[ \t]+)|(?P<comment>#[^\r\n]*)"
    r'|(?P<mlbasic>"""(?:[^"\\]|\\[\s\S]|"(?!""))*"""(?:""?)?)'
    r"|(?P<mlliteral>'''[\s\S]*?'''(?:''?)?)"
    r'|(?P<basic>"(?:[^"\\\r\n]|\\.)*")'
    r"|(?P<literal>'[^'\r\n]*')"
    r"|(?P<punct>[\[\]{}=,.])"
    r"|(?P<bare>[^\s\[\]{}=,.#\"']+)"
    r"|(?P<other>[\s\S])"
)
_COMMENT_SECRET = re.compile(
    r"(\b[\w.-]*(?:secret|token|password|passwd|key|signature|authorization)[\w.-]*[\"']?"
    r"\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|\S+)",
    re.IGNORECASE,
)
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


class _TomlRedactor:
    """Token-level rewrite of a TOML text that keeps layout and comments and replaces the
    value of every secret-looking key (or every key under a secret-looking table) by "***"."""

    def __init__(self, text: str) -> None:
        self.toks = [(m.lastgroup or "other", m.group()) for m in _TOML_TOKEN.finditer(text)]
        self.i = 0
        self.out: list[str] = []

    def _peek(self) -> tuple[str, str]:
        return self.toks[self.i] if self.i < len(self.toks) else ("eof", "")

    def _emit_next(self) -> None:
        kind, val = self.toks[self.i]
        self.out.append(_COMMENT_SECRET.sub(rf"\1{REDACTED}", val) if kind == "comment" else val)
        self.i += 1

    @staticmethod
    def _segment(kind: str, val: str) -> str | None:
        if kind == "bare":
            return val
        if kind in ("basic", "literal"):
            return val[1:-1]
        return None

    def run(self) -> str:
        table_secret = False
        while self.i < len(self.toks):
            kind, val = self._peek()
            if kind in ("nl", "ws", "comment"):
                self._emit_next()
            elif val == "[":
                secret = False
                while self.i < len(self.toks) and self._peek()[0] != "nl":
                    seg = self._segment(*self._peek())
                    secret = secret or bool(seg and CONFIG_SECRET_KEYS.search(seg))
                    self._emit_next()
                table_secret = secret
            else:
                self._value(self._key(table_secret))
        return "".join(self.out)

    def _key(self, inherited: bool) -> bool:
        """Emit a (dotted) key up to and including ``=``; True when it names a secret."""
        secret = inherited
        while self.i < len(self.toks):
            kind, val = self._peek()
            if kind == "nl":
                return secret
            seg = self._segment(kind, val)
            secret = secret or bool(seg and CONFIG_SECRET_KEYS.search(seg))
            self._emit_next()
            if val == "=":
                break
        return secret

    def _skip_balanced(self) -> None:
        depth = 0
        while self.i < len(self.toks):
            val = self.toks[self.i][1]
            self.i += 1
            if self.toks[self.i - 1][0] == "punct":
                depth += val in "[{"
                depth -= val in "]}"
                if depth == 0:
                    return

    def _value(self, secret: bool) -> None:
        while self._peek()[0] == "ws":
            self._emit_next()
        kind, val = self._peek()
        if kind == "eof":
            return
        if val in ("[", "{"):
            if secret:
                self._skip_balanced()
                self.out.append(f'"{REDACTED}"')
                return
            closing = "]" if val == "[" else "}"
            self._emit_next()
            while self.i < len(self.toks):
                kind, val = self._peek()
                if kind in ("nl", "ws", "comment") or val == ",":
                    self._emit_next()
                elif val == closing:
                    self._emit_next()
                    return
                elif closing == "]":
                    self._value(False)
                else:
                    self._value(self._key(False))
            return
        span: list[str] = []
        while self.i < len(self.toks):
            kind, val = self._peek()
            if kind in ("nl", "comment") or (kind == "punct" and val in ",]}"):
                break
            span.append(val)
            self.i += 1
        trailing: list[str] = []
        while span and not span[-1].strip():
            trailing.insert(0, span.pop())
        self.out.append(f'"{REDACTED}"' if secret else "".join(span))
        self.out.extend(trailing)


def _secret_leaves(value: Any, secret: bool, into: list[str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _secret_leaves(v, secret or bool(CONFIG_SECRET_KEYS.search(str(k))), into)
    elif isinstance(value, list):
        for v in value:
            _secret_leaves(v, secret, into)
    elif secret:
        into.append(value if isinstance(value, str) else str(value))


def _redacted_ok(orig: Any, red: Any, secret: bool, masker: _Masker) -> bool:
    if secret and red == REDACTED:
        return True
    if isinstance(orig, dict):
        return (
            isinstance(red, dict)
            and red.keys() == orig.keys()
            and all(
                _redacted_ok(v, red[k], secret or bool(CONFIG_SECRET_KEYS.search(str(k))), masker)
                for k, v in orig.items()
            )
        )
    if isinstance(orig, list):
        return (
            isinstance(red, list)
            and len(red) == len(orig)
            and all(_redacted_ok(o, r, secret, masker) for o, r in zip(orig, red))
        )
    if secret:
        return False
    if isinstance(orig, str):
        return red == masker.text(orig)
    return type(red) is type(orig) and bool(red == orig)


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)


def _toml_inline(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (datetime, date, dtime)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_inline(v) for v in value) + "]"
    if isinstance(value, dict):
        body = ", ".join(f"{_toml_key(str(k))} = {_toml_inline(v)}" for k, v in value.items())
        return "{ " + body + " }" if body else "{}"
    return json.dumps(str(value))


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _emit_toml(doc: dict[str, Any]) -> str:
    """A plain TOML rendering: top-level tables as headers, deeper tables inline."""
    lines = ["# config re-written after redaction (comments and layout not kept)"]
    for k, v in doc.items():
        if not isinstance(v, dict) and not _is_table_array(v):
            lines.append(f"{_toml_key(k)} = {_toml_inline(v)}")
    for k, v in doc.items():
        if isinstance(v, dict):
            lines += ["", f"[{_toml_key(k)}]"]
            lines += [f"{_toml_key(str(ik))} = {_toml_inline(iv)}" for ik, iv in v.items()]
        elif _is_table_array(v):
            for item in v:
                lines += ["", f"[[{_toml_key(k)}]]"]
                lines += [f"{_toml_key(str(ik))} = {_toml_inline(iv)}" for ik, iv in item.items()]
    return "\n".join(lines) + "\n"


def redact_config(text: str, *, known_secrets: Iterable[str] = ()) -> str:
    """The TOML config ``text`` with every value of a key matching
    :data:`CONFIG_SECRET_KEYS` (or under a table whose name matches) replaced by ``"***"``,
    URL user-info removed and :func:`redact_text` applied; layout and comments are kept.

    The result is checked by parsing it: when the rewrite is not provably complete (every
    secret value replaced, nothing else changed, no secret string left anywhere, comments
    included), the parsed config is re-rendered from the redacted data instead. Text that is
    not valid TOML is not included at all: the result is a one-line comment saying why.
    """
    try:
        orig = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return f"# config not included: not valid TOML ({exc})\n"
    masker = _Masker(known_secrets)
    out = masker.text(_TomlRedactor(text).run())
    leaves: list[str] = []
    _secret_leaves(orig, False, leaves)
    leaves += [s for s in known_secrets if len(s) >= 4]
    try:
        ok = _redacted_ok(orig, tomllib.loads(out), False, masker) and not any(
            len(s) >= 4 and s in out for s in leaves
        )
    except tomllib.TOMLDecodeError:
        ok = False
    if ok:
        return out
    log.warning("logbundle.config_rewritten", reason="token rewrite could not be verified")
    return _emit_toml(masker.tree(orig))


# ---------------------------------------------------------------------------------------
# Sources


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


# ---------------------------------------------------------------------------------------
# Bundle


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


# ---------------------------------------------------------------------------------------
# Upload


class _Progress:
    def __init__(self, total: int, callback: Callable[[int], None] | None) -> None:
        self._total = max(total, 1)
        self._callback = callback
        self._sent = 0
        self._last = 0

    def report(self, percent: int) -> None:
        if self._callback is None or percent <= self._last:
            return
        self._last = percent
        try:
            self._callback(percent)
        except Exception:  # a broken progress reporter must not break the upload
            log.warning("logbundle.progress_callback_failed", exc_info=True)
            self._callback = None

    def advance(self, n: int) -> None:
        self._sent += n
        self.report(min(90, self._sent * 10 // self._total * 10))


async def upload(
    bundle: Bundle,
    url: str,
    *,
    method: Literal["PUT", "POST"] = "PUT",
    timeout_s: float = DEFAULT_UPLOAD_TIMEOUT_S,
    progress: Callable[[int], None] | None = None,
    ca_file: Path | None = None,
) -> None:
    """Stream ``bundle`` to ``url``; return on a 2xx answer, else raise :class:`UploadError`.

    ``timeout_s`` bounds the whole request. ``ca_file`` adds a trust anchor (the system
    store stays in use); certificate and host-name verification cannot be turned off.
    """
    try:
        check_upload_url(url)
    except ValueError as exc:
        raise UploadError(f"upload_url: expected {exc}") from None
    where = safe_url(url)
    host = urlsplit(url).hostname or "?"
    try:
        size = bundle.path.stat().st_size
    except OSError as exc:
        raise UploadError(f"bundle file cannot be read ({exc.strerror})") from None
    ssl_ctx = await asyncio.to_thread(
        ssl.create_default_context, cafile=str(ca_file) if ca_file else None
    )
    chunk = max(16 * 1024, min(256 * 1024, size // 20))
    tracker = _Progress(size, progress)

    async def body() -> AsyncIterator[bytes]:
        fh = await asyncio.to_thread(bundle.path.open, "rb")
        try:
            while block := await asyncio.to_thread(fh.read, chunk):
                yield block
                tracker.advance(len(block))
        finally:
            fh.close()

    headers = {"Content-Type": "application/gzip", "Content-Length": str(size)}
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(30.0, timeout_s))
    log.info("logbundle.upload_started", url=where, method=method, size=size)
    started = time.monotonic()
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, trust_env=False) as session,
            session.request(
                method, url, data=body(), headers=headers, ssl=ssl_ctx, allow_redirects=False
            ) as resp,
        ):
            if not 200 <= resp.status < 300:
                text = (await resp.content.read(300)).decode("utf-8", "replace")
                snippet = " ".join("".join(c for c in text if c.isprintable()).split())[:200]
                extra = " (redirects are not followed)" if 300 <= resp.status < 400 else ""
                raise UploadError(
                    f"{where} answered {resp.status} {resp.reason or ''}".rstrip()
                    + extra
                    + (f": {snippet}" if snippet else ""),
                    status=resp.status,
                )
    except UploadError as exc:
        log.warning("logbundle.upload_failed", url=where, reason=str(exc))
        raise
    except TimeoutError:
        reason = f"upload to {where} did not finish within {timeout_s:g} s"
        log.warning("logbundle.upload_failed", url=where, reason=reason)
        raise UploadError(reason) from None
    except aiohttp.ClientSSLError as exc:
        reason = f"TLS verification of {host} failed ({_ssl_reason(exc)})"
        log.warning("logbundle.upload_failed", url=where, reason=reason)
        raise UploadError(reason) from None
    except aiohttp.ClientConnectorError as exc:
        err = exc.os_error.strerror or str(exc.os_error) or type(exc.os_error).__name__
        reason = f"cannot connect to {exc.host}:{exc.port} ({err})"
        log.warning("logbundle.upload_failed", url=where, reason=reason)
        raise UploadError(reason) from None
    except (aiohttp.ClientError, OSError) as exc:
        reason = f"upload to {where} failed: {type(exc).__name__}" + (
            f" ({exc})" if str(exc) else ""
        )
        reason = redact_text(reason.replace(url, where))
        log.warning("logbundle.upload_failed", url=where, reason=reason)
        raise UploadError(reason) from None
    tracker.report(100)
    log.info(
        "logbundle.uploaded", url=where, size=size, seconds=round(time.monotonic() - started, 2)
    )


def _ssl_reason(exc: aiohttp.ClientSSLError) -> str:
    cert_error = getattr(exc, "certificate_error", None)
    inner = cert_error if cert_error is not None else getattr(exc, "os_error", None)
    text = getattr(inner, "verify_message", None) or getattr(inner, "reason", None) or str(inner)
    return str(text)


# ---------------------------------------------------------------------------------------
# The whole command


async def collect_and_upload(
    params: FetchLogsParams,
    *,
    sources: LogSources,
    audit: Callable[[datetime, datetime], Awaitable[Iterable[AuditRecord]]],
    config_path: Path | None,
    workdir: Path,
    extra_files: Sequence[tuple[str, bytes]] = (),
    method: Literal["PUT", "POST"] = "PUT",
    timeout_s: float = DEFAULT_UPLOAD_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_BYTES,
    known_secrets: Sequence[str] = (),
    ca_file: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Build the bundle for ``params.window()``, upload it, delete it; return its
    :meth:`Bundle.details`. ``audit(since, until)`` returns the audit rows of the window
    (e.g. ``lambda s, u: store.ledger.audit_entries(since=s, until=u)``). Raises
    :class:`BundleError` or :class:`UploadError` (with ``details`` set)."""
    since, until = params.window()
    rows = await audit(since, until)
    bundle = await build_bundle(
        since=since,
        until=until,
        sources=sources,
        audit_entries=rows,
        config_path=config_path,
        extra_files=extra_files,
        workdir=workdir,
        max_bytes=max_bytes,
        known_secrets=known_secrets,
    )
    try:
        await upload(
            bundle,
            params.upload_url,
            method=method,
            timeout_s=timeout_s,
            progress=progress,
            ca_file=ca_file,
        )
    except UploadError as exc:
        exc.details = bundle.details()
        raise
    finally:
        await asyncio.to_thread(bundle.remove)
    return bundle.details()


__all__ = [
    "CONFIG_SECRET_KEYS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_UNIT",
    "Bundle",
    "BundleError",
    "FetchLogsParams",
    "LogSources",
    "UploadError",
    "build_bundle",
    "check_upload_url",
    "collect_and_upload",
    "redact_config",
    "redact_text",
    "safe_url",
    "upload",
]
