"""The classify service's state: versioned topics, match history, recent article embeddings.

Topics are kept as their JSON definition beside the version; a deleted topic leaves a tombstone
so that a topic created again under the same slug continues its version count, and every past
match stays attributable to exactly one definition. Recent articles keep their passages and
vectors (float16: half the space, and previews compare like with like) so that a draft topic
can be replayed over them without the model re-reading any article.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from newsmon.classify.scoring import EmbeddedArticle
from newsmon.classify.topics import Topic
from newsmon.db import UTCDateTime, insert_ignoring_duplicates
from newsmon.events import Article, TopicScore, utcnow

metadata = MetaData()

topics_table = Table(
    "classify_topics",
    metadata,
    Column("slug", String(64), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("definition", JSON, nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

state_table = Table(
    "classify_state",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

matches_table = Table(
    "classify_matches",
    metadata,
    # The ArticleMatched event id: a redelivered article records its matches once.
    Column("event_id", String(64), primary_key=True),
    Column("topic", String(64), primary_key=True),
    Column("topic_version", Integer, nullable=False),
    Column("article_id", String(128), nullable=False, index=True),
    Column("title", Text, nullable=False),
    Column("link", Text, nullable=False),
    Column("score", Float, nullable=False),
    Column("threshold", Float, nullable=False),
    Column("evidence", JSON, nullable=False),
    Column("matched_at", UTCDateTime(), nullable=False, index=True),
)

recent_table = Table(
    "classify_recent",
    metadata,
    Column("article_id", String(128), primary_key=True),
    Column("title", Text, nullable=False),
    Column("link", Text, nullable=False),
    Column("passages", JSON, nullable=False),
    Column("vectors", LargeBinary, nullable=False),
    Column("text", Text, nullable=False),
    Column("classified_at", UTCDateTime(), nullable=False, index=True),
)

SEEDED = "seeded_from"


class TopicConflict(ValueError):
    """A create or update that collides with the stored state (duplicate slug, stale version)."""


# --- topics -----------------------------------------------------------------------------------


async def seed_topics(engine: AsyncEngine, topics: Sequence[Topic], source: str) -> bool:
    """Store ``topics`` if the store was never seeded; returns whether it seeded now.

    Of two processes seeding at once, the second fails on the marker's key and seeds nothing.
    """
    try:
        return await _seed_topics(engine, topics, source)
    except IntegrityError:
        return False


async def _seed_topics(engine: AsyncEngine, topics: Sequence[Topic], source: str) -> bool:
    async with engine.begin() as conn:
        seeded = await conn.scalar(select(state_table.c.value).where(state_table.c.key == SEEDED))
        if seeded is not None:
            return False
        # Inserting the marker first makes a second process that seeds at once fail on the
        # primary key and roll back, instead of storing the seeds twice.
        await conn.execute(insert(state_table).values(key=SEEDED, value=source))
        for topic in topics:
            await _insert_topic(conn, topic)
    return True


async def is_seeded(engine: AsyncEngine) -> bool:
    async with engine.connect() as conn:
        value = await conn.scalar(select(state_table.c.value).where(state_table.c.key == SEEDED))
    return value is not None


async def _insert_topic(conn: AsyncConnection, topic: Topic) -> None:
    await conn.execute(
        insert(topics_table).values(
            slug=topic.slug,
            version=topic.version,
            definition=topic.model_dump(mode="json", exclude={"version"}),
            deleted=False,
            updated_at=utcnow(),
        )
    )


async def load_topics(engine: AsyncEngine) -> list[Topic]:
    """The stored topics that are not deleted, by slug."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(topics_table.c.version, topics_table.c.definition)
            .where(topics_table.c.deleted.is_(False))
            .order_by(topics_table.c.slug)
        )
        return [Topic.model_validate({**row.definition, "version": row.version}) for row in rows]


async def get_topic(engine: AsyncEngine, slug: str) -> Topic | None:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(topics_table.c.version, topics_table.c.definition).where(
                    topics_table.c.slug == slug, topics_table.c.deleted.is_(False)
                )
            )
        ).first()
    return None if row is None else Topic.model_validate({**row.definition, "version": row.version})


async def create_topic(engine: AsyncEngine, topic: Topic) -> Topic:
    """Store a new topic; a slug in use is a ``TopicConflict``, a deleted one is reused.

    Two creations of one slug at once both see it free; the second insert then fails on the
    primary key, which is the same conflict.
    """
    try:
        return await _create_topic(engine, topic)
    except IntegrityError as exc:
        raise TopicConflict(f"a topic with slug {topic.slug!r} exists") from exc


async def _create_topic(engine: AsyncEngine, topic: Topic) -> Topic:
    async with engine.begin() as conn:
        row = (
            await conn.execute(
                select(topics_table.c.version, topics_table.c.deleted).where(
                    topics_table.c.slug == topic.slug
                )
            )
        ).first()
        if row is None:
            created = topic.model_copy(update={"version": 1})
            await _insert_topic(conn, created)
            return created
        if not row.deleted:
            raise TopicConflict(f"a topic with slug {topic.slug!r} exists")
        created = topic.model_copy(update={"version": row.version + 1})
        await _write_version(conn, created, row.version, deleted=False)
        return created


