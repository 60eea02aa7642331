"""Memory exhaustion through the idempotency window: keys a sender chooses must not pile up.

A generic webhook's event key comes from a body field or a header the sender picks, and the
window (one per process, 100,000 entries) kept each key whole: 2,000 events with 50 KB keys held
~100 MB. Now a long key is kept as its start and a hash, and the window is bounded in bytes too.
"""

from __future__ import annotations

import tracemalloc
import uuid

from service.intake.keys import IdempotencyWindow, event_key

KEYS = 2000
KEY_CHARS = 50_000


def test_memory_exhaustion_by_long_idempotency_keys_is_bounded() -> None:
    window = IdempotencyWindow(ttl_s=300, size=100_000, max_bytes=4 * 1024 * 1024)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(KEYS):
            key = event_key("partner", f"field:{n:08d}" + "x" * KEY_CHARS)
            window.put(key, uuid.uuid4())
            del key
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 2 * 1024 * 1024, f"the window holds {held} bytes for {KEYS} keys"
    # a long key still finds its entry
    again = event_key("partner", "field:00000007" + "x" * KEY_CHARS)
    assert window.get(again) is not None


def test_memory_exhaustion_of_the_idempotency_window_stops_at_its_byte_cap() -> None:
    window = IdempotencyWindow(ttl_s=300, size=1_000_000, max_bytes=1024 * 1024)
    for n in range(50_000):
        window.put(f"h:form:{n:0200d}", uuid.uuid4())
    assert window.bytes <= 1024 * 1024
    assert len(window) < 50_000
    assert window.get(f"h:form:{49_999:0200d}") is not None  # the newest are kept
    assert window.get(f"h:form:{0:0200d}") is None  # the oldest went first
