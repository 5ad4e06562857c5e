"""The classify service's state: versioned topics, match history, recent article embeddings,
and the labels operators gave.

Topics are kept as their JSON definition beside the version; a deleted topic leaves a tombstone
so that a topic created again under the same slug continues its version count, and every past
match stays attributable to exactly one definition. Recent articles keep their passages and
vectors (float16: half the space, and previews compare like with like) so that a draft topic
can be replayed over them without the model re-reading any article. A label keeps the vectors
of the article it names, so a topic goes on learning from it after the article has left the
recent ones.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    Index,
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
    type_coerce,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from newsmon.classify import stories
from newsmon.classify.learning import Label
from newsmon.classify.model import Vectors
from newsmon.classify.scoring import EmbeddedArticle
from newsmon.classify.topics import Topic, stored_topic
from newsmon.db import UTCDateTime, insert_ignoring_duplicates
from newsmon.events import Article, StoryRef, TopicScore, utcnow

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
    # Each live topic's decision when it was classified: {slug: {score, version, matched}}.
    Column("scores", JSON, nullable=True),
    # The article as ingest published it, without its content: what a backfilled alert carries.
    Column("article", JSON, nullable=True),
    Column("fetched_at", UTCDateTime(), nullable=True),
)

labels_table = Table(
    "classify_labels",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("topic", String(64), nullable=False),
    Column("article_id", String(128), nullable=False),
    Column("relevant", Boolean, nullable=False),
    Column("title", Text, nullable=False),
    Column("link", Text, nullable=False),
    # The labelled article's passage vectors (float16), one row per passage.
    Column("vectors", LargeBinary, nullable=False),
    Column("passages", Integer, nullable=False),
    # Where the label came from ("api", "link", "backtest") and who gave it.
    Column("source", String(16), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("subscription_id", String(64), nullable=True),
    # The topic version this label produced.
    Column("topic_version", Integer, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("undone_at", UTCDateTime(), nullable=True),
    Column("undone_by", String(200), nullable=True),
    Index("ix_classify_labels_topic_article", "topic", "article_id"),
    Index("ix_classify_labels_topic_created", "topic", "created_at"),
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
        return [stored_topic({**row.definition, "version": row.version}) for row in rows]


async def get_topic(engine: AsyncEngine, slug: str) -> Topic | None:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(topics_table.c.version, topics_table.c.definition).where(
                    topics_table.c.slug == slug, topics_table.c.deleted.is_(False)
                )
            )
        ).first()
    return None if row is None else stored_topic({**row.definition, "version": row.version})


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


# --- topic history: one row per version in classify_state (no table of its own) -------------


def _history_prefix(slug: str) -> str:
    # The state table's keys are 64 characters: a slug's digest keeps the key within them.
    return f"history:{hashlib.sha256(slug.encode()).hexdigest()[:32]}:"


async def record_history(
    engine: AsyncEngine, slug: str, version: int, entry: dict[str, Any]
) -> None:
    """Keep what produced ``slug``'s ``version``; a version already recorded keeps its entry."""
    async with engine.begin() as conn:
        await conn.execute(
            insert_ignoring_duplicates(engine, state_table).values(
                key=f"{_history_prefix(slug)}{version:010d}", value=json.dumps(entry)
            )
        )


async def topic_history(engine: AsyncEngine, slug: str, limit: int) -> list[dict[str, Any]]:
    """The latest ``limit`` recorded versions of ``slug``, newest first."""
    async with engine.connect() as conn:
        values = await conn.scalars(
            select(state_table.c.value)
            .where(state_table.c.key.startswith(_history_prefix(slug), autoescape=True))
            .order_by(state_table.c.key.desc())
            .limit(limit)
        )
        return [json.loads(v) for v in values]


# --- matches and recent articles ----------------------------------------------------------------


@dataclass(frozen=True)
class Classified:
    """One classified article: its embedding, and (if it matched) the event that said so."""

    article: Article
    embedded: EmbeddedArticle
    matched_event_id: str | None
    scores: Sequence[TopicScore]
    fetched_at: datetime | None = None


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
            "scores": {
                sc.topic: {"score": sc.score, "version": sc.topic_version, "matched": sc.matched}
                for sc in c.scores
            },
            "article": c.article.model_dump(mode="json", exclude={"content"}),
            "fetched_at": c.fetched_at,
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
    decided: dict[str, dict[str, Any]] = field(default_factory=dict)
    article: Article | None = None
    fetched_at: datetime | None = None


