"""Chaos runs: the short form runs in CI; `CHAOS_LONG=1` runs the same scenario with the issue's
numbers (5 SIGKILLs during 5,000 submissions, PostgreSQL down 10 s, a 30 s 429 storm).

The resilience fixtures are reused, not copied: a PostgreSQL server the test may stop and start
(`own_pg`) and the amoCRM simulator on a real port (`simulator`, from tests/conftest.py)."""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from service.crm.simulator_entities import Contact, digits, field_values
from service.crm.simulator_state import AmoStore
from tests.integration.conftest import own_pg  # noqa: F401  (a fixture, used by name)


@dataclass(frozen=True)
class ChaosPlan:
    """How hard one chaos run pushes."""

    people: int
    kills: int
    pg_down_s: float
    storm_s: float
    submit_rate: float  # submissions per second the clients aim at, so chaos overlaps intake
    deadline_s: float  # for everything to be delivered once the last submission was answered
    error_rate: float = 0.20  # 5xx instead of the work
    timeout_rate: float = 0.05  # the work done, the answer lost (hang past our timeout)

    @property
    def timeout_s(self) -> float:
        """The pytest timeout for one run."""
        return self.people / self.submit_rate + self.deadline_s + 15 * self.kills + 60


SHORT = ChaosPlan(people=600, kills=2, pg_down_s=3, storm_s=3, submit_rate=40, deadline_s=60)
LONG = ChaosPlan(people=5000, kills=5, pg_down_s=10, storm_s=30, submit_rate=35, deadline_s=600)


def chaos_plan() -> ChaosPlan:
    return LONG if os.environ.get("CHAOS_LONG") == "1" else SHORT


@pytest.fixture
def plan() -> ChaosPlan:
    return chaos_plan()


class FastContactSearch:
    """The simulator's contact search, without re-reading every contact on every search.

    `AmoStore.search_contacts` runs a regex over every contact's fields per search: ~14 µs per
    contact, 69 ms per search at 5,000 contacts, so the simulator (one core, in the test process)
    cannot answer the long run's 80 calls/s and its slow answers turn into our timeouts. This
    keeps the same matching rule (`simulator_state._matches`: the query's digits inside a phone
    or a phone's last ten digits inside the query's; the query inside the name or an email), over
    fields laid out once per write to the store, and checks every CHECK_EVERY-th answer against
    the simulator's own search.
    """

    WRITES = ("clear", "create_complex", "create_leads", "create_contacts", "update_leads",
              "update_contacts", "add_notes")  # fmt: skip
    CHECK_EVERY = 100

    def __init__(self, store: AmoStore) -> None:
        self.store = store
        self.slow = store.search_contacts
        self.version = 0
        self.built = -1
        self.searches = 0
        self._digits: dict[str, str] = {}
        self.phones = _Blob("|")
        self.texts = _Blob("\x00")
        self.tails: dict[str, list[int]] = {}
        self.order: dict[int, Contact] = {}
        for name in self.WRITES:
            setattr(store, name, self._counting(getattr(store, name)))
        store.search_contacts = self.search  # type: ignore[method-assign]

    def _counting(self, write: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.version += 1
            return write(*args, **kwargs)

        return wrapped

    def _prepare(self) -> None:
        if self.built == self.version:
            return
        self.phones, self.texts, self.tails = _Blob("|"), _Blob("\x00"), {}
        self.order = dict(enumerate(self.store.contacts.values()))
        for n, c in self.order.items():
            for value in field_values(c.fields, "PHONE"):
                if (p := self._digits.get(value)) is None:
                    p = self._digits[value] = digits(value)
                if p:
                    self.phones.add(p, n)
                    self.tails.setdefault(p[-10:], []).append(n)
            for text in (c.name, *field_values(c.fields, "EMAIL")):
                self.texts.add(text.lower(), n)
        self.phones.close()
        self.texts.close()
        self.built = self.version

    def search(self, query: str) -> list[Contact]:
        needle = query.strip().lower()
        if not needle or "\x00" in needle:
            return self.slow(query)
        self._prepare()
        wanted = digits(query)
        hits = set(self.texts.owners_of(needle))
        if len(wanted) >= 5:
            hits.update(self.phones.owners_of(wanted))
            for size in range(1, min(10, len(wanted)) + 1):
                for at in range(len(wanted) - size + 1):
                    hits.update(self.tails.get(wanted[at : at + size], ()))
        found = [self.order[n] for n in sorted(hits)]
        self.searches += 1
        if self.searches % self.CHECK_EVERY == 0:
            expected = [c.id for c in self.slow(query)]
            assert [c.id for c in found] == expected, (query, expected)
        return found


class _Blob:
    """Strings joined by a separator the needle cannot hold: one C-speed `find` over all."""

    def __init__(self, separator: str) -> None:
        self.separator = separator
        self.parts: list[str] = []
        self.starts: list[int] = []
        self.owners: list[int] = []
        self.size = 0
        self.text = ""

    def add(self, part: str, owner: int) -> None:
        self.parts.append(part)
        self.starts.append(self.size)
        self.owners.append(owner)
        self.size += len(part) + 1

    def close(self) -> None:
        self.text = self.separator.join(self.parts)

    def owners_of(self, needle: str) -> list[int]:
        found, at = [], self.text.find(needle)
        while at != -1:
            found.append(self.owners[bisect.bisect_right(self.starts, at) - 1])
            at = self.text.find(needle, at + 1)
        return found
