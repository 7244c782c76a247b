"""The wire types every Tellus model is built from: protocol constants, UTC timestamps, JSON-typed
scalars, the "optional but not nullable" marker and :class:`ApiModel` (extra properties kept,
absent fields omitted). See :mod:`agent.channels.tellus.models` for the contracts.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from annotated_types import Ge, Interval
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PlainSerializer,
    Strict,
    WithJsonSchema,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

from agent.utctime import parse_rfc3339 as parse_utc_timestamp
from agent.utctime import to_iso

API_VERSION = "1.3.0"
"""Version of the platform API these models describe."""


TOKEN_LIFETIME_SECONDS = 86400
"""Documented lifetime of a device access token (24 h); there is no refresh token."""


LONG_POLL_WAIT_MIN = 1
"""Smallest ``wait`` (seconds) accepted by ``GET /v1/device/commands``."""


LONG_POLL_WAIT_MAX = 60
"""Largest ``wait`` (seconds) accepted by ``GET /v1/device/commands``."""


LONG_POLL_WAIT_DEFAULT = 30
"""``wait`` the platform uses when the query parameter is omitted."""


def format_utc_timestamp(value: datetime) -> str:
    """Serialise an aware datetime the way the API wants it: UTC, ISO 8601, ``Z`` suffix.

    Whole seconds are written without a fraction (``2025-03-15T10:30:00Z``); a non-zero
    sub-second part is written with millisecond precision (``2025-03-15T10:30:00.250Z``).

    Raises:
        ValueError: ``value`` is naive (has no UTC offset) — its instant is unknowable.
    """
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("timestamp must be timezone-aware")
    return to_iso(value, millis=True)


def _coerce_timestamp(value: Any) -> datetime:
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("timestamp must be timezone-aware")
        return value.astimezone(UTC)
    if isinstance(value, str):
        return parse_utc_timestamp(value)
    raise ValueError("timestamp must be an ISO 8601 date-time string")


UtcTimestamp = Annotated[
    datetime,
    BeforeValidator(_coerce_timestamp),
    PlainSerializer(format_utc_timestamp, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
"""A ``date-time`` field: aware UTC datetime in Python, ``...Z`` string on the wire."""


def _integral_float_to_int(value: Any) -> Any:
    # JSON Schema's "integer" accepts 1.0; booleans stay rejected by the strict validator.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_AS_INT = BeforeValidator(_integral_float_to_int)


ApiInt = Annotated[int, Strict(), _AS_INT]
"""A JSON integer: ``1`` or ``1.0``; never a string or a boolean."""


ApiNumber = Annotated[float, Strict(), Field(allow_inf_nan=False)]
"""A finite JSON number (integers allowed); never a string or a boolean."""


ApiString = Annotated[str, Strict()]
"""A JSON string."""


ConnectorId = Annotated[int, Strict(), Ge(1), _AS_INT]
"""A connector number: 1-based, unique within one device."""


Percent = Annotated[int, Strict(), Interval(ge=0, le=100), _AS_INT]
"""An integer percentage 0..100 (SOC, progress)."""


WaitSeconds = Annotated[
    int, Strict(), Interval(ge=LONG_POLL_WAIT_MIN, le=LONG_POLL_WAIT_MAX), _AS_INT
]
"""The long-poll ``wait`` in seconds."""


class _NotNull:
    """Annotation for optional fields: may be omitted, but a JSON ``null`` is rejected.

    The published schemas type optional properties without ``null``. In Python ``None``
    means "absent" (accepted, and omitted by :meth:`ApiModel.to_wire`); only JSON input
    (``model_validate_json``) is held to the document. The JSON schema drops the null
    alternative so it matches the document.
    """

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.with_info_before_validator_function(_reject_json_null, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        alternatives = json_schema.get("anyOf")
        if isinstance(alternatives, list):
            kept = [alt for alt in alternatives if alt != {"type": "null"}]
            if len(kept) == 1:
                rest = {k: v for k, v in json_schema.items() if k != "anyOf"}
                return {**kept[0], **rest}
        return json_schema


def _reject_json_null(value: Any, info: core_schema.ValidationInfo) -> Any:
    if value is None and info.mode == "json":
        raise ValueError("must not be null; omit the field instead")
    return value


NOT_NULL = _NotNull()


def _drop_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def _optional(**kwargs: Any) -> Any:
    """``Field`` for an omittable property: default ``None``, no ``default`` in the JSON schema."""
    return Field(default=None, json_schema_extra=_drop_default, **kwargs)


class ApiModel(BaseModel):
    """Base of every wire model: keeps extra properties, validates on assignment."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    def to_wire(self) -> dict[str, Any]:
        """Return the JSON-ready body: aliases applied, timestamps as ``Z`` strings, absent
        (``None``) optional fields and ``None``-valued extras omitted.

        ``None`` values *inside* free-form objects (``params``, ``data``, ``details``) are kept.
        """
        return self.model_dump(mode="json", exclude_none=True, by_alias=True)

    def to_json(self) -> str:
        """Return :meth:`to_wire` as a compact JSON string."""
        return self.model_dump_json(exclude_none=True, by_alias=True)
