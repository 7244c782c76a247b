"""Typed session checkpoints: what is stored round-trips; a damaged one is named, not a crash."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from agent.charging.session import Session, SessionRequest, as_checkpoint, record_from_checkpoint


def _session() -> Session:
    return Session(
        connector_id=2, request=SessionRequest(mode="discharge", command_id="c-1", transaction_id="tx-9"),
        start_time=datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc), started_mono=0.0, meter_start=10.0, soc_start=40,
    )


def test_a_checkpoint_round_trips_through_json_like_storage() -> None:
    cp = _session().checkpoint()
    stored = {**cp, "unknown_future_key": 1}
    back = as_checkpoint(stored)
    assert "unknown_future_key" not in back
    assert back["record_id"] == cp["record_id"] and back["mode"] == "discharge" and back["transaction_id"] == "tx-9"
    record = record_from_checkpoint(back, end_time="2026-01-02T04:04:05Z", meter_end=12.5, stop_reason="power_loss",
                                    extensions=True, send_vin=False)
    assert record["energy"] == 2.5 and record["direction"] == "discharge" and record["transaction_id"] == "tx-9"


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        ({"record_id": ""}, "checkpoint.record_id"),
        ({"connector_id": "2"}, "checkpoint.connector_id"),
        ({"meter_start": None}, "checkpoint.meter_start"),
        ({"start_time": "yesterday"}, "checkpoint.start_time"),
        ({"mode": "sideways"}, "checkpoint.mode"),
    ],
)
def test_a_damaged_checkpoint_is_refused_naming_the_key(damage: dict[str, object], named: str) -> None:
    raw = {**_session().checkpoint(), **damage}
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        as_checkpoint(raw)
