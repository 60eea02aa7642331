"""The idempotency keys and the window that answers repeats from memory: no duplicate lead.

Found by mutation testing (scripts/mutate keys): each test fails with a mutant that once
survived. Time is a fake clock; nothing here waits.
"""

from __future__ import annotations

import uuid

from service.intake.keys import IdempotencyWindow, submission_key
from service.model import Lead


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lead(fields: dict[str, object], utm: dict[str, str]) -> Lead:
    return Lead(
        form="course", phone="+77011234567", email=None, name="Anna", utm=utm, fields=fields
    )


def test_the_same_lead_sent_with_its_fields_in_another_order_is_one_submission() -> None:
    """A re-sent form whose fields come in another order (another browser, a retrying queue)
    must hash to the same key, or the repeat becomes a second lead."""
    one = lead({"city": "Almaty", "course": "python"}, {"utm_source": "ads", "utm_medium": "cpc"})
    other = lead({"course": "python", "city": "Almaty"}, {"utm_medium": "cpc", "utm_source": "ads"})
    assert submission_key("course", one, None) == submission_key("course", other, None)
    changed = lead(
        {"city": "Astana", "course": "python"}, {"utm_source": "ads", "utm_medium": "cpc"}
    )
    assert submission_key("course", changed, None) != submission_key("course", one, None)


def test_a_window_of_zero_seconds_remembers_nothing() -> None:
    """IDEMPOTENCY_WINDOW_S=0 turns the window off: every repeat goes to the database."""
    clock = Clock()
    window = IdempotencyWindow(ttl_s=0, size=10, clock=clock)
    window.put("k", uuid.uuid4())
    assert window.get("k") is None
    assert len(window) == 0


def test_a_window_shorter_than_a_second_still_answers_a_repeat_within_it() -> None:
    clock = Clock()
    window = IdempotencyWindow(ttl_s=0.5, size=10, clock=clock)
    sid = uuid.uuid4()
    window.put("k", sid)
    clock.now += 0.4
    assert window.get("k") == sid
    clock.now += 0.2
    assert window.get("k") is None


def test_the_window_counts_each_repeat_it_answered() -> None:
    """The hit count is what the metrics and the admin API show of the window at work."""
    clock = Clock()
    window = IdempotencyWindow(ttl_s=60, size=10, clock=clock)
    assert counts(window) == {"entries": 0, "hits": 0, "ttl_s": 60}
    window.put("k", uuid.uuid4())
    assert window.get("k") is not None
    assert window.get("k") is not None
    assert window.get("other") is None  # a miss is no hit
    assert counts(window) == {"entries": 1, "hits": 2, "ttl_s": 60}
    assert window.stats()["bytes"] > 0


def counts(window: IdempotencyWindow) -> dict[str, object]:
    """The window's stats but its size in bytes (what a key costs is the byte cap's concern)."""
    return {k: v for k, v in window.stats().items() if k != "bytes"}


def test_a_full_window_forgets_the_oldest_key_first() -> None:
    clock = Clock()
    window = IdempotencyWindow(ttl_s=60, size=2, clock=clock)
    ids = {k: uuid.uuid4() for k in "abc"}
    window.put("a", ids["a"])
    window.put("b", ids["b"])
    window.put("a", ids["a"])  # put again: now the newest
    window.put("c", ids["c"])
    assert window.get("b") is None
    assert (window.get("a"), window.get("c")) == (ids["a"], ids["c"])
    assert len(window) == 2
