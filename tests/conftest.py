"""Fixtures: the real broker, the real database, the real model, real loopback servers.

With ``CI=true`` a missing broker binary, database or model fails the run instead of skipping.
What the fixtures are built from lives in ``tests/helpers.py``, for tests to import.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from newsmon.db import open_engine
from tests.helpers import (
    Broker,
    LoopbackServer,
    required,
    scratch_database,
    tansu,
    unavailable,
)

# Kafka ------------------------------------------------------------------------------------------


@pytest.fixture
def kafka() -> Iterator[Broker]:
    """A fresh Tansu Kafka-protocol broker on a free loopback port, memory-only."""
    with required(tansu()) as broker:
        yield broker


# Databases --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of this test run's own, for the store tests."""
    with scratch_database("newsmon_test") as url:
        yield url


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SQLite file the migrations built, once per run; each test gets a copy of it."""
    from newsmon.migrate import migrate_url

    path = tmp_path_factory.mktemp("schema") / "migrated.db"
    # In a thread of its own: the first test that asks may already run in an event loop.
    with ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, migrate_url(f"sqlite+aiosqlite:///{path}")).result()
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """An engine on the migrated schema with every table empty: a fresh copy of a migrated
    SQLite file, or this run's PostgreSQL database, migrated (a no-op once it is) and emptied.

    Only the migrations create tables, here as in production. A TRUNCATE is many times quicker
    than dropping and creating every table.
    """
    from newsmon.migrate import migrate, target_metadata

    if request.param == "sqlite":
        copy = tmp_path / "test.db"
        shutil.copyfile(request.getfixturevalue("migrated_sqlite"), copy)
        eng = open_engine(f"sqlite+aiosqlite:///{copy}")
    else:
        eng = open_engine(request.getfixturevalue("postgres_url"))
        await migrate(eng)  # again after a test that dropped the schema
        tables = ", ".join(f'"{t.name}"' for md in target_metadata() for t in md.sorted_tables)
        async with eng.begin() as conn:
            await conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    yield eng
    await eng.dispose()


# The model --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def embedder() -> Any:
    """The real sentence-transformers model, loaded once for the whole run."""
    try:
        from newsmon.classify.model import SentenceTransformerEmbedder

        return SentenceTransformerEmbedder()
    except Exception as exc:
        unavailable(f"model not loadable: {exc}")


# Loopback HTTP servers --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _loopback_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test webhook receivers listen on loopback, which the SSRF guard refuses by default.

    The guard's own tests construct their Settings with ``webhook_allow_loopback=False``.
    """
    monkeypatch.setenv("NEWSMON_WEBHOOK_ALLOW_LOOPBACK", "true")
    # Likewise the feeds the tests serve on loopback; the feed guard's tests say false.
    monkeypatch.setenv("NEWSMON_FEED_ALLOW_PRIVATE", "true")


@pytest.fixture
def http_server() -> Iterator[LoopbackServer]:
    server = LoopbackServer()
    yield server
    server.close()
