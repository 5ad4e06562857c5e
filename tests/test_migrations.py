"""The Alembic migrations build exactly the schema the code declares, on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from newsmon.migrate import migrate, target_metadata
from tests.helpers import ROOT, scratch_database


def _reset(connection: Connection) -> None:
    for metadata in target_metadata():
        metadata.drop_all(connection)
    connection.execute(text("DROP TABLE IF EXISTS alembic_version"))


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    differences = compare_metadata(context, target_metadata())  # type: ignore[arg-type]
    # alembic_version is Alembic's own table, not declared by the code.
    return [
        d for d in differences if not (d[0] == "remove_table" and d[1].name == "alembic_version")
    ]


async def test_migrations_build_the_declared_schema_and_are_idempotent(engine: Any) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(_reset)
    await migrate(engine)
    await migrate(engine)  # the second run finds nothing to do
    async with engine.connect() as conn:
        assert await conn.run_sync(_differences) == []
        tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
    declared = {name for md in target_metadata() for name in md.tables}
    assert declared <= tables
    assert version == "0007"


def test_newsmon_migrate_command(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    result = subprocess.run(
        [sys.executable, "-m", "newsmon.cli", "migrate", "--database", url],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "newest schema revision" in result.stderr
    assert (tmp_path / "fresh.db").stat().st_size > 0


RACER = """
import asyncio, os, sys, time
from newsmon.migrate import migrate_url

go = sys.argv[2]
while not os.path.exists(go):  # everyone has imported: now all start at once
    time.sleep(0.001)
asyncio.run(migrate_url(sys.argv[1]))
"""


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_processes_starting_together_migrate_one_at_a_time(tmp_path: Path, backend: str) -> None:
    """Services start together on an empty database: each must find the schema, none fail."""
    go = tmp_path / "go"
    with contextlib.ExitStack() as stack:
        if backend == "sqlite":
            url = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
        else:
            url = stack.enter_context(scratch_database("newsmon_migrate"))
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", RACER, url, str(go)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for _ in range(6)
        ]
        time.sleep(3)  # the imports are done: they wait for the go file
        go.touch()
        outputs = [p.communicate(timeout=120)[0].decode() for p in processes]
    assert [p.returncode for p in processes] == [0] * 6, "\n".join(outputs)
