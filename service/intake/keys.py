"""Idempotency keys and the in-memory window that answers repeats without the database.

One window and one `KeyLocks` serve the whole process, forms and webhooks alike (service.app),
so every key says whose it is by how it begins, and the two uses never meet:
- forms: `submission_key` ("h:…" or "c:…"; it is also the key stored with the submission and in
  Redis, so it keeps its form), the lock "idem:" + that key, and the person's identities
  ("phone:…", "email:…", Lead.identities);
- webhooks: `event_key` ("e:<source>\x1f<event key>") for the window and the lock alike.
"""

from __future__ import annotations

import hashlib
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson

from service.model import Lead

MAX_HEADER_KEY = 200
# a key longer than this (an event key built from what a sender chose) is kept in the window as
# its beginning and a hash of the whole: each entry costs at most a few hundred bytes. Shorter
# than that form (64 + 1 + 64 characters), so no key kept as itself can equal another's hash
MAX_WINDOW_KEY = 128
# what one entry costs besides its key: the ordered dict's node, the (expiry, id) tuple and its
# float and int (measured: ~215 bytes on CPython 3.11, 64-bit)
ENTRY_OVERHEAD = 224


def submission_key(form: str, lead: Lead, header_key: str | None) -> str:
    """The sender's Idempotency-Key (scoped to the form), else a hash of the normalised lead.

    Hashing the normalised lead makes a double click, a browser retry and a re-sent form one
    submission, while any change in what the person typed makes a new one.
    """
    if header_key:
        return f"h:{form}:{header_key.strip()[:MAX_HEADER_KEY]}"
    return content_key(form, lead)


def content_key(form: str, lead: Lead) -> str:
    """The hash of the normalised lead, scoped to the form: equal content, equal key."""
    body = orjson.dumps(lead.to_json(), option=orjson.OPT_SORT_KEYS)
    return f"c:{form}:{hashlib.sha256(body).hexdigest()}"


def bound_key(key: str, lead: Lead) -> str:
    """The key the window and Redis know a submission by: a sender's key bound to the content
    it came with, so only the same key with the same content is a repeat there. (The database
    keeps the sender's key alone; a repeat it finds is compared with what it stored.)"""
    if not key.startswith("h:"):
        return key  # a content key is its content already
    return f"{key}\x1f{content_key('', lead)[3:]}"


def event_key(source: str, key: str) -> str:
    """A webhook event's key in the window and the locks: its source's event key, scoped to the
    source (as the database's unique (source, event key) is) and marked as an event's ("e:")."""
    # no source name holds \x1f (webhooks.handlers.SOURCE_NAME); a long key (a sender's field
    # or header) is held by the window and the key locks as its start and hash (`window_key`)
    return window_key(f"e:{source}\x1f{key}")


def window_key(key: str) -> str:
    """`key` as the window keeps it: itself when short, else its start and its SHA-256."""
    if len(key) <= MAX_WINDOW_KEY:
        return key
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{key[:64]}#{digest}"


class IdempotencyWindow:
    """Recently accepted keys → submission or event id, for `ttl_s` seconds, at most `size`
    entries and `max_bytes` bytes (keys included: a long key is kept hashed, `window_key`).

    One per process, shared by form and webhook intake: `size` bounds both together (the entries
    of either evict the oldest of both), so the memory it takes stays what it was for one. Only a
    fast path: the database's unique constraints are the truth behind it, so an evicted key costs
    a database round trip, never a duplicate.
    """

    def __init__(
        self,
        ttl_s: float,
        size: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.ttl_s = ttl_s
        self.size = size
        self.max_bytes = max_bytes
        self.bytes = 0  # what the entries cost now, by `_cost`
        self._clock = clock  # tests move time on without waiting for it
        # the id as its 128-bit int: a (float, int) tuple is not tracked by the garbage
        # collector, a UUID object is; 100,000 of them made every full collection walk them
        self._entries: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self.hits = 0

    def get(self, key: str) -> uuid.UUID | None:
        key = window_key(key)
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, sid = entry
        if expires < self._clock():
            del self._entries[key]
            self.bytes -= _cost(key)
            return None
        self.hits += 1
        return uuid.UUID(int=sid)

    def put(self, key: str, sid: uuid.UUID) -> None:
        if self.ttl_s <= 0:
            return
        key = window_key(key)
        if key not in self._entries:
            self.bytes += _cost(key)
        self._entries[key] = (self._clock() + self.ttl_s, sid.int)
        self._entries.move_to_end(key)
        while self._entries and (len(self._entries) > self.size or self.bytes > self.max_bytes):
            old, _ = self._entries.popitem(last=False)
            self.bytes -= _cost(old)

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, Any]:
        return {
            "entries": len(self._entries),
            "bytes": self.bytes,
            "hits": self.hits,
            "ttl_s": self.ttl_s,
        }


def _cost(key: str) -> int:
    return sys.getsizeof(key) + ENTRY_OVERHEAD
