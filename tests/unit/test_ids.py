"""Submission ids are UUIDv7: version 7, RFC 9562 variant, ordered by the millisecond made."""

from __future__ import annotations

import time
import uuid

from service.ids import _uuid7, new_id


def test_layout_and_order() -> None:
    before = time.time_ns() // 1_000_000
    ids = [_uuid7() for _ in range(2000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    for i in ids:
        assert i.version == 7 and i.variant == uuid.RFC_4122
        assert before <= i.int >> 80 <= after  # the millisecond it was made
    stamps = [i.int >> 80 for i in ids]
    assert stamps == sorted(stamps)
    assert isinstance(new_id(), uuid.UUID) and new_id().version == 7
