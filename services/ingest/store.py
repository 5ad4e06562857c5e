"""Ingest's state: the article ids it has already published."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import Column, DateTime, MetaData, String, Table, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.db import insert_ignoring_duplicates
from services.events import utcnow

# Keeps each IN (…) list well inside the database's limit on bound parameters.
_CHUNK = 500

metadata = MetaData()

seen_articles = Table(
    "ingest_seen_articles",
    metadata,
    Column("article_id", String(64), primary_key=True),
    Column("feed_url", String(2048), nullable=False),
    Column("first_seen_at", DateTime(timezone=True), nullable=False, index=True),
)


class IngestStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def unseen(self, article_ids: Iterable[str]) -> set[str]:
        """The ids among ``article_ids`` that were never marked seen."""
        ids = sorted(set(article_ids))
        seen: set[str] = set()
        async with self._engine.connect() as conn:
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                rows = await conn.execute(
                    select(seen_articles.c.article_id).where(seen_articles.c.article_id.in_(chunk))
                )
                seen.update(r[0] for r in rows)
        return set(ids) - seen

    async def mark_seen(self, feed_url: str, article_ids: Iterable[str]) -> None:
        now: datetime = utcnow()
        rows = [{"article_id": a, "feed_url": feed_url, "first_seen_at": now} for a in article_ids]
        if not rows:
            return
        async with self._engine.begin() as conn:
            await conn.execute(insert_ignoring_duplicates(self._engine, seen_articles), rows)
