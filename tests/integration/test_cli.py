"""The command line's conventions: `--version`, `status` only reads, `replay` asks for ids or
`--all`, and a database that cannot be reached is one line and exit 1, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from service import __version__, cli
from service.db.store import Store
from service.settings import DatabaseSettings, Settings
from tests.conftest import scratch_database


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CRM")}
    environ.update(LOG_LEVEL="WARNING", **env)
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"crm-relay {__version__}"


@pytest.mark.parametrize("args", [["replay"], ["replay", "--all", "3"], ["replay", "--forwards"]])
def test_replay_needs_ids_or_all(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    assert exit_.value.code == 2
    assert "--all" in capsys.readouterr().err


def test_replay_all_and_ids_parse() -> None:
    assert cli.parser().parse_args(["replay", "--all"]).all is True
    assert cli.parser().parse_args(["replay", "4", "5"]).job_ids == [4, 5]


@pytest.mark.parametrize("command", ["status", "migrate", "serve"])
def test_unreachable_database_is_one_line_and_exit_1(command: str, tmp_path: Path) -> None:
    done = run_cli(
        command,
        DATABASE_URL="postgresql://relay:s3cret@127.0.0.1:1/relay",
        CRM_RELAY_DATA_DIR=str(tmp_path),
        PORT="0",
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("crm-relay: cannot connect to the database at ")
    assert "s3cret" not in done.stderr and "relay:***@127.0.0.1:1" in lines[0]


def test_status_of_a_stopped_embedded_database_starts_nothing(tmp_path: Path) -> None:
    done = run_cli("status", CRM_RELAY_DATA_DIR=str(tmp_path / "var"))
    assert done.returncode == cli.NOT_RUNNING, done.stderr
    assert done.stdout.strip().endswith(": not running"), done.stdout
    assert done.stderr == ""
    assert not (tmp_path / "var" / "pg" / "PG_VERSION").exists(), "status ran initdb"


@pytest.fixture
async def bare_dsn(pg_template: str) -> AsyncIterator[str]:
    """An empty database: no crm-relay schema."""
    async with scratch_database(pg_template, f"bare{os.getpid()}") as dsn:
        yield dsn


async def test_status_applies_no_migration(
    bare_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(data_dir=tmp_path, database=DatabaseSettings(url=bare_dsn))

    async def never(_store: Store) -> int:
        raise AssertionError("status read a database without the schema")

    assert await cli.read_only(settings, never) == 1
    assert "crm-relay migrate" in capsys.readouterr().err
    conn = await asyncpg.connect(bare_dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('schema_migrations')") is None
    finally:
        await conn.close()


async def test_status_reads_a_migrated_database(
    db_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(data_dir=tmp_path, database=DatabaseSettings(url=db_dsn))
    assert await cli.read_only(settings, lambda store: cli.status(store, 5)) == 0
    out = capsys.readouterr().out
    assert "pending: 0" in out and "forward jobs:" in out
