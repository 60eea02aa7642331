"""Submission ids: UUIDv7 (RFC 9562 §5.7), time-ordered.

A uuid4 primary key lands each new row on a random leaf of the index: once the index outgrows
memory every insert reads and dirties a random page, and after each checkpoint the first change
to each such page writes a full page image to the WAL. A UUIDv7 starts with the millisecond it
was made, so new ids go to the right-hand edge of the index, as a sequence would, while staying
unique across processes without asking anyone. Python 3.14's `uuid.uuid7` is used where it
exists.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Callable

_RAND_B = (1 << 62) - 1
_rng = random.Random()  # seeded from os.urandom; ids need to be unique, not secret
os.register_at_fork(after_in_child=_rng.seed)  # a forked child must not repeat its parent


def _uuid7() -> uuid.UUID:
    """48 bits of Unix milliseconds, version 7, 12 random bits, variant 10, 62 random bits."""
    ms = time.time_ns() // 1_000_000
    rand = _rng.getrandbits(74)
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | (rand >> 62) << 64 | 0b10 << 62
    return uuid.UUID(int=value | rand & _RAND_B)


new_id: Callable[[], uuid.UUID] = getattr(uuid, "uuid7", _uuid7)
