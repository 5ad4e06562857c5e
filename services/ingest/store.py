"""Ingest's state: the feeds registry with each feed's fetch state, and the article ids seen.

The same SQL runs on SQLite and PostgreSQL. Tables are created by ``create_all`` at start.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from newsmon.db import UTCDateTime, insert_ignoring_duplicates
from newsmon.events import utcnow

# Keeps each IN (…) list well inside the database's limit on bound parameters.
_CHUNK = 500
# A seen id's last_seen_at is refreshed at most this often, so a feed listing the same items
# poll after poll costs no writes, yet an id still listed is never pruned.
_REFRESH_SEEN_AFTER = timedelta(days=1)
SEEDED_KEY = "feeds_seeded_at"

metadata = MetaData()

feeds = Table(
    "ingest_feeds",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("url", String(2048), nullable=False, unique=True),
    Column("title", String(300), nullable=False, default=""),
    Column("feed_title", String(300), nullable=False, default=""),
    Column("tags", JSON, nullable=False, default=list),
    Column("interval_s", Float, nullable=True),
    Column("paused", Boolean, nullable=False, default=False),
    Column("created_at", UTCDateTime(), nullable=False),
    # Fetch state: the validators for conditional GET, the last outcome, the schedule.
    Column("etag", String(1024), nullable=True),
    Column("last_modified", String(256), nullable=True),
    Column("last_polled_at", UTCDateTime(), nullable=True),
    Column("last_success_at", UTCDateTime(), nullable=True),
    Column("last_status", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("consecutive_failures", Integer, nullable=False, default=0),
    Column("next_poll_at", UTCDateTime(), nullable=False, index=True),
    # Counters since the feed was added.
    Column("fetches", Integer, nullable=False, default=0),
    Column("not_modified", Integer, nullable=False, default=0),
    Column("errors", Integer, nullable=False, default=0),
    Column("items_seen", Integer, nullable=False, default=0),
    Column("items_published", Integer, nullable=False, default=0),
)

seen_articles = Table(
    "ingest_seen_articles",
    metadata,
    Column("article_id", String(64), primary_key=True),
    Column("feed_url", String(2048), nullable=False),
    Column("first_seen_at", UTCDateTime(), nullable=False),
    Column("last_seen_at", UTCDateTime(), nullable=False, index=True),
)

# Facts about the registry itself, such as whether the seeds file was ever loaded.
state = Table(
    "ingest_state",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(256), nullable=False),
)


class DuplicateFeed(ValueError):
    """A feed with this URL is already registered."""


@dataclass(frozen=True)
class FeedRecord:
    """One row of the registry."""

    id: int
    url: str
    title: str
    feed_title: str
    tags: list[str]
    interval_s: float | None
    paused: bool
    created_at: datetime
    etag: str | None
    last_modified: str | None
    last_polled_at: datetime | None
    last_success_at: datetime | None
    last_status: int | None
    last_error: str | None
    consecutive_failures: int
    next_poll_at: datetime
    fetches: int
    not_modified: int
    errors: int
    items_seen: int
    items_published: int

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> FeedRecord:
        values = dict(row)
        values["tags"] = list(values["tags"] or [])
        return cls(**values)


@dataclass(frozen=True)
class PollRecord:
    """What one poll of a feed found, to be written to its row in one statement."""

    polled_at: datetime
    next_poll_at: datetime
    status: int | None
    error: str | None = None
    not_modified: bool = False
    etag: str | None = None
    last_modified: str | None = None
    feed_title: str | None = None
    items_seen: int | None = None
    new_items: int = 0
    keep_validators: bool = True


class IngestStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    # The registry ---------------------------------------------------------------------------

    async def add_feed(
        self,
        url: str,
        *,
        title: str = "",
        tags: Sequence[str] = (),
        interval_s: float | None = None,
        paused: bool = False,
        next_poll_at: datetime | None = None,
    ) -> FeedRecord:
        """Register a feed, due at once unless ``next_poll_at`` says otherwise."""
        now = utcnow()
        values = {
            "url": url,
            "title": title,
            "feed_title": "",
            "tags": list(tags),
            "interval_s": interval_s,
            "paused": paused,
            "created_at": now,
            "next_poll_at": next_poll_at or now,
        }
        try:
            async with self._engine.begin() as conn:
                result = await conn.execute(insert(feeds).values(values).returning(feeds.c.id))
                feed_id = result.scalar_one()
        except IntegrityError:
            raise DuplicateFeed(url) from None
        record = await self.get_feed(feed_id)
        assert record is not None
        return record

    async def get_feed(self, feed_id: int) -> FeedRecord | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(feeds).where(feeds.c.id == feed_id))).first()
        return FeedRecord.from_row(row._mapping) if row else None

    async def list_feeds(self) -> list[FeedRecord]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(select(feeds).order_by(feeds.c.id))
            return [FeedRecord.from_row(r._mapping) for r in rows]

    async def update_feed(self, feed_id: int, changes: Mapping[str, Any]) -> FeedRecord | None:
        """Apply ``changes`` (column → value); ``None`` when there is no such feed."""
        if changes:
            try:
                async with self._engine.begin() as conn:
                    await conn.execute(
                        update(feeds).where(feeds.c.id == feed_id).values(dict(changes))
                    )
            except IntegrityError:
                raise DuplicateFeed(str(changes.get("url", ""))) from None
        return await self.get_feed(feed_id)

    async def delete_feed(self, feed_id: int) -> bool:
        async with self._engine.begin() as conn:
            result = await conn.execute(delete(feeds).where(feeds.c.id == feed_id))
        return bool(result.rowcount)

    async def due_feeds(self, now: datetime) -> list[FeedRecord]:
        """Feeds not paused whose next poll is at or before ``now``, most overdue first."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(feeds)
                .where(feeds.c.paused.is_(False), feeds.c.next_poll_at <= now)
                .order_by(feeds.c.next_poll_at)
            )
            return [FeedRecord.from_row(r._mapping) for r in rows]

    async def next_due_at(self, skip: Iterable[int] = ()) -> datetime | None:
        """When the earliest feed not paused and not in ``skip`` is due; ``None`` if none is."""
        skip = set(skip)
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(feeds.c.id, feeds.c.next_poll_at)
                .where(feeds.c.paused.is_(False))
                .order_by(feeds.c.next_poll_at)
                .limit(len(skip) + 1)
            )
            return next((when for feed_id, when in rows if feed_id not in skip), None)

    async def record_poll(self, feed_id: int, poll: PollRecord) -> None:
        """Write one poll's outcome and bump the counters (a deleted feed is left deleted)."""
        values: dict[str, Any] = {
            "last_polled_at": poll.polled_at,
            "next_poll_at": poll.next_poll_at,
            "last_status": poll.status,
            "fetches": feeds.c.fetches + 1,
        }
        if poll.error is not None:
            values |= {
                "last_error": poll.error,
                "consecutive_failures": feeds.c.consecutive_failures + 1,
                "errors": feeds.c.errors + 1,
            }
        else:
            values |= {
                "last_error": None,
                "consecutive_failures": 0,
                "last_success_at": poll.polled_at,
                "items_published": feeds.c.items_published + poll.new_items,
            }
            if poll.not_modified:
                values["not_modified"] = feeds.c.not_modified + 1
            if poll.items_seen is not None:
                values["items_seen"] = poll.items_seen
            if poll.feed_title is not None:
                values["feed_title"] = poll.feed_title[:300]
            # A 304 may omit the validators; the ones we hold stay valid then.
            if poll.etag is not None or not poll.keep_validators:
                values["etag"] = poll.etag[:1024] if poll.etag else None
            if poll.last_modified is not None or not poll.keep_validators:
                values["last_modified"] = poll.last_modified[:256] if poll.last_modified else None
        async with self._engine.begin() as conn:
            await conn.execute(update(feeds).where(feeds.c.id == feed_id).values(values))

    async def seed_once(self, seeds: Iterable[Mapping[str, Any]]) -> int | None:
        """Register ``seeds`` unless the registry was ever seeded; returns how many were added.

        ``None`` means the registry had been seeded before: feeds the operator deleted since
        stay deleted.
        """
        async with self._engine.begin() as conn:
            if await conn.scalar(select(state.c.value).where(state.c.key == SEEDED_KEY)):
                return None
            now = utcnow()
            marked = await conn.execute(
                insert_ignoring_duplicates(self._engine, state),
                {"key": SEEDED_KEY, "value": now.isoformat()},
            )
            if not marked.rowcount:  # another process seeded in the meantime
                return None
            rows = [
                {
                    "title": "",
                    "feed_title": "",
                    "tags": [],
                    "interval_s": None,
                    "paused": False,
                    "created_at": now,
                    "next_poll_at": now,
                    **seed,
                }
                for seed in seeds
            ]
            if not rows:
                return 0
            existing = set((await conn.execute(select(feeds.c.url))).scalars())
            fresh = [r for r in rows if r["url"] not in existing]
            if fresh:
                await conn.execute(insert(feeds), fresh)
            return len(fresh)

    # Seen article ids -------------------------------------------------------------------------

    async def unseen(self, article_ids: Iterable[str]) -> set[str]:
        """The ids among ``article_ids`` never marked seen; refreshes the others' last sighting."""
        ids = sorted(set(article_ids))
        now = utcnow()
        stale_before = now - _REFRESH_SEEN_AFTER
        seen: set[str] = set()
        stale: list[str] = []
        async with self._engine.begin() as conn:
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                rows = await conn.execute(
                    select(seen_articles.c.article_id, seen_articles.c.last_seen_at).where(
                        seen_articles.c.article_id.in_(chunk)
                    )
                )
                for article_id, last_seen_at in rows:
                    seen.add(article_id)
                    if last_seen_at < stale_before:
                        stale.append(article_id)
            for start in range(0, len(stale), _CHUNK):
                await conn.execute(
                    update(seen_articles)
                    .where(seen_articles.c.article_id.in_(stale[start : start + _CHUNK]))
                    .values(last_seen_at=now)
                )
        return set(ids) - seen

    async def mark_seen(self, feed_url: str, article_ids: Iterable[str]) -> None:
        now: datetime = utcnow()
        rows = [
            {"article_id": a, "feed_url": feed_url, "first_seen_at": now, "last_seen_at": now}
            for a in article_ids
        ]
        if not rows:
            return
        async with self._engine.begin() as conn:
            await conn.execute(insert_ignoring_duplicates(self._engine, seen_articles), rows)

    async def prune_seen(self, before: datetime) -> int:
        """Forget ids no feed has listed since ``before``; returns how many."""
        async with self._engine.begin() as conn:
            result = await conn.execute(
                delete(seen_articles).where(seen_articles.c.last_seen_at < before)
            )
        return int(result.rowcount or 0)
