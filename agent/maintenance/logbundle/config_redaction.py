"""Redaction of the running config (TOML) and of structured data for the log bundle.

Text rules come from :mod:`agent.redaction`; this module adds the layout-keeping TOML rewrite
(:func:`redact_config`, checked by re-parsing, with a plain re-rendering as fall-back) and
the masker that also replaces the caller's known secret strings.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Iterable
from datetime import date, datetime
from datetime import time as dtime
from typing import Any

import structlog

from agent.redaction import CONFIG_SECRET_KEYS, REDACTED, redact_text, redact_tree

log = structlog.get_logger(__name__)

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
