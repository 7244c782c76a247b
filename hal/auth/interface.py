"""The ID-token reader contract.

``await reader.next_tap()`` returns the next presented token as an OCPP idTag: the
card's UID in upper-case hex (at most 20 characters), once per presentation (a card
left on the reader is not repeated). ``health()`` says whether the reader works; a
reader that fails keeps failing safe: it reports no taps, it never invents one.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from hal.interfaces import Health


@runtime_checkable
class IdTokenReader(Protocol):
    name: str

    async def next_tap(self) -> str: ...
    def health(self) -> Health: ...


def uid_to_id_tag(uid: bytes) -> str:
    """The idTag of a card UID: upper-case hex, truncated to OCPP's 20 characters."""
    return uid.hex().upper()[:20]
