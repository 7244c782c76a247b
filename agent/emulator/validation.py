"""Request validation for the device endpoints, mapped onto the platform's error codes.

* body that is not JSON (or not UTF-8, or empty) → 1001 "malformed JSON body";
* JSON that is not an object → 1001 with ``details.field = "body"``;
* a missing required field → 1002 with ``details = {field}``;
* wrong type, enum value, range or timestamp format (including an explicit ``null`` for an
  optional field) → 1001 with ``details = {field, value}``.

When several problems exist, a missing field wins; otherwise the first error reported by
the model is used. Nested fields are named with dots (``phase_details.phase_a.voltage``),
list items with brackets (``commands[0]``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import ValidationError

from agent.channels.tellus.models import ApiModel, CommandPollQuery, ErrorCode
from agent.emulator.errors import ApiError

__all__ = ["ModelT", "parse_json_body", "parse_poll_query", "validate_body"]

ModelT = TypeVar("ModelT", bound=ApiModel)

_INTEGER_TEXT = re.compile(r"^[+-]?\d{1,18}$")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: bytes) -> Any:
    """Decode a request body as strict JSON (no ``NaN``/``Infinity``).

    Raises:
        ApiError: 1001 when the body is empty, not UTF-8 or not JSON.
    """
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError):
        raise ApiError(ErrorCode.INVALID_PARAMETER, "malformed JSON body") from None


def _field_name(loc: tuple[int | str, ...]) -> str:
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else part
    return name or "body"


def _api_error(exc: ValidationError) -> ApiError:
    errors = exc.errors(include_url=False)
    missing = [e for e in errors if e["type"] == "missing"]
    if missing:
        field = _field_name(tuple(missing[0]["loc"]))
        return ApiError(
            ErrorCode.MISSING_PARAMETER,
            f"missing required parameter: {field}",
            details={"field": field},
        )
    first = errors[0]
    field = _field_name(tuple(first["loc"]))
    return ApiError(
        ErrorCode.INVALID_PARAMETER,
        f"invalid parameter {field}: {first['msg']}",
        details={"field": field, "value": first.get("input")},
    )


def validate_body(model: type[ModelT], raw: bytes) -> ModelT:
    """Parse a raw request body and validate it against ``model`` in JSON mode (so an
    explicit ``null`` for an optional field is refused, as the document requires).

    Raises:
        ApiError: 1001 / 1002 as described in the module docstring.
    """
    body = parse_json_body(raw)
    if not isinstance(body, dict):
        raise ApiError(
            ErrorCode.INVALID_PARAMETER,
            "request body must be a JSON object",
            details={"field": "body"},
        )
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise _api_error(exc) from None


def parse_poll_query(query: Mapping[str, str]) -> CommandPollQuery:
    """Validate the long-poll query (``connector_id`` required ≥ 1, ``wait`` 1..60, default 30).

    Integer-looking text is converted; anything else is reported as the text received.

    Raises:
        ApiError: 1002 when ``connector_id`` is absent, 1001 for a non-integer or out-of-range
            value.
    """
    values: dict[str, Any] = {}
    for name in ("connector_id", "wait"):
        if name in query:
            text = query[name].strip()
            values[name] = int(text) if _INTEGER_TEXT.match(text) else query[name]
    try:
        return CommandPollQuery.model_validate(values)
    except ValidationError as exc:
        raise _api_error(exc) from None
