"""Structured logging set-up: structlog over the standard library.

* JSON lines when stderr is not a TTY (journald, files, CI), a readable console
  renderer on a TTY; ``format`` in ``[logging]`` overrides the choice. Under journald
  every line carries its syslog priority (``<N>`` prefix); with ``[logging] file`` the
  file is rotated by size.
* A redaction processor (:func:`agent.redaction.redact_event`, the same masking the log
  bundle applies) runs last before rendering: any key that names a secret (``secret``,
  ``token``, ``password``, ``authorization``, ...) is replaced by ``"***"`` whatever the
  caller passed, and inside strings Bearer/Basic credentials, URL user-info, secret query
  parameters (``?sig=``...) and secret ``key=value`` / JSON values are masked.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, MutableMapping, TextIO

import structlog

from agent.redaction import redact_event

#: syslog priorities (sd-daemon.h SD_DEBUG..SD_CRIT) by structlog / stdlib level name
SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
#: the agent's own loggers hang below this name; libraries stay at WARNING on the root
AGENT_LOGGER = "charger_agent"
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 5


def under_journald(stream: TextIO, env: Any = None) -> bool:
    """True when ``stream`` is the journal stream systemd connected (``$JOURNAL_STREAM`` =
    ``device:inode`` of it; a child that inherited the variable but writes elsewhere is not)."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class JournalPriority:
    """Wraps a renderer: every line starts with ``<N>``, its syslog priority, which
    journald strips and stores as PRIORITY= (``SyslogLevelPrefix=``, on by default), so
    ``journalctl -p warning -u charger-agent`` and the colours in ``journalctl`` work."""

    def __init__(self, renderer: Any) -> None:
        self.renderer = renderer

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
        level = str(event_dict.get("level", method)).lower()
        return f"<{SYSLOG_PRIORITY.get(level, 6)}>{self.renderer(logger, method, event_dict)}"


def configure(
    level: str = "info",
    fmt: str = "auto",
    file: Path | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    backups: int = DEFAULT_BACKUPS,
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and the stdlib root logger once for the whole process.

    Everything -- the agent's structlog events and the libraries' stdlib records -- goes
    through one stdlib handler: a :class:`logging.handlers.RotatingFileHandler` on
    ``file`` (rotated at ``max_bytes``, ``backups`` old files kept: ``agent.log.1`` ...),
    else a stream handler on stderr, with ``<N>`` priority prefixes when stderr is the
    journal (``$JOURNAL_STREAM``). The redaction processor runs for both kinds of record.
    """
    stream = stream if stream is not None else sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and (file is not None or not stream.isatty()))
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redact_event,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=file is None and stream.isatty())
    )
    handler: logging.Handler
    if file is not None:
        from logging.handlers import RotatingFileHandler  # only for a log file (journald needs none)

        file.parent.mkdir(parents=True, exist_ok=True)
        handler = RotatingFileHandler(
            file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=False
        )
    else:
        handler = logging.StreamHandler(stream)
        if under_journald(stream):
            renderer = JournalPriority(renderer)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    # libraries (pymodbus, python-can, aiohttp) log through the stdlib: keep them quiet
    root.setLevel(logging.WARNING)
    for noisy in ("pymodbus", "can", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    agent_logger = logging.getLogger(AGENT_LOGGER)
    agent_logger.setLevel(logging.DEBUG)  # structlog's filtering wrapper applies `level`

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=lambda *_args: agent_logger,
        cache_logger_on_first_use=False,
    )