def _recent(row: Row[Any]) -> RecentArticle:
    passages = tuple(row.passages)
    return RecentArticle(
        article_id=row.article_id,
        title=row.title,
        link=row.link,
        embedded=EmbeddedArticle(
            passages=passages, vectors=_vectors(row.vectors, len(passages)), text=row.text
        ),
        classified_at=row.classified_at,
        decided=dict(row.scores or {}),
        article=Article.model_validate(row.article) if row.article else None,
        fetched_at=row.fetched_at,
    )


def _vectors(blob: bytes, rows: int) -> Vectors:
    return np.frombuffer(blob, dtype=np.float16).astype(np.float32).reshape(rows, -1)


async def recent_articles(
    engine: AsyncEngine, limit: int, *, since: datetime | None = None
) -> list[RecentArticle]:
    """The most recently classified articles with their stored passage vectors, newest first;
    ``since``: only those classified then or later."""
    query = select(recent_table).order_by(recent_table.c.classified_at.desc()).limit(limit)
    if since is not None:
        query = query.where(recent_table.c.classified_at >= since)
    async with engine.connect() as conn:
        return [_recent(row) for row in await conn.execute(query)]


async def recent_article(engine: AsyncEngine, article_id: str) -> RecentArticle | None:
    async with engine.connect() as conn:
        row = (
            await conn.execute(select(recent_table).where(recent_table.c.article_id == article_id))
        ).first()
    return None if row is None else _recent(row)


async def find_recent(
    engine: AsyncEngine, *, link: str | None, words: Sequence[str], limit: int
) -> list[RecentArticle]:
    """Recent articles by exact link and/or with every one of ``words`` in the title (any
    case), newest first."""
    query = select(recent_table).order_by(recent_table.c.classified_at.desc()).limit(limit)
    if link is not None:
        query = query.where(recent_table.c.link == link)
    for word in words:
        escaped = word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(recent_table.c.title.ilike(f"%{escaped}%", escape="\\"))
    async with engine.connect() as conn:
        return [_recent(row) for row in await conn.execute(query)]


async def matches_of(
    engine: AsyncEngine, article_ids: Sequence[str]
) -> dict[str, list[dict[str, object]]]:
    """Every match recorded for each of ``article_ids``, newest first."""
    found: dict[str, list[dict[str, object]]] = {i: [] for i in article_ids}
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(matches_table)
            .where(matches_table.c.article_id.in_(list(found)))
            .order_by(matches_table.c.matched_at.desc())
        )
        for row in rows:
            found[row.article_id].append(dict(row._mapping))
    return found


async def matched_articles(engine: AsyncEngine, topic: str, article_ids: Sequence[str]) -> set[str]:
    """Which of ``article_ids`` have a match recorded for ``topic``, at any version."""
    found: set[str] = set()
    ids = list(article_ids)
    async with engine.connect() as conn:
        # In chunks: databases bound the parameters of one statement.
        for start in range(0, len(ids), 500):
            rows = await conn.execute(
                select(matches_table.c.article_id).where(
                    matches_table.c.topic == topic,
                    matches_table.c.article_id.in_(ids[start : start + 500]),
                )
            )
            found.update(row.article_id for row in rows)
    return found


async def record_matches(engine: AsyncEngine, rows: Sequence[dict[str, object]]) -> None:
    """Record matches found outside the stream (a backfill); a repeated one is ignored."""
    if rows:
        async with engine.begin() as conn:
            await conn.execute(insert_ignoring_duplicates(engine, matches_table), list(rows))


# --- labels -------------------------------------------------------------------------------------


class ArticleGone(LookupError):
    """The article is not among the recently classified ones: there is nothing to learn from."""


@dataclass(frozen=True)
class NewLabel:
    article_id: str
    relevant: bool


