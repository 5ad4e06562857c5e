"""The Alembic migrations build exactly the schema the code declares, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from services.migrate import migrate, target_metadata
from tests.conftest import ROOT


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
    assert version == "0001"


def test_newsmon_migrate_command(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "migrate", "--database", url],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "newest schema revision" in result.stderr
    assert (tmp_path / "fresh.db").stat().st_size > 0
