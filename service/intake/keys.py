"""Idempotency keys and the in-memory window that answers repeats without the database."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import OrderedDict
from typing import Any

import orjson

from service.model import Lead

MAX_HEADER_KEY = 200


def submission_key(form: str, lead: Lead, header_key: str | None) -> str:
    """The sender's Idempotency-Key (scoped to the form), else a hash of the normalised lead.

    Hashing the normalised lead makes a double click, a browser retry and a re-sent form one
    submission, while any change in what the person typed makes a new one.
    """
    if header_key:
        return f"h:{form}:{header_key.strip()[:MAX_HEADER_KEY]}"
    body = orjson.dumps(lead.to_json(), option=orjson.OPT_SORT_KEYS)
    return f"c:{form}:{hashlib.sha256(body).hexdigest()}"


class IdempotencyWindow:
    """Recently accepted keys → submission id, for `ttl_s` seconds, at most `size` entries.

    Only a fast path: the database's unique constraint is the truth behind it.
    """

    def __init__(self, ttl_s: float, size: int) -> None:
        self.ttl_s = ttl_s
        self.size = size
        # the id as its 128-bit int: a (float, int) tuple is not tracked by the garbage
        # collector, a UUID object is; 100,000 of them made every full collection walk them
        self._entries: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self.hits = 0

    def get(self, key: str) -> uuid.UUID | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, sid = entry
        if expires < time.monotonic():
            del self._entries[key]
            return None
        self.hits += 1
        return uuid.UUID(int=sid)

    def put(self, key: str, sid: uuid.UUID) -> None:
        if self.ttl_s <= 0:
            return
        self._entries[key] = (time.monotonic() + self.ttl_s, sid.int)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self._entries), "hits": self.hits, "ttl_s": self.ttl_s}
