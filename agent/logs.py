"""Structured logging set-up: structlog over the standard library.

* JSON lines when stderr is not a TTY (journald, files, CI), a readable console
  renderer on a TTY; ``format`` in ``[logging]`` overrides the choice.
* A redaction processor runs last before rendering: any key that names a secret
  (``secret``, ``token``, ``password``, ``authorization``, ...) is replaced by
  ``"***"`` whatever the caller passed, and bearer tokens inside strings are masked.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any, MutableMapping

import structlog

SECRET_KEYS = re.compile(r"(secret|token|password|passwd|authorization|api_key|signature)", re.I)
BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+")


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return BEARER.sub(r"\1***", value)
    if isinstance(value, dict):
        return {k: ("***" if SECRET_KEYS.search(str(k)) else _redact_value(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value(v) for v in value)
    return value


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask secret-looking keys and bearer tokens, recursively."""
    for key in list(event_dict):
        if SECRET_KEYS.search(key) and key != "event":
            event_dict[key] = "***"
        else:
            event_dict[key] = _redact_value(event_dict[key])
    return event_dict


def configure(level: str = "info", fmt: str = "auto", file: Path | None = None) -> None:
    """Configure structlog and the stdlib root logger once for the whole process."""
    stream = sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and (file is not None or not stream.isatty()))
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redact_secrets,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=(
            structlog.WriteLoggerFactory(file=file.open("a", encoding="utf-8"))
            if file is not None
            else structlog.PrintLoggerFactory(file=stream)
        ),
        cache_logger_on_first_use=False,
    )
    # libraries (pymodbus, python-can, aiohttp) log through the stdlib: keep them quiet
    logging.basicConfig(level=logging.WARNING, stream=stream, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("pymodbus", "can", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
