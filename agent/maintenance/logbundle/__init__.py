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

Layout: :mod:`.params` (the command's parameters and errors), :mod:`.collect` (journald, log
files, audit rows), :mod:`.config_redaction` (the redacted running config), :mod:`.pack`
(filter, redact, compress: :func:`build_bundle`), :mod:`.upload` (:func:`upload`,
:func:`collect_and_upload`). Text redaction itself is :mod:`agent.redaction`, shared with
the live logs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from agent.maintenance.logbundle.params import (
    DEFAULT_MAX_BYTES,
    BundleError,
    FetchLogsParams,
    UploadError,
    check_upload_url,
)
from agent.redaction import CONFIG_SECRET_KEYS, redact_text, safe_url

if TYPE_CHECKING:
    from agent.maintenance.logbundle.collect import DEFAULT_UNIT, AuditRecord, LogSources
    from agent.maintenance.logbundle.config_redaction import redact_config
    from agent.maintenance.logbundle.pack import Bundle, build_bundle
    from agent.maintenance.logbundle.upload import collect_and_upload, upload

#: name -> submodule, imported on first access (:func:`__getattr__`)
_LAZY: dict[str, str] = {
    "DEFAULT_UNIT": "collect",
    "AuditRecord": "collect",
    "LogSources": "collect",
    "redact_config": "config_redaction",
    "Bundle": "pack",
    "build_bundle": "pack",
    "collect_and_upload": "upload",
    "upload": "upload",
}


def __getattr__(name: str) -> Any:
    """Import the collecting, packing and uploading names on first access.

    The running agent needs them only for a ``fetch_logs`` command, so ``tarfile``,
    ``gzip`` and the bundle code are not loaded (resident memory) until one arrives; the
    parameters above are loaded at once (the command's registration needs them). Every
    name of the submodule is bound here when it is first imported, so ``upload`` is the
    function, not the submodule of the same name.
    """
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{module_name}")
    for lazy_name, owner in _LAZY.items():
        if owner == module_name:
            globals()[lazy_name] = getattr(module, lazy_name)
    return globals()[name]


__all__ = [
    "CONFIG_SECRET_KEYS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_UNIT",
    "AuditRecord",
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
