"""PC/SC ID-token reader through ``pyscard`` (optional extra ``rfid``).

Why PC/SC and not PN532-over-UART (nfcpy): PC/SC readers (ACS ACR122U/ACR1252U,
HID Omnikey, Identiv) are the common USB readers in chargers and kiosks, ``pcscd``
owns the USB driver and device sharing, and the same code reads ISO 14443 A/B and
FeliCa UIDs with the standard ``GET DATA`` pseudo-APDU (``FF CA 00 00 00``) regardless of
the reader's chipset. nfcpy talks to a few chipsets directly and needs exclusive access
to the serial port; it is a fine choice for a bare PN532 board but not for a fleet.

The card monitor runs in pyscard's thread; taps are handed to the event loop. A reader
that disappears makes ``health()`` FAULT (``code = "transport_error"``) and reports no taps.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hal.auth.interface import uid_to_id_tag
from hal.interfaces import Health, HealthState

GET_UID = [0xFF, 0xCA, 0x00, 0x00, 0x00]


class PcscReader:
    def __init__(self, reader_name: str | None = None) -> None:
        self.reader_name = reader_name
        self.name = f"pcsc:{reader_name or 'first'}"
        self._queue: asyncio.Queue[str] = asyncio.Queue(maxsize=16)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._monitor: Any = None
        self._observer: Any = None
        self._health = Health(HealthState.STALE, "comm_timeout")

    async def start(self) -> None:
        try:
            from smartcard.CardMonitoring import CardMonitor, CardObserver
        except ImportError as exc:  # pragma: no cover - depends on the extra
            self._health = Health(HealthState.FAULT, "transport_error", f"pyscard not installed: {exc}")
            return
        self._loop = asyncio.get_running_loop()
        reader = self

        class Observer(CardObserver):
            def update(self, _observable: Any, actions: Any) -> None:
                added, _removed = actions
                for card in added:
                    reader._card_added(card)

        self._observer = Observer()
        self._monitor = CardMonitor()
        self._monitor.addObserver(self._observer)
        self._health = Health(HealthState.OK)

    def _card_added(self, card: Any) -> None:
        if self.reader_name and self.reader_name not in str(card.reader):
            return
        try:
            connection = card.createConnection()
            connection.connect()
            data, sw1, sw2 = connection.transmit(GET_UID)
            connection.disconnect()
        except Exception as exc:
            self._health = Health(HealthState.DEGRADED, "transport_error", str(exc))
            return
        if (sw1, sw2) != (0x90, 0x00) or not data:
            return
        tag = uid_to_id_tag(bytes(data))
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._put, tag)

    def _put(self, tag: str) -> None:
        if not self._queue.full():
            self._queue.put_nowait(tag)

    async def next_tap(self) -> str:
        return await self._queue.get()

    async def stop(self) -> None:
        if self._monitor is not None and self._observer is not None:
            self._monitor.deleteObserver(self._observer)

    def health(self) -> Health:
        return self._health