async def add_labels(
    engine: AsyncEngine,
    topic: Topic,
    labels: Sequence[NewLabel],
    *,
    source: str,
    actor: str,
    subscription_id: str | None,
) -> tuple[Topic, list[dict[str, object]]]:
    """Store labels of ``topic`` (read at ``topic.version``) and bump its version, at once.

    A new label of an article replaces the article's active label for the topic (the old one is
    marked undone). An article that is not recent any more is ``ArticleGone``; a concurrent
    change of the topic is a ``TopicConflict``.
    """
    saved = topic.model_copy(update={"version": topic.version + 1})
    now = utcnow()
    ids = list(dict.fromkeys(label.article_id for label in labels))
    async with engine.begin() as conn:
        found = {
            row.article_id: row
            for row in await conn.execute(
                select(
                    recent_table.c.article_id,
                    recent_table.c.title,
                    recent_table.c.link,
                    recent_table.c.vectors,
                    recent_table.c.passages,
                ).where(recent_table.c.article_id.in_(ids))
            )
        }
        missing = [i for i in ids if i not in found]
        if missing:
            raise ArticleGone(
                "not among the recently classified articles: " + ", ".join(missing[:5])
            )
        rows = []
        for label in labels:
            article = found[label.article_id]
            rows.append(
                {
                    "id": uuid.uuid4().hex,
                    "topic": topic.slug,
                    "article_id": label.article_id,
                    "relevant": label.relevant,
                    "title": article.title,
                    "link": article.link,
                    "vectors": article.vectors,
                    "passages": len(article.passages),
                    "source": source,
                    "actor": actor,
                    "subscription_id": subscription_id,
                    "topic_version": saved.version,
                    "created_at": now,
                    "undone_at": None,
                    "undone_by": None,
                }
            )
        await conn.execute(
            update(labels_table)
            .where(
                labels_table.c.topic == topic.slug,
                labels_table.c.article_id.in_(ids),
                labels_table.c.undone_at.is_(None),
            )
            .values(undone_at=now, undone_by=f"replaced by a new label from {actor}")
        )
        # Of two labels of one article in one call, the last one stands.
        latest = {row["article_id"]: row for row in rows}
        superseded = [row for row in rows if latest[row["article_id"]] is not row]
        for row in superseded:
            row["undone_at"] = now
            row["undone_by"] = f"replaced by a new label from {actor}"
        await conn.execute(insert(labels_table), rows)
        await _write_version(conn, saved, topic.version, deleted=False)
    return saved, [_public(row) for row in rows]


async def undo_label(
    engine: AsyncEngine, topic: Topic, label_id: str, *, actor: str
) -> tuple[Topic, dict[str, object]] | None:
    """Mark an active label of ``topic`` undone and bump the topic's version; None if the topic
    has no such label, the label unchanged (and no new version) if it was undone already."""
    now = utcnow()
    async with engine.begin() as conn:
        row = (
            await conn.execute(
                select(labels_table).where(
                    labels_table.c.id == label_id, labels_table.c.topic == topic.slug
                )
            )
        ).first()
        if row is None:
            return None
        if row.undone_at is not None:
            return topic, _public(dict(row._mapping))
        saved = topic.model_copy(update={"version": topic.version + 1})
        await conn.execute(
            update(labels_table)
            .where(labels_table.c.id == label_id)
            .values(undone_at=now, undone_by=actor)
        )
        await _write_version(conn, saved, topic.version, deleted=False)
    return saved, _public({**row._mapping, "undone_at": now, "undone_by": actor})


# What a label shows: everything but the vectors it learns from.
_LABEL_PUBLIC = [c for c in labels_table.c if c.name not in ("vectors", "passages")]


def _public(row: Mapping[str, object]) -> dict[str, object]:
    return {c.name: row[c.name] for c in _LABEL_PUBLIC}


@dataclass(frozen=True)
class LabelPage:
    total: int
    items: list[dict[str, object]]


async def list_labels(
    engine: AsyncEngine, topic: str, *, include_undone: bool, limit: int, offset: int
) -> LabelPage:
    """A topic's labels, newest first."""
    conditions = [labels_table.c.topic == topic]
    if not include_undone:
        conditions.append(labels_table.c.undone_at.is_(None))
    async with engine.connect() as conn:
        total = await conn.scalar(select(func.count()).select_from(labels_table).where(*conditions))
        rows = await conn.execute(
            select(*_LABEL_PUBLIC)
            .where(*conditions)
            .order_by(labels_table.c.created_at.desc(), labels_table.c.id)
            .limit(limit)
            .offset(offset)
        )
        return LabelPage(total=int(total or 0), items=[dict(row._mapping) for row in rows])


