"""Schema migrations: bring the database to the newest revision, safely from several processes."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import MetaData, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from newsmon.db import open_engine

log = logging.getLogger(__name__)

# Any constant shared by all newsmon processes: the key of the PostgreSQL advisory lock.
_LOCK_KEY = 0x6E65_7773_6D6F_6E  # "newsmon"


def target_metadata() -> list[MetaData]:
    """Every service's tables, the database bus's and the kernel's secrets. Like the runner,
    this module sees all three services."""
    from newsmon.alerts.tables import metadata as alerts
    from newsmon.bus._backends.database import metadata as bus
    from newsmon.classify.store import metadata as classify
    from newsmon.feedback_links import metadata as kernel
    from newsmon.ingest.store import metadata as ingest

    return [ingest, classify, alerts, bus, kernel]


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.attributes["connection"] = connection
    return config


async def migrate(engine: AsyncEngine) -> None:
    """Upgrade to the newest revision; a no-op when the schema is current."""
    async with _one_at_a_time(engine), engine.connect() as conn:
        await conn.run_sync(_upgrade)
        await conn.commit()


@asynccontextmanager
async def _one_at_a_time(engine: AsyncEngine) -> AsyncIterator[None]:
    """Hold a lock every newsmon process migrating this database takes.

    Processes starting together (the three services, or two classify members) would otherwise
    all see an empty schema and all try to create it. PostgreSQL: an advisory lock, held by a
    connection of its own. SQLite: its processes share a machine, so a lock file beside the
    database.
    """
    if engine.dialect.name == "postgresql":
        async with engine.connect() as holder:
            await holder.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _LOCK_KEY})
            try:
                yield
            finally:
                await holder.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield  # nothing another process could share
        return
    fd = os.open(f"{database}.migrate-lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


async def migrate_url(url: str) -> None:
    """``newsmon migrate``: migrate the database at ``url``."""
    engine = open_engine(url)
    try:
        await migrate(engine)
    finally:
        await engine.dispose()
    log.info("database %s is at the newest schema revision", engine.url.render_as_string())


def _upgrade(connection: Connection) -> None:
    command.upgrade(alembic_config(connection), "head")
