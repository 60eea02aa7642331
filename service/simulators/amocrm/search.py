"""The amoCRM simulator's contact indexes: substring search and "changed since" without a scan.

amoCRM's `query` search is a substring search (see `state._matches`, the rule itself): the
query's digits inside a phone's digits, or the query inside the name or an email. Scanning
every contact per search cost ~14 µs a contact (70 ms a search at 5,000), more than a fast
chaos run allows. Here each contact's postings are kept up to date on
every write, a search takes the contacts that share a key with the query — a superset of the
matches — and the rule itself picks the matches among them:

- `p:` + every 5 digits of a phone: a query of ≥ 5 digits inside a phone shares all its fives
  (the rarest of them is looked up);
- `x:` + every 3 characters of the lower-case name and emails: a query inside them shares all
  its threes (the rarest is looked up). A query shorter than that is answered by a scan.

The list endpoint's order (`updated_at`, then id) is a sorted list kept the same way.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from service.simulators.amocrm.entities import Contact, digits, field_values

__all__ = ["ContactSearch"]

_PHONE_GRAM = 5  # the rule needs at least five digits in the query to compare phones
_TEXT_GRAM = 3


class ContactSearch:
    """Postings and change order for every contact of one store; `put` after each write."""

    def __init__(self) -> None:
        self._keys: dict[int, frozenset[str]] = {}
        self._postings: dict[str, set[int]] = {}
        self._order: list[tuple[int, int]] = []  # (updated_at, id), ascending
        self._stamp: dict[int, int] = {}

    def clear(self) -> None:
        self._keys.clear()
        self._postings.clear()
        self._order.clear()
        self._stamp.clear()

    def put(self, contact: Contact) -> None:
        """Index a new or changed contact (its fields, name or updated_at)."""
        new = _keys_of(contact)
        old = self._keys.get(contact.id, frozenset())
        for key in old - new:
            self._unpost(key, contact.id)
        for key in new - old:
            self._postings.setdefault(key, set()).add(contact.id)
        self._keys[contact.id] = new
        stamp = self._stamp.get(contact.id)
        if stamp != contact.updated_at:
            if stamp is not None:
                self._order.pop(bisect.bisect_left(self._order, (stamp, contact.id)))
            bisect.insort(self._order, (contact.updated_at, contact.id))
            self._stamp[contact.id] = contact.updated_at

    def drop(self, contact_id: int) -> None:
        """Forget a deleted contact."""
        for key in self._keys.pop(contact_id, frozenset()):
            self._unpost(key, contact_id)
        stamp = self._stamp.pop(contact_id, None)
        if stamp is not None:
            self._order.pop(bisect.bisect_left(self._order, (stamp, contact_id)))

    def candidates(self, query: str) -> set[int] | None:
        """Ids of every contact the query may match (more, never fewer); None: any of them."""
        needle = query.strip().lower()
        if len(needle) < _TEXT_GRAM:
            return None
        found = set(self._rarest("x:", needle, _TEXT_GRAM))
        wanted = digits(query)
        if len(wanted) >= _PHONE_GRAM:
            found.update(self._rarest("p:", wanted, _PHONE_GRAM))
        return found

    def changed(self, since: int, until: int | None) -> Iterator[int]:
        """Ids of the contacts with `since <= updated_at <= until`, oldest change first."""
        for updated_at, contact_id in self._order[bisect.bisect_left(self._order, (since,)) :]:
            if until is not None and updated_at > until:
                return
            yield contact_id

    def _rarest(self, kind: str, text: str, size: int) -> set[int]:
        """The shortest posting list among the text's grams: a contact that holds the text holds
        every one of them, so any one list is a superset; the shortest is the least to check."""
        lists = (self._postings.get(kind + gram, set()) for gram in _grams(text, size))
        return min(lists, key=len)

    def _unpost(self, key: str, contact_id: int) -> None:
        ids = self._postings.get(key)
        if ids is not None:
            ids.discard(contact_id)
            if not ids:
                del self._postings[key]


def _keys_of(contact: Contact) -> frozenset[str]:
    keys: set[str] = set()
    for phone in map(digits, field_values(contact.fields, "PHONE")):
        if phone:
            keys.update("p:" + g for g in _grams(phone, _PHONE_GRAM))
    for text in (contact.name, *field_values(contact.fields, "EMAIL")):
        keys.update("x:" + g for g in _grams(text.lower(), _TEXT_GRAM))
    return frozenset(keys)


def _grams(text: str, size: int) -> Iterator[str]:
    return (text[i : i + size] for i in range(len(text) - size + 1))