async def labels_of(
    engine: AsyncEngine, article_ids: Sequence[str]
) -> dict[str, list[dict[str, object]]]:
    """Every label each of ``article_ids`` got, for any topic, newest first."""
    found: dict[str, list[dict[str, object]]] = {i: [] for i in article_ids}
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(*_LABEL_PUBLIC)
            .where(labels_table.c.article_id.in_(list(found)))
            .order_by(labels_table.c.created_at.desc())
        )
        for row in rows:
            found[row.article_id].append(dict(row._mapping))
    return found


async def active_labels(
    engine: AsyncEngine, per_topic: int, *, topics: Sequence[str]
) -> dict[str, list[Label]]:
    """The active labels of ``topics`` with their vectors, at most the latest ``per_topic``."""
    if not topics:
        return {}
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(
                labels_table.c.id,
                labels_table.c.topic,
                labels_table.c.article_id,
                labels_table.c.title,
                labels_table.c.relevant,
                labels_table.c.vectors,
                labels_table.c.passages,
            )
            .where(labels_table.c.undone_at.is_(None), labels_table.c.topic.in_(list(topics)))
            .order_by(labels_table.c.topic, labels_table.c.created_at.desc(), labels_table.c.id)
        )
        by_topic: dict[str, list[Label]] = {}
        for row in rows:
            own = by_topic.setdefault(row.topic, [])
            if len(own) < per_topic:
                own.append(
                    Label(
                        label_id=row.id,
                        article_id=row.article_id,
                        title=row.title,
                        relevant=row.relevant,
                        vectors=_vectors(row.vectors, row.passages),
                    )
                )
    return by_topic


async def label_topic(engine: AsyncEngine, label_id: str) -> str | None:
    """The topic a label belongs to."""
    async with engine.connect() as conn:
        return await conn.scalar(select(labels_table.c.topic).where(labels_table.c.id == label_id))


