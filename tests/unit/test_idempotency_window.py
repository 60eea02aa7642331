"""The idempotency keys and the window that answers repeats from memory: no duplicate lead.

Found by mutation testing (scripts/mutate keys): each test fails with a mutant that once
survived. Time is a fake clock; nothing here waits.
"""

from __future__ import annotations

import hashlib
import sys
import uuid

from service.intake.keys import (
    ENTRY_OVERHEAD,
    MAX_WINDOW_KEY,
    IdempotencyWindow,
    bound_key,
    content_key,
    event_key,
    submission_key,
    window_key,
)
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


# --- keys: what a submission and an event are known by -----------------------------------------


def test_a_content_key_keeps_its_stored_form_across_releases() -> None:
    """The content key is stored with the submission (the database's unique key) and in Redis:
    if a release hashed the same lead to another key, a repeat sent across the upgrade would
    become a second lead. So it stays "c:<form>:<SHA-256 of the lead's sorted JSON>"."""
    one = lead({"city": "Almaty"}, {"source": "ads"})
    stored = "c:course:1577891e59e083b2430edae1becafd2ffd18235aa494fe53de3793d5e6a25462"
    assert submission_key("course", one, None) == content_key("course", one) == stored


def test_a_senders_key_is_kept_trimmed_and_to_its_first_200_characters() -> None:
    """A sender's Idempotency-Key, scoped to the form, without the spaces around it (a header
    re-sent with other padding is the same key), and bounded: it is stored with the lead."""
    one = lead({}, {})
    assert submission_key("course", one, "  k1 ") == "h:course:k1"
    long = "k" * 200
    assert submission_key("course", one, long + "tail") == f"h:course:{long}"
    assert submission_key("course", one, "") == content_key("course", one)  # an empty header


def test_a_senders_key_with_other_content_is_no_repeat_in_the_window() -> None:
    """No lost lead: a sender reusing its Idempotency-Key for other content must not be answered
    "duplicate" from the window (or Redis); only the same key with the same content is."""
    one, other = lead({"city": "Almaty"}, {}), lead({"city": "Astana"}, {})
    key = submission_key("course", one, "k1")
    assert bound_key(key, one) != bound_key(key, other)
    assert bound_key(key, one) == bound_key(submission_key("course", one, " k1 "), one)
    # the sender's key and its content's hash, the one a content key has: every process (of this
    # release or the next, sharing Redis) knows the submission by the same bound key
    digest = content_key("course", one).rsplit(":", 1)[1]
    assert bound_key(key, one) == f"h:course:k1\x1f{digest}"
    # a content key is its content already: kept as it is
    plain = submission_key("course", one, None)
    assert bound_key(plain, one) == plain


def test_a_long_key_is_held_as_its_start_and_hash_and_never_merges_with_another() -> None:
    """Bounded memory without a merged event: a key longer than MAX_WINDOW_KEY (an event key a
    sender chose) is held as its first 64 characters and its SHA-256, so two keys that differ
    anywhere, even in their last character, stay two entries."""
    edge = "k" * MAX_WINDOW_KEY
    assert window_key(edge) == edge  # up to the limit a key is itself
    long = edge + "k"
    assert window_key(long) == long[:64] + "#" + hashlib.sha256(long.encode()).hexdigest()
    clock = Clock()
    window = IdempotencyWindow(ttl_s=60, size=10, clock=clock)
    first, second = uuid.uuid4(), uuid.uuid4()
    start = "x" * 50_000
    window.put(event_key("partner", start + "1"), first)
    window.put(event_key("partner", start + "2"), second)
    assert window.get(event_key("partner", start + "1")) == first
    assert window.get(event_key("partner", start + "2")) == second
    assert window.get(event_key("other", start + "1")) is None  # scoped to its source
    assert window.bytes <= 2 * (ENTRY_OVERHEAD + 200)  # not the 100,000 characters sent


