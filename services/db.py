"""Database plumbing shared by the services: one async SQLAlchemy engine per process."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, TypeDecorator, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.schema import Table

from newsmon.events import as_utc


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that goes in and comes out time-zone aware, in UTC, on every database.

    SQLite has no time zones: its values are written as UTC without an offset (so that they
    compare as text in time order) and read back as UTC. A naive value going in is taken as UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = as_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return as_utc(value)


def open_engine(url: str) -> AsyncEngine:
    """Create the engine for ``url`` (``sqlite+aiosqlite://…`` or ``postgresql+asyncpg://…``)."""
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # WAL lets the API read while a service writes; the timeout waits out a writer.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return create_async_engine(url, pool_pre_ping=True)


def insert_ignoring_duplicates(engine: AsyncEngine, table: Table) -> Insert:
    """An INSERT that skips rows whose primary key exists (SQLite and PostgreSQL)."""
    dialect = engine.dialect.name
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    raise ValueError(f"unsupported database dialect {dialect!r}")


async def database_ready(engine: AsyncEngine) -> bool:
    """Whether the database answers a trivial query within two seconds."""
    try:
        async with asyncio.timeout(2), engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except (TimeoutError, OSError, SQLAlchemyError):
        return False
    return True
