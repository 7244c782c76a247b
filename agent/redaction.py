"""Secret masking, the one implementation used by live logs and log bundles alike.

Contract
--------
* :func:`redact_text` masks secrets in free text: ``Bearer``/``Basic`` credentials (the
  scheme stays, the credential becomes ``***``), URL user-info (removed), values of
  secret-looking query parameters (``?sig=``, ``X-Amz-Signature=``, ``token=``, ...), and
  values of secret-looking JSON keys (also inside an escaped JSON string) and ``key=value``
  pairs. Text without any hint of a secret is returned unchanged (and fast).
* :func:`redact_tree` walks dicts, lists and tuples: the value under a key that matches
  ``keys`` (default :data:`SECRET_KEYS`) becomes ``***`` whatever it is, every other string
  goes through ``text`` (default :func:`redact_text`). Containers keep their type.
* :func:`redact_event` is the structlog processor built from these (the ``event`` name itself
  is never replaced, only masked as text).
* :func:`safe_url` reduces a URL to ``scheme://host[:port]/path`` for messages.
* :data:`CONFIG_SECRET_KEYS` is the broader key rule for config files (any ``key`` too).
"""

from __future__ import annotations

import re
from collections.abc import Callable, MutableMapping
from typing import Any, Final
from urllib.parse import urlsplit

REDACTED: Final = "***"

#: keys of log events and structured data whose values are secrets (substring, any case)
SECRET_KEYS: Final = re.compile(r"(secret|token|password|passwd|authorization|api_key|signature)", re.I)
#: config keys whose values are replaced (substring match, case-insensitive)
CONFIG_SECRET_KEYS: Final = re.compile(
    r"secret|token|password|passwd|key|signature|authorization", re.IGNORECASE
)
_QUERY_SECRET: Final = r"(?:secret|token|password|passwd|key|signature|authorization|credential|sig)"

_BEARER: Final = re.compile(r"\b(Bearer|Basic)(\s+)[A-Za-z0-9._~+/=-]{4,}")
_USERINFO: Final = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://)[^\s/@\"'<>\\]+@")
_QUERY: Final = re.compile(
    rf"([?&;][^=&\s\"'#<>\\]*{_QUERY_SECRET}[^=&\s\"'#<>\\]*=)[^&\s\"'#<>\\]*", re.IGNORECASE
)
_WORDS: Final = SECRET_KEYS.pattern.strip("()")
# every word (lower case) one of the patterns below needs to see before it can match
_HINTS: Final = tuple(
    dict.fromkeys([*_WORDS.split("|"), *_QUERY_SECRET[3:-1].split("|"), "bearer", "basic"])
)
_JSON_KEY: Final = re.compile(
    rf'("[^"\\]*(?:{_WORDS})[^"\\]*"\s*:\s*)"(?:[^"\\]|\\.)*"', re.IGNORECASE
)
# the same inside a JSON string (journald's MESSAGE holding a structlog JSON line)
_ESC_JSON_KEY: Final = re.compile(
    rf'(\\"[^"\\]*(?:{_WORDS})[^"\\]*\\"\s*:\s*)'
    r'\\"(?:\\\\\\"|\\\\\\\\|\\\\[^"\\]|\\[^"\\]|[^"\\])*\\"',
    re.IGNORECASE,
)
_KV: Final = re.compile(
    rf"(\b[\w.-]*(?:{_WORDS})[\w.-]*=)(?!\*\*\*)('[^']*'|[^\s\"',;&]+)", re.IGNORECASE
)


def redact_text(text: str) -> str:
    """Mask secrets in free text: bearer/basic credentials, URL user-info (removed),
    secret-looking query parameters, and values of secret-looking JSON keys and
    ``key=value`` pairs (key names as in :data:`SECRET_KEYS`)."""
    if "@" in text:
        text = _USERINFO.sub(r"\1", text)
    lowered = text.lower()
    if not any(word in lowered for word in _HINTS):  # the common case: nothing to look at
        return text
    text = _BEARER.sub(rf"\1\2{REDACTED}", text)
    text = _QUERY.sub(rf"\1{REDACTED}", text)
    text = _JSON_KEY.sub(rf'\1"{REDACTED}"', text)
    text = _ESC_JSON_KEY.sub(rf'\1\\"{REDACTED}\\"', text)
    return _KV.sub(rf"\1{REDACTED}", text)


def redact_tree(
    value: Any,
    *,
    keys: re.Pattern[str] = SECRET_KEYS,
    text: Callable[[str], str] = redact_text,
) -> Any:
    """``value`` with every value under a key matching ``keys`` replaced by ``***`` and every
    other string passed through ``text``; dicts, lists and tuples are walked recursively."""
    if isinstance(value, str):
        return text(value)
    if isinstance(value, dict):
        return {
            k: (REDACTED if keys.search(str(k)) else redact_tree(v, keys=keys, text=text))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact_tree(v, keys=keys, text=text) for v in value)
    return value


def redact_event(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask secret-looking keys and secrets inside strings, recursively."""
    for key in list(event_dict):
        if SECRET_KEYS.search(key) and key != "event":
            event_dict[key] = REDACTED
        else:
            event_dict[key] = redact_tree(event_dict[key])
    return event_dict


def safe_url(url: str) -> str:
    """``scheme://host[:port]/path`` of ``url``: no user-info, query or fragment (for logs
    and messages; pre-signed URLs carry their signature in the query)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid URL>"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}"