def test_a_key_written_like_another_keys_hash_is_still_another_key() -> None:
    """No lost event: a short key spelled as a long key's start, "#" and SHA-256 (what the window
    holds for the long one) must not answer for it, or the long key's event would be taken for a
    repeat of the short one's and never stored."""
    long = "e:partner\x1f" + "y" * 300
    lookalike = long[:64] + "#" + hashlib.sha256(long.encode()).hexdigest()
    assert lookalike != long and window_key(lookalike) != window_key(long)
    assert event_key("partner", lookalike.removeprefix("e:partner\x1f")) != event_key(
        "partner", long.removeprefix("e:partner\x1f")
    )


def test_a_long_key_with_a_lone_surrogate_is_held_too() -> None:
    """A key is any text a sender chose, lone surrogates included (JSON's "\\ud800"): hashing it
    must neither fail nor make two such keys one."""
    start = "x" * 300
    one, other = start + "\ud800", start + "\udfff"
    assert window_key(one) != window_key(other)
    clock = Clock()
    window = IdempotencyWindow(ttl_s=60, size=10, clock=clock)
    sid = uuid.uuid4()
    window.put(one, sid)
    assert (window.get(one), window.get(other)) == (sid, None)


# --- the window's byte cap: bounded memory ----------------------------------------------------


def cost(key: str) -> int:
    """What one entry of `key` costs the window (its `_cost`): the key's size and the rest."""
    return sys.getsizeof(window_key(key)) + ENTRY_OVERHEAD


def test_a_window_at_its_byte_cap_forgets_the_oldest_keys_first() -> None:
    """Bounded memory: the window never holds more than `max_bytes`; entries that fit exactly
    are kept, and what goes first is the oldest."""
    clock = Clock()
    keys = [f"key-{n}" for n in range(10)]  # one length: each costs the same
    window = IdempotencyWindow(ttl_s=60, size=100, clock=clock, max_bytes=3 * cost(keys[0]))
    ids = {k: uuid.uuid4() for k in keys}
    for key in keys[:3]:
        window.put(key, ids[key])
    assert len(window) == 3 and window.bytes == 3 * cost(keys[0])  # exactly at the cap
    for key in keys[3:]:
        window.put(key, ids[key])
        assert len(window) == 3 and window.bytes == 3 * cost(keys[0])
    assert [window.get(k) for k in keys] == [None] * 7 + [ids[k] for k in keys[7:]]
    window.put(keys[9], ids[keys[9]])  # put again: counted once
    assert window.bytes == 3 * cost(keys[0])


def test_a_longer_key_costs_the_window_more_bytes() -> None:
    """The cap counts what the keys take, not only how many there are: a window that fits three
    short keys holds fewer when one is 250 characters long."""
    clock = Clock()
    window = IdempotencyWindow(ttl_s=60, size=100, clock=clock, max_bytes=3 * cost("a"))
    long = "l" * 250
    for key in ("a", "b", long):
        window.put(key, uuid.uuid4())
    assert (window.get("a"), len(window)) == (None, 2)
    assert window.bytes == cost("b") + cost(long)


def test_keys_that_expire_give_their_bytes_back() -> None:
    """An expired key dropped on its look-up frees what it cost: otherwise the count drifts up
    and the window, thinking itself full, would forget fresh keys (a database round trip each)
    or, drifting down, hold more than its cap."""
    clock = Clock()
    window = IdempotencyWindow(ttl_s=60, size=100, clock=clock, max_bytes=3 * cost("k0"))
    for key in ("k0", "k1", "k2"):
        window.put(key, uuid.uuid4())
    clock.now += 61
    assert [window.get(k) for k in ("k0", "k1", "k2")] == [None] * 3
    assert (len(window), window.bytes) == (0, 0)
    fresh = {k: uuid.uuid4() for k in ("k3", "k4", "k5")}
    for key, sid in fresh.items():
        window.put(key, sid)
    assert {k: window.get(k) for k in fresh} == fresh
