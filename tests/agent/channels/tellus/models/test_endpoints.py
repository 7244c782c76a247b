"""The Tellus charger endpoint table."""

from __future__ import annotations

from agent.channels.tellus.models import ENDPOINTS, RATE_LIMITS, DeviceEndpoint, RateLimitClass


def test_endpoint_table() -> None:
    assert {e.value for e in DeviceEndpoint} == {
        "/device/register", "/device/token", "/device/heartbeat", "/device/telemetry",
        "/device/events", "/device/charging-records", "/device/commands",
        "/device/command-status", "/device/firmware/status"}
    assert set(ENDPOINTS) == set(DeviceEndpoint)
    assert {e for e, s in ENDPOINTS.items() if not s.bearer_auth} == {
        DeviceEndpoint.REGISTER, DeviceEndpoint.TOKEN}
    assert {e for e, s in ENDPOINTS.items() if not s.enveloped} == {DeviceEndpoint.TOKEN}
    assert {e for e, s in ENDPOINTS.items() if s.method == "GET"} == {DeviceEndpoint.COMMANDS}
    assert {e for e, s in ENDPOINTS.items() if s.rate_limit is RateLimitClass.HIGH_FREQUENCY} \
        == {DeviceEndpoint.HEARTBEAT, DeviceEndpoint.TELEMETRY}
    assert {e for e, s in ENDPOINTS.items() if s.rate_limit is RateLimitClass.REPORTING} == {
        DeviceEndpoint.EVENTS, DeviceEndpoint.CHARGING_RECORDS, DeviceEndpoint.COMMAND_STATUS}
    assert (RATE_LIMITS[RateLimitClass.HIGH_FREQUENCY].requests,
            RATE_LIMITS[RateLimitClass.HIGH_FREQUENCY].per_seconds) == (10, 1.0)
    assert (RATE_LIMITS[RateLimitClass.REPORTING].requests,
            RATE_LIMITS[RateLimitClass.REPORTING].per_seconds) == (60, 60.0)