async def save_topic(engine: AsyncEngine, topic: Topic, *, deleted: bool = False) -> Topic:
    """Store ``topic`` (read at ``topic.version``) as the next version; returns what was stored.

    A concurrent change in between is a ``TopicConflict``: versions never skip or repeat.
    """
    saved = topic.model_copy(update={"version": topic.version + 1})
    async with engine.begin() as conn:
        await _write_version(conn, saved, topic.version, deleted=deleted)
    return saved


async def _write_version(
    conn: AsyncConnection, topic: Topic, expected: int, *, deleted: bool
) -> None:
    result = await conn.execute(
        update(topics_table)
        .where(topics_table.c.slug == topic.slug, topics_table.c.version == expected)
        .values(
            version=topic.version,
            definition=topic.model_dump(mode="json", exclude={"version"}),
            deleted=deleted,
            updated_at=utcnow(),
        )
    )
    if result.rowcount != 1:
        raise TopicConflict(f"topic {topic.slug!r} changed meanwhile; read it again")


# --- matches and recent articles ----------------------------------------------------------------


@dataclass(frozen=True)
class Classified:
    """One classified article: its embedding, and (if it matched) the event that said so."""

    article: Article
    embedded: EmbeddedArticle
    matched_event_id: str | None
    scores: Sequence[TopicScore]


async def record(engine: AsyncEngine, classified: Sequence[Classified], keep_recent: int) -> None:
    """Record a batch's matches and embeddings, then trim the recent articles to ``keep_recent``."""
    now = utcnow()
    matches = [
        {
            "event_id": c.matched_event_id,
            "topic": s.topic,
            "topic_version": s.topic_version,
            "article_id": c.article.article_id,
            "title": c.article.title,
            "link": c.article.link,
            "score": s.score,
            "threshold": s.threshold,
            "evidence": s.evidence.model_dump(mode="json"),
            "matched_at": now,
        }
        for c in classified
        if c.matched_event_id is not None
        for s in c.scores
        if s.matched
    ]
    recent = {
        c.article.article_id: {
            "article_id": c.article.article_id,
            "title": c.embedded.passages[0] if not c.article.title else c.article.title,
            "link": c.article.link,
            "passages": list(c.embedded.passages),
            "vectors": c.embedded.vectors.astype(np.float16).tobytes(),
            "text": c.embedded.text,
            "classified_at": now,
        }
        for c in classified
        if c.embedded.passages
    }
    async with engine.begin() as conn:
        if matches:
            await conn.execute(insert_ignoring_duplicates(engine, matches_table), matches)
        if recent:
            # A re-classified article replaces its older row.
            await conn.execute(
                delete(recent_table).where(recent_table.c.article_id.in_(list(recent)))
            )
            await conn.execute(insert(recent_table), list(recent.values()))
            # Rows of one batch share a timestamp, so the bound holds to within one batch.
            cutoff = await conn.scalar(
                select(recent_table.c.classified_at)
                .order_by(recent_table.c.classified_at.desc())
                .offset(keep_recent)
                .limit(1)
            )
            if cutoff is not None:
                await conn.execute(
                    delete(recent_table).where(recent_table.c.classified_at < cutoff)
                )


@dataclass(frozen=True)
class MatchPage:
    total: int
    items: list[dict[str, object]]


async def list_matches(
    engine: AsyncEngine,
    *,
    topic: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    offset: int,
) -> MatchPage:
    """Past matches, newest first, filtered by topic and ``[since, until)``."""
    conditions = []
    if topic is not None:
        conditions.append(matches_table.c.topic == topic)
    if since is not None:
        conditions.append(matches_table.c.matched_at >= since)
    if until is not None:
        conditions.append(matches_table.c.matched_at < until)
    async with engine.connect() as conn:
        total = await conn.scalar(
            select(func.count()).select_from(matches_table).where(*conditions)
        )
        rows = await conn.execute(
            select(matches_table)
            .where(*conditions)
            .order_by(matches_table.c.matched_at.desc(), matches_table.c.event_id)
            .limit(limit)
            .offset(offset)
        )
        items = [dict(row._mapping) for row in rows]
    return MatchPage(total=int(total or 0), items=items)


@dataclass(frozen=True)
class RecentArticle:
    article_id: str
    title: str
    link: str
    embedded: EmbeddedArticle
    classified_at: datetime


async def recent_articles(engine: AsyncEngine, limit: int) -> list[RecentArticle]:
    """The most recently classified articles with their stored passage vectors, newest first."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(recent_table).order_by(recent_table.c.classified_at.desc()).limit(limit)
        )
        result = []
        for row in rows:
            passages = tuple(row.passages)
            vectors = np.frombuffer(row.vectors, dtype=np.float16).astype(np.float32)
            result.append(
                RecentArticle(
                    article_id=row.article_id,
                    title=row.title,
                    link=row.link,
                    embedded=EmbeddedArticle(
                        passages=passages,
                        vectors=vectors.reshape(len(passages), -1),
                        text=row.text,
                    ),
                    classified_at=row.classified_at,
                )
            )
    return result