async def labelled_articles(engine: AsyncEngine, topic: str) -> set[str]:
    """The articles with an active label for ``topic``."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(labels_table.c.article_id).where(
                labels_table.c.topic == topic, labels_table.c.undone_at.is_(None)
            )
        )
        return {row.article_id for row in rows}


# --- stories ------------------------------------------------------------------------------------
# A story is one real-world event across feeds and outlets (``stories`` decides); these tables
# keep it across restarts. An article belongs to at most one story (its id is the primary key
# of ``classify_story_articles``), so a redelivered article finds its story instead of joining
# twice.

stories_table = Table(
    "classify_stories",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("title", Text, nullable=False),
    Column("first_article_id", String(128), nullable=False),
    # Article times (published, else fetched): the window is news time, not processing time.
    Column("first_seen", UTCDateTime(), nullable=False),
    Column("last_seen", UTCDateTime(), nullable=False, index=True),
    Column("article_count", Integer, nullable=False),
    Column("updates", Integer, nullable=False),
    # The sum of the articles' unit vectors (float32): its direction is the story's mean.
    Column("vector_sum", LargeBinary, nullable=False),
    # The facts the story's articles reported, {folded key: as written}.
    Column("facts", JSON, nullable=False),
    Column("topics", JSON, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)

story_articles_table = Table(
    "classify_story_articles",
    metadata,
    Column("article_id", String(128), primary_key=True),
    Column("story_id", String(32), nullable=False),
    # 1 for the article that started the story; the story's article count when it joined.
    Column("position", Integer, nullable=False),
    Column("title", Text, nullable=False),
    Column("link", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("published", UTCDateTime(), nullable=False),
    Column("update", Boolean, nullable=False),
    Column("new", JSON, nullable=False),
    Column("reason", Text, nullable=False),
    Column("similarity", Float, nullable=True),
    Column("topics", JSON, nullable=False),
    # The article's lead vector (float16), to name the nearest article of a story it joins.
    Column("vector", LargeBinary, nullable=False),
    Column("joined_at", UTCDateTime(), nullable=False),
    Index("ix_classify_story_articles_story", "story_id", "position"),
)

story_topics_table = Table(
    "classify_story_topics",
    metadata,
    Column("story_id", String(32), primary_key=True),
    Column("topic", String(64), primary_key=True, index=True),
)

# The row whose update serialises story assignment across classify processes.
_STORIES_LOCK = "stories.lock"
# Stories kept after their last article (then deleted), and the most open stories compared.
STORY_RETENTION = timedelta(days=120)
MAX_OPEN_STORIES = 1000
# The most articles assigned in one transaction (one hold of the lock).
STORY_BATCH = 64
_STORY_BATCH_GAP = 0.1
# The members of a story joined loaded to name its nearest article.
_MEMBERS_PER_STORY = 50


@dataclass(frozen=True)
class StoryInput:
    """A matched article to place in a story, with the topics it matched."""

    candidate: stories.Candidate
    link: str
    topics: tuple[str, ...]


def _story_ref(row: Mapping[str, Any], article: Mapping[str, Any]) -> StoryRef:
    return StoryRef(
        story_id=row["id"],
        title=row["title"],
        article_count=article["position"],
        first_seen=row["first_seen"],
        update=article["update"],
        new=list(article["new"]),
        reason=article["reason"],
    )


async def assign_stories(engine: AsyncEngine, inputs: Sequence[StoryInput]) -> dict[str, StoryRef]:
    """Place each matched article in a story, in the order given, and keep the decisions.

    Transactions of at most ``STORY_BATCH`` articles, each serialised across processes by
    updating one lock row first (PostgreSQL holds the row lock, SQLite its write lock, until
    commit): two processes never both start a story for one event, and a backfill holds the
    lock a batch at a time. The decisions run in a worker thread, off the event loop. An
    article placed before (a redelivery, a backfill of another topic) keeps its story and its
    decision, and only adds its topics. Stories whose last article is ``STORY_RETENTION``
    older than the newest here are deleted, except those an article of this call is in.
    """
    if not inputs:
        return {}
    refs: dict[str, StoryRef] = {}
    clock = max(i.candidate.at for i in inputs)
    for first in range(0, len(inputs), STORY_BATCH):
        if first:
            # SQLite's other writers poll for its lock (up to 100 ms apart): a gap lets them in.
            await asyncio.sleep(_STORY_BATCH_GAP)
        last = first + STORY_BATCH >= len(inputs)
        refs |= await _assign_batch(
            engine,
            inputs[first : first + STORY_BATCH],
            expire=(clock - STORY_RETENTION, {r.story_id for r in refs.values()}) if last else None,
        )
    return refs


async def _take_stories_lock(engine: AsyncEngine, conn: AsyncConnection, now: datetime) -> None:
    await conn.execute(
        insert_ignoring_duplicates(engine, state_table), [{"key": _STORIES_LOCK, "value": ""}]
    )
    await conn.execute(
        update(state_table).where(state_table.c.key == _STORIES_LOCK).values(value=now.isoformat())
    )


_STORY_COLUMNS = [c for c in stories_table.c if c.name != "facts"]


def _decide_stories(
    open_rows: Sequence[Mapping[str, Any]], fresh: Sequence[StoryInput]
) -> tuple[list[tuple[stories.Candidate, stories.Story, stories.Decision]], list[stories.Story]]:
    """The pure part of an assignment (in a worker thread): the open stories read, decided."""
    known = [
        stories.Story(
            story_id=r["id"],
            title=r["title"],
            first_seen=r["first_seen"],
            last_seen=r["last_seen"],
            article_count=r["article_count"],
            vector_sum=np.frombuffer(r["vector_sum"], dtype=np.float32).copy(),
            facts=dict(json.loads(r["facts"]) if isinstance(r["facts"], str) else r["facts"]),
        )
        for r in open_rows
    ]
    return stories.assign([(uuid.uuid4().hex, i.candidate) for i in fresh], known)


async def _assign_batch(
    engine: AsyncEngine,
    inputs: Sequence[StoryInput],
    *,
    expire: tuple[datetime, set[str]] | None,
) -> dict[str, StoryRef]:
    """``assign_stories`` for one transaction; ``expire``: delete the stories last seen before
    then, but for those named (and this batch's)."""
    now = utcnow()
    refs: dict[str, StoryRef] = {}
    async with engine.begin() as conn:
        await _take_stories_lock(engine, conn, now)
        ids = list(dict.fromkeys(i.candidate.article_id for i in inputs))
        placed = {
            row.article_id: dict(row._mapping)
            for row in await conn.execute(
                select(story_articles_table).where(story_articles_table.c.article_id.in_(ids))
            )
        }
        fresh: list[StoryInput] = []
        seen: set[str] = set()
        for item in inputs:
            if item.candidate.article_id not in placed and item.candidate.article_id not in seen:
                fresh.append(item)
                seen.add(item.candidate.article_id)
        # Open for the batch's earliest article: a batch may span days of news.
        earliest = min((i.candidate.at for i in fresh), default=now)
        # The facts as stored (JSON text), read in the worker thread: a thousand stories of
        # 400 facts take the event loop 0.1 s to read.
        open_rows = [
            dict(row._mapping)
            for row in await conn.execute(
                select(*_STORY_COLUMNS, type_coerce(stories_table.c.facts, Text).label("facts"))
                .where(stories_table.c.last_seen >= earliest - stories.WINDOW)
                .order_by(stories_table.c.last_seen.desc())
                .limit(MAX_OPEN_STORIES)
            )
        ] if fresh else []  # fmt: skip
        decided, changed = await asyncio.to_thread(_decide_stories, open_rows, fresh)
        rows_before = {r["id"]: r for r in open_rows}
        # The reasons name a story's nearest article: the stored ones of the stories joined.
        joined = {d.story.story_id for _, _, d in decided if d.story is not None} & set(rows_before)
        members: dict[str, list[stories.Member]] = {i: [] for i in joined}
        if joined:
            for row in await conn.execute(
                select(
                    story_articles_table.c.article_id,
                    story_articles_table.c.story_id,
                    story_articles_table.c.title,
                    story_articles_table.c.source,
                    story_articles_table.c.published,
                    story_articles_table.c.vector,
                )
                .where(
                    story_articles_table.c.story_id.in_(list(joined)),
                    story_articles_table.c.position <= _MEMBERS_PER_STORY,
                )
                .order_by(story_articles_table.c.story_id, story_articles_table.c.position)
            ):
                members[row.story_id].append(
                    stories.Member(
                        row.article_id,
                        row.title,
                        row.source,
                        row.published,
                        np.frombuffer(row.vector, dtype=np.float16).astype(np.float32),
                    )
                )
            decided = [
                (c, story, stories.with_members(d, c, members[d.story.story_id]))
                if d.story is not None and d.story.story_id in members
                else (c, story, d)
                for c, story, d in decided
            ]
        topics_of = {i.candidate.article_id: i.topics for i in inputs}
        story_topics: dict[str, set[str]] = {r["id"]: set(r["topics"]) for r in open_rows}
        article_rows = []
        updates: dict[str, int] = {}
        for (candidate, story, decision), item in zip(decided, fresh, strict=True):
            story_topics.setdefault(story.story_id, set()).update(item.topics)
            updates[story.story_id] = updates.get(story.story_id, 0) + decision.update
            article_rows.append(
                {
                    "article_id": candidate.article_id,
                    "story_id": story.story_id,
                    "position": story.article_count,
                    "title": candidate.title,
                    "link": item.link,
                    "source": candidate.source,
                    "published": candidate.at,
                    "update": decision.update,
                    "new": list(decision.new),
                    "reason": decision.reason,
                    "similarity": (
                        None if decision.similarity is None else round(decision.similarity, 4)
                    ),
                    "topics": list(item.topics),
                    "vector": candidate.vector.astype(np.float16).tobytes(),
                    "joined_at": now,
                }
            )
        for story in changed:
            values = {
                "first_seen": story.first_seen,
                "last_seen": story.last_seen,
                "article_count": story.article_count,
                "vector_sum": story.vector_sum.astype(np.float32).tobytes(),
                "facts": story.facts,
                "topics": sorted(story_topics[story.story_id]),
            }
            before = rows_before.get(story.story_id)
            if before is None:
                await conn.execute(
                    insert(stories_table).values(
                        id=story.story_id,
                        title=story.title,
                        first_article_id=story.members[0].article_id,
                        updates=updates.get(story.story_id, 0),
                        created_at=now,
                        **values,
                    )
                )
            else:
                await conn.execute(
                    update(stories_table)
                    .where(stories_table.c.id == story.story_id)
                    .values(updates=before["updates"] + updates.get(story.story_id, 0), **values)
                )
        if article_rows:
            await conn.execute(insert(story_articles_table), article_rows)
        # Articles placed before: their topics join the story's (a backfill of another topic).
        for article_id, prior in placed.items():
            extra = sorted(set(topics_of[article_id]) - set(prior["topics"]))
            if extra:
                await conn.execute(
                    update(story_articles_table)
                    .where(story_articles_table.c.article_id == article_id)
                    .values(topics=sorted({*prior["topics"], *extra}))
                )
                story_row = (
                    await conn.execute(
                        select(stories_table.c.topics).where(
                            stories_table.c.id == prior["story_id"]
                        )
                    )
                ).first()
                if story_row is not None:
                    await conn.execute(
                        update(stories_table)
                        .where(stories_table.c.id == prior["story_id"])
                        .values(topics=sorted({*story_row.topics, *extra}))
                    )
        pairs = [
            {"story_id": r["story_id"], "topic": t}
            for r in [*article_rows, *placed.values()]
            for t in topics_of[r["article_id"]]
        ]
        if pairs:
            await conn.execute(insert_ignoring_duplicates(engine, story_topics_table), pairs)
        wanted = {r["story_id"] for r in [*article_rows, *placed.values()]}
        story_rows = {
            row.id: dict(row._mapping)
            for row in await conn.execute(
                select(stories_table.c.id, stories_table.c.title, stories_table.c.first_seen)
                .where(stories_table.c.id.in_(list(wanted)))
            )
        }  # fmt: skip
        for r in [*article_rows, *placed.values()]:
            refs[r["article_id"]] = _story_ref(story_rows[r["story_id"]], r)
        if expire is not None:
            cutoff, keep = expire
            await _expire_stories(conn, cutoff, keep=keep | wanted)
    return refs


async def _expire_stories(conn: AsyncConnection, before: datetime, *, keep: set[str]) -> None:
    """Delete the stories last seen before ``before``, but for those in ``keep``."""
    old = select(stories_table.c.id).where(
        stories_table.c.last_seen < before, stories_table.c.id.not_in(list(keep))
    )
    await conn.execute(delete(story_topics_table).where(story_topics_table.c.story_id.in_(old)))
    await conn.execute(delete(story_articles_table).where(story_articles_table.c.story_id.in_(old)))
    await conn.execute(
        delete(stories_table).where(
            stories_table.c.last_seen < before, stories_table.c.id.not_in(list(keep))
        )
    )


_STORY_PUBLIC = [c for c in stories_table.c if c.name not in ("vector_sum", "facts")]
_STORY_ARTICLE_PUBLIC = [c for c in story_articles_table.c if c.name != "vector"]


@dataclass(frozen=True)
class StoryPage:
    total: int
    items: list[dict[str, object]]


async def list_stories(
    engine: AsyncEngine, *, topic: str | None, limit: int, offset: int
) -> StoryPage:
    """Stories, newest activity first; ``topic``: those with an article matching it."""
    conditions = []
    if topic is not None:
        conditions.append(
            stories_table.c.id.in_(
                select(story_topics_table.c.story_id).where(story_topics_table.c.topic == topic)
            )
        )
    async with engine.connect() as conn:
        total = await conn.scalar(
            select(func.count()).select_from(stories_table).where(*conditions)
        )
        rows = await conn.execute(
            select(*_STORY_PUBLIC)
            .where(*conditions)
            .order_by(stories_table.c.last_seen.desc(), stories_table.c.id)
            .limit(limit)
            .offset(offset)
        )
        return StoryPage(total=int(total or 0), items=[dict(row._mapping) for row in rows])


async def get_story(
    engine: AsyncEngine, story_id: str
) -> tuple[dict[str, object], list[dict[str, object]]] | None:
    """A story and its articles in the order they joined; None if there is no such story."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(select(*_STORY_PUBLIC).where(stories_table.c.id == story_id))
        ).first()
        if row is None:
            return None
        articles = await conn.execute(
            select(*_STORY_ARTICLE_PUBLIC)
            .where(story_articles_table.c.story_id == story_id)
            .order_by(story_articles_table.c.position)
        )
        return dict(row._mapping), [dict(a._mapping) for a in articles]
