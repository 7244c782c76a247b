"""Simulated ID-token reader: taps are lines appended to a file by the simulator.

The simulator's control endpoint (``POST /auth/{connector}/tap`` with ``{"id_tag": ...}``)
appends ``{"id_tag": "..."}`` lines to ``{sim_root}/auth/taps-{connector}.jsonl``; this
reader tails that file (only lines written after it started count).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from hal.interfaces import Health, HealthState


class SimulatedReader:
    def __init__(self, path: Path, poll_s: float = 0.1) -> None:
        self.path = path
        self.name = f"sim-reader:{path.name}"
        self.poll_s = poll_s
        self._offset: int | None = None
        self._pending: list[str] = []

    async def next_tap(self) -> str:
        while True:
            if self._pending:
                return self._pending.pop(0)
            self._read()
            if not self._pending:
                await asyncio.sleep(self.poll_s)

    def _read(self) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            self._offset = self._offset or 0
            return
        if self._offset is None or size < self._offset:
            self._offset = size if self._offset is None else 0
            return
        if size == self._offset:
            return
        with self.path.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read(size - self._offset)
        end = chunk.rfind(b"\n")
        if end < 0:
            return  # a line still being written
        complete = chunk[: end + 1]
        self._offset += len(complete)
        for line in complete.decode("utf-8", "replace").splitlines():
            try:
                tag = json.loads(line).get("id_tag")
            except (ValueError, AttributeError):
                continue
            if isinstance(tag, str) and 0 < len(tag) <= 20:
                self._pending.append(tag)

    def health(self) -> Health:
        return Health(HealthState.OK)


def record_tap(root: Path, connector_id: int, id_tag: str) -> None:
    """What the simulator's control endpoint does for a tap."""
    path = root / "auth" / f"taps-{connector_id}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"id_tag": id_tag}) + "\n")
