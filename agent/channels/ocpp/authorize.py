"""Driver authorization: local authorization list, authorization cache and the offline rules.

Version independent. Decisions (OCPP 1.6 §3.5 semantics):

* online: a tag in the local list (``LocalAuthListEnabled``) or the cache
  (``AuthorizationCacheEnabled``) with status Accepted is accepted at once when
  ``LocalPreAuthorize``; otherwise the CSMS is asked (Authorize) and the answer cached;
* offline: a known Accepted tag is accepted when ``LocalAuthorizeOffline``; an unknown
  tag when ``AllowOfflineTxForUnknownId``; everything else is refused.

The list and cache are persisted in the journal's key/value table.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

from agent.channels.ocpp.journal import Journal
from agent.channels.ocpp.settings import Settings

LIST_KEY = "auth_list"
CACHE_KEY = "auth_cache"
CACHE_MAX = 500

AskCsms = Callable[[str], Awaitable[dict[str, Any] | None]]  # None: not answered (offline)


def _valid(info: dict[str, Any]) -> bool:
    if info.get("status") != "Accepted":
        return False
    expiry = info.get("expiry_date")
    if expiry:
        try:
            return datetime.fromisoformat(str(expiry).replace("Z", "+00:00")) > datetime.now(timezone.utc)
        except ValueError:
            return False
    return True


class Authorizer:
    def __init__(self, journal: Journal, settings: Settings) -> None:
        self.journal = journal
        self.settings = settings
        self.local_list: dict[str, dict[str, Any]] = {}
        self.list_version = 0
        self.cache: dict[str, dict[str, Any]] = {}

    async def load(self) -> None:
        stored = await self.journal.kv_get(LIST_KEY, {"version": 0, "entries": {}})
        self.list_version = int(stored.get("version", 0))
        self.local_list = dict(stored.get("entries", {}))
        self.cache = dict(await self.journal.kv_get(CACHE_KEY, {}))

    def _known(self, id_tag: str) -> dict[str, Any] | None:
        if self.settings.get_bool("LocalAuthListEnabled") and id_tag in self.local_list:
            return self.local_list[id_tag]
        if self.settings.get_bool("AuthorizationCacheEnabled") and id_tag in self.cache:
            return self.cache[id_tag]
        return None

    async def authorize(self, id_tag: str, *, online: bool, ask: AskCsms) -> dict[str, Any]:
        """idTagInfo (snake_case keys) for ``id_tag``; ``status`` Accepted means go."""
        known = self._known(id_tag)
        if online:
            if known is not None and _valid(known) and self.settings.get_bool("LocalPreAuthorize"):
                return known
            answer = await ask(id_tag)
            if answer is not None:
                await self.remember(id_tag, answer)
                return answer
        if known is not None:
            if _valid(known) and self.settings.get_bool("LocalAuthorizeOffline"):
                return known
            return {**known, "status": known.get("status") if known.get("status") != "Accepted" else "Expired"}
        if self.settings.get_bool("AllowOfflineTxForUnknownId"):
            return {"status": "Accepted"}
        return {"status": "Invalid"}

    async def remember(self, id_tag: str, info: dict[str, Any]) -> None:
        """Cache an idTagInfo the CSMS gave (Authorize, Start/StopTransaction answers)."""
        if not self.settings.get_bool("AuthorizationCacheEnabled") or id_tag in self.local_list:
            return
        self.cache[id_tag] = {k: v for k, v in info.items() if v is not None}
        while len(self.cache) > CACHE_MAX:
            self.cache.pop(next(iter(self.cache)))
        await self.journal.kv_set(CACHE_KEY, self.cache)

    async def clear_cache(self) -> None:
        self.cache = {}
        await self.journal.kv_set(CACHE_KEY, {})

    async def update_list(self, version: int, update_type: str, entries: list[dict[str, Any]]) -> str:
        """SendLocalList: ``Accepted`` | ``VersionMismatch`` | ``Failed`` | ``NotSupported``."""
        if not self.settings.get_bool("LocalAuthListEnabled"):
            return "NotSupported"
        if len(entries) > self.settings.get_int("SendLocalListMaxLength"):
            return "Failed"
        if update_type == "Full":
            new: dict[str, dict[str, Any]] = {}
        else:
            if version <= self.list_version:
                return "VersionMismatch"
            new = dict(self.local_list)
        for entry in entries:
            tag = str(entry.get("id_tag"))
            info = entry.get("id_tag_info")
            if info is None:
                new.pop(tag, None)
            else:
                new[tag] = {k: v for k, v in dict(info).items() if v is not None}
        if len(new) > self.settings.get_int("LocalAuthListMaxLength"):
            return "Failed"
        self.local_list, self.list_version = new, version
        await self.journal.kv_set(LIST_KEY, {"version": version, "entries": new})
        return "Accepted"

    def get_list_version(self) -> int:
        return self.list_version if self.settings.get_bool("LocalAuthListEnabled") else -1
