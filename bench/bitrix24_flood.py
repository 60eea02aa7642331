"""What refusing one unauthenticated Bitrix24 field flood costs the event loop.

    .venv/bin/python -m bench.bitrix24_flood

A stranger's urlencoded body of 100,000 fields (~0.9 MB) with a guessed application token: the
handler finds the token in the bytes (`bitrix24_raw_token`) and refuses it before any parse. The
full parse it used to do first is timed next to it. In-process, no server; best and worst of 5.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from service.intake.bodies import parse_body
from service.webhooks.events import bitrix24_raw_token

FORM = "application/x-www-form-urlencoded"


def timed(fn: Callable[[], object], rounds: int = 5) -> tuple[float, float]:
    seconds = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return min(seconds), max(seconds)


def main() -> None:
    fields = "&".join(f"f{i}=1" for i in range(99_999)).encode()
    flood = fields + b"&auth[application_token]=guess"
    print(f"body: {len(flood)} bytes, 100000 fields")
    for name, fn in (
        ("token found in the bytes (the check)", lambda: bitrix24_raw_token(FORM, flood)),
        ("full parse (what the check spares)", lambda: parse_body(FORM, flood, max_fields=100_000)),
    ):
        best, worst = timed(fn)
        print(f"{name}: {best * 1000:.1f}-{worst * 1000:.1f} ms")


if __name__ == "__main__":
    main()
