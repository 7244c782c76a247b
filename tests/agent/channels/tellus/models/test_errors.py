"""The Tellus application error code table."""

from __future__ import annotations

from agent.channels.tellus.models import ERROR_CODES, error_info


def test_error_code_table() -> None:
    expected_http = {0: 200, 1001: 400, 1002: 400, 2001: 401, 2002: 401, 2003: 403, 3001: 404,
                     4001: 409, 5001: 429, 9001: 500}
    assert {int(c): i.http_status for c, i in ERROR_CODES.items()} == expected_http
    assert {int(c) for c, i in ERROR_CODES.items() if i.transient} == {5001, 9001}
    assert {int(c) for c, i in ERROR_CODES.items() if i.reauthenticate} == {2001, 2002}
    assert all(info.code == code and info.meaning for code, info in ERROR_CODES.items())
    info = error_info(2002)
    assert info is not None and info.http_status == 401
    assert error_info(1234) is None
