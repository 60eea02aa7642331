"""Disk exhaustion: the data volume fills up, and bad input stops being kept, not valid leads.

The data directory (`CRM_RELAY_DATA_DIR`: the spool, the embedded database) is a 32 MiB tmpfs of
its own, mounted here (root only; `sudo -n mount` otherwise). The volume is filled until under
`DATA_MIN_FREE_BYTES` are free; then a flood of bad input gets its `{"ok": false}` answer (with
`"kept": false`) and nothing more is kept, the `disk_low` alert is sent, and valid leads are still
answered and stored. Without the guard every bad body was kept (here: in `rejected`, on any
volume the database lives on).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import ServiceFactory, wait_for
from tests.integration.test_alerts import Inbox, arrives, inbox  # noqa: F401  (a fixture)
from tests.integration.test_resilience import person

SIZE_MIB = 32
MIN_FREE = 8 * 1024 * 1024
JUNK = 60


def _mount(argv: list[str]) -> bool:
    result = subprocess.run(argv, capture_output=True, text=True)
    return result.returncode == 0


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of SIZE_MIB mounted where service_factory puts the data directory; unmounted
    after."""
    where = tmp_path / "var"
    where.mkdir()
    argv = ["mount", "-t", "tmpfs", "-o", f"size={SIZE_MIB}m", "tmpfs", str(where)]
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if not _mount([*sudo, *argv]):
        where.rmdir()
        pytest.fail(
            "mounting a tmpfs needs root (or passwordless sudo): run the tests as root, "
            "as scripts/test does in the container"
        )
    try:
        yield where
    finally:
        subprocess.run([*sudo, "umount", "-l", str(where)], check=False)
        with contextlib.suppress(OSError):
            where.rmdir()


def fill(volume: Path, leave: int) -> None:
    """Write a file until only `leave` bytes are free on `volume`."""
    st = os.statvfs(volume)
    size = st.f_bavail * st.f_frsize - leave
    with open(volume / "filler", "wb") as f:
        f.write(b"\0" * size)


async def test_disk_exhaustion_by_bad_input_keeps_valid_leads_coming(
    service_factory: ServiceFactory,
    db: asyncpg.Connection,
    small_volume: Path,
    inbox: Inbox,  # noqa: F811
) -> None:
    svc = await service_factory(min_free_bytes=MIN_FREE, **inbox.settings())
    bad = {"comment": "junk " * 2000}  # no contact: bad input, ~10 KB
    status, answer = await svc.submit("junk", bad)
    assert status == 200 and answer["ok"] is False and "kept" not in answer, answer
    fill(small_volume, leave=MIN_FREE // 2)
    await arrives(inbox, "data volume low on space")

    for i in range(JUNK):
        status, answer = await svc.submit("junk", {**bad, "n": i})
        assert status == 200 and answer["ok"] is False and answer["kept"] is False, answer
        assert answer["errors"], answer
        status, answer = await svc.submit("course", person(i, prefix="701"))
        assert status == 200 and answer["ok"] is True, answer

    kept = await db.fetchval("SELECT count(*) FROM rejected WHERE endpoint = 'forms/junk'")
    assert kept == 1  # the one sent before the volume filled

    async def stored() -> bool:
        return await db.fetchval("SELECT count(*) FROM submissions") == JUNK

    await wait_for(stored, timeout=20)

    (small_volume / "filler").unlink()
    await arrives(inbox, "data volume has room again")
    status, answer = await svc.submit("junk", bad)
    assert status == 200 and answer["ok"] is False and "kept" not in answer, answer


async def test_disk_exhaustion_by_a_flood_of_bad_input_keeps_only_the_newest_rejected(
    service_factory: ServiceFactory, db: asyncpg.Connection
) -> None:
    """Each bad body used to be kept forever (64 KiB a row): past the caps the oldest go."""
    svc = await service_factory(rejected_max_rows=20, rejected_max_bytes=100_000)
    for i in range(60):  # ~10 KB each: 600 KB and 60 rows sent
        status, answer = await svc.submit("junk", {"n": f"{i:03d}", "comment": "x" * 10_000})
        assert status == 200 and answer["ok"] is False and "kept" not in answer, answer

    async def within_caps() -> bool:
        rows = await db.fetchrow("SELECT count(*) AS n, sum(octet_length(body)) AS b FROM rejected")
        return rows["n"] <= 20 and rows["b"] <= 100_000

    await wait_for(within_caps, timeout=15)
    kept = [bytes(r["body"]) for r in await db.fetch("SELECT body FROM rejected")]
    assert any(b'"n": "059"' in body for body in kept)  # the newest is kept
    assert not any(b'"n": "000"' in body for body in kept)  # the oldest went
