"""The per-client limit against floods and forged headers, without a server: its memory stays
bounded however many addresses send, and X-Forwarded-For counts only from our own proxies."""

from __future__ import annotations

import tracemalloc

from service.intake.spam import ClientLimit, client_address, networks

PROXIES = networks(("10.0.0.0/8", "fd00::/8"))


def test_a_flood_from_many_addresses_keeps_the_client_limit_bounded_in_bytes() -> None:
    limit = ClientLimit(max_clients=10_000)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for i in range(50_000):
            limit.allow("course-" + "x" * 57, f"2001:db8::{i:x}:{i:x}", per_minute=5)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(limit) == 10_000
    per_client = (after - before) / 10_000
    print(f"client limit: {per_client:.0f} bytes per remembered client")
    assert per_client < 512


def test_a_client_over_its_rate_is_refused_and_refilled_with_time() -> None:
    now = [0.0]
    limit = ClientLimit(100, clock=lambda: now[0])
    assert [limit.allow("f", "1.2.3.4", 3) for _ in range(4)] == [True, True, True, False]
    assert limit.allow("g", "1.2.3.4", 3), "each form has its own bucket"
    now[0] += 20.0  # a minute refills 3: 20 s refills one
    assert limit.allow("f", "1.2.3.4", 3) and not limit.allow("f", "1.2.3.4", 3)
    assert limit.allow("f", "1.2.3.4", 0), "0: no limit"


def test_forged_x_forwarded_for_from_outside_is_ignored() -> None:
    assert client_address("203.0.113.9", "1.1.1.1", PROXIES) == "203.0.113.9"
    assert client_address("203.0.113.9", "1.1.1.1", ()) == "203.0.113.9"


def test_x_forwarded_for_is_read_from_the_right_past_our_own_proxies_only() -> None:
    # the client wrote "6.6.6.6" itself; our proxies appended the real address and each other
    chain = "6.6.6.6, 198.51.100.7, 10.1.2.3"
    assert client_address("10.0.0.1", chain, PROXIES) == "198.51.100.7"
    assert client_address("10.0.0.1", "10.0.0.2, 10.0.0.3", PROXIES) == "10.0.0.2"
    assert client_address("10.0.0.1", "garbage, 10.0.0.3", PROXIES) == "10.0.0.3"
    assert client_address("10.0.0.1", "", PROXIES) == "10.0.0.1"
    assert client_address("fd00::1", "[2001:db8::5]", PROXIES) == "2001:db8::5"
    assert client_address(None, "1.1.1.1", PROXIES) == "unknown"
    hops = ", ".join(["10.0.0.9"] * 10_000)
    assert client_address("10.0.0.1", f"7.7.7.7, {hops}", PROXIES) == "10.0.0.9"
